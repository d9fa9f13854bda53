"""Cost rules of the custom ops on their CUDA paths: peft_fast's Triton ops and bitsandbytes' CUDA backend.

Under fake tensors these ops run their ``register_fake`` implementations; what an H200 would
launch is rebuilt here from the launchers' code:

``peft_fast::lora_linear`` (``peft_fast/kernels/lora_linear.py``), x [M, K], W [N, K], A [r, K], B [N, r]:
  by the first candidate of ``kernels.plans.lora_forward_plan`` (the static choice; a GPU may time
  another): the one-launch decode kernel (W streamed once, fp32 partials of Y and H reduced by each
  tile's last program); or H = drop(X)·Aᵀ, one thin GEMM split over K by ``_balanced_trips`` (fp32
  partials, then their sum and a cast: two more kernels), then Y by the split-K GEMV (partials +
  epilogue kernel), the row-streaming NF4 GEMM (packed W streamed, 0.5 B/weight), a scratch
  dequantization of W then the dense fused GEMM, or cuBLAS then the LoRA term as an addmm over Y
  (``library_addmm``); or ``library``: H and C = b + s·H·Bᵀ in one pass over X, the scratch
  dequantization, cuBLAS accumulating X·deq(W)ᵀ into C. A scratch deq(W) is live only during the op.
``peft_fast::lora_linear_backward``: dB = s·dYᵀ·H and dH = s·dY·B by ``kernels.plans.lora_dh_db_plan``
  (two library GEMMs, or one pass over dY writing fp32 partials and one reduction kernel), dX =
  dY·deq(W) + (dH·A)⊙mask by ``kernels.plans.lora_dx_plan``'s first candidate (the NF4 loader in
  the GEMM, or a scratch dequantization, the dropped term written, then cuBLAS accumulating into
  it), dA = dHᵀ·drop(X) split over M by ``_da_splits`` (fp32 partials reduced in the same launch).
``peft_fast::nf4_matmul``: the dequantization kernel, then a library GEMM.
``bitsandbytes::gemm_4bit`` (``backends/cuda/ops.py``): on sm90 its fused kernel only where
  ``_gemm_4bit_use_custom_cuda`` picks it (small M); else ``_dequant_linear_fallback``: nested
  absmax dequantization, + offset, ``dequantize_4bit`` to the compute dtype, ``F.linear``.
``bitsandbytes::dequantize_4bit`` / ``dequantize_blockwise`` / ``gemv_4bit``: one kernel each, bytes
  of inputs and outputs (packed 0.5 B/weight + scales read, the dense weight written).

The split policies are those of ``lora_linear.py`` with an H200's 132 SMs and the GPU (not the
interpreter) block constants.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from peft_fast.kernels import plans
from peft_fast.step_model.roofline import Kernel, OpCall, storage_bytes

__all__ = ["CUSTOM_FLOPS", "H200_SMS", "RULES"]

H200_SMS = 132
_ROWS_BLOCK_K = 64  # peft_fast.kernels.nf4_gemm.ROWS_BLOCK_K: the row loader's widest K tile
_LORA_DOWN_BLOCK_M, _LORA_DOWN_GRANULE = 64, 128  # policy block M; the largest _LORA_DOWN_CONFIGS BLOCK_K
_SPLITK_GRANULE, _SPLITK_BLOCK_N = 64, 128
_DA_MIN_SPLIT_ROWS, _DA_MIN_BLOCK_K = 128 * 4, 64
_DECODE_BLOCK_K, _DECODE_BLOCK_N = 64, 128  # kernels/lora_decode.py: DECODE_BLOCK_K, _POLICY_BLOCK_N
_DH_DB_BLOCK_M, _DH_DB_BLOCK_N = 256, 64  # kernels/lora_dh_db.py: DH_DB_LAUNCH
_NESTED_BLOCKSIZE = 256


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_r(rank: int) -> int:
    return min(max(16, 1 << max(rank - 1, 0).bit_length()), 64)  # kernels/common.py's _block_r on the GPU


def _balanced_trips(tiles: int, steps: int, step_bytes: float, split_bytes: float) -> int:
    """``peft_fast.kernels.lora_linear._balanced_trips`` on 132 SMs."""
    best_trips, best_cost = steps, None
    for trips in range(1, steps + 1):
        splits = _cdiv(steps, trips)
        cost = _cdiv(tiles * splits, H200_SMS) * trips * step_bytes + (splits - 1) * split_bytes / H200_SMS
        if best_cost is None or cost < best_cost:
            best_trips, best_cost = trips, cost
    return best_trips


def lora_down_splits(m: int, k: int, rank: int, itemsize: int) -> int:
    tiles = _cdiv(m, _LORA_DOWN_BLOCK_M) * _cdiv(rank, _block_r(rank))
    steps = _cdiv(max(k, 1), _LORA_DOWN_GRANULE)
    trips = _balanced_trips(tiles, steps, _LORA_DOWN_BLOCK_M * _LORA_DOWN_GRANULE * itemsize, m * rank * 8)
    return _cdiv(max(k, 1), trips * _LORA_DOWN_GRANULE)


def decode_splits(m: int, n: int, k: int) -> int:
    steps = _cdiv(k, _SPLITK_GRANULE)
    trips = _balanced_trips(_cdiv(n, _SPLITK_BLOCK_N), steps, _SPLITK_BLOCK_N * _SPLITK_GRANULE // 2, m * n * 8)
    return _cdiv(max(k, 1), trips * _SPLITK_GRANULE)


def one_launch_decode_splits(n: int, k: int) -> int:
    """``kernels.lora_decode._k_slice``'s K slices on 132 SMs."""
    steps = _cdiv(k, _DECODE_BLOCK_K)
    return max(1, min(steps, H200_SMS // _cdiv(n, _DECODE_BLOCK_N)))


def dh_db_partials(m: int, n: int) -> tuple[int, int]:
    """(dH's N slices, dB's row blocks) of ``kernels.lora_dh_db``'s fused pass on 132 SMs."""
    row_blocks = _cdiv(m, _DH_DB_BLOCK_M)
    slices = max(1, min(_cdiv(n, _DH_DB_BLOCK_N), _cdiv(H200_SMS, row_blocks)))
    n_slice = _cdiv(_cdiv(n, slices), _DH_DB_BLOCK_N) * _DH_DB_BLOCK_N
    return _cdiv(n, n_slice), row_blocks


def da_splits(m: int, k: int, rank: int) -> int:
    tiles = _cdiv(rank, _block_r(rank)) * _cdiv(k, _DA_MIN_BLOCK_K)
    splits = max(1, min(_cdiv(2 * H200_SMS, tiles), m // _DA_MIN_SPLIT_ROWS))
    per_split = _cdiv(_cdiv(max(m, 1), splits), _DA_MIN_SPLIT_ROWS) * _DA_MIN_SPLIT_ROWS
    return _cdiv(max(m, 1), per_split)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _nf4_bytes(n: int, k: int, absmax, nested_absmax, nested_offset) -> int:
    """Bytes of one NF4 weight in memory: packed codes and its scales."""
    return _cdiv(n * k, 2) + _nbytes(absmax) + _nbytes(nested_absmax) + _nbytes(nested_offset)


def _partials(label: str, splits: int, rows: int, cols: int, out_itemsize: int) -> list[Kernel]:
    """The sum of ``splits`` fp32 partials and the cast to the output (nothing when there is one split)."""
    if splits == 1:
        return []
    partial = splits * rows * cols * 4
    return [Kernel(f"{label}: sum of partials", 0.0, partial + rows * cols * 4),
            Kernel(f"{label}: cast", 0.0, rows * cols * (4 + out_itemsize))]  # fmt: skip


def _base_kind(k: int, blocksize: int) -> str:
    """``kernels.nf4_gemm.base_kind`` from the op's arguments."""
    if not blocksize:
        return "dense"
    return "nf4_rows" if k % blocksize == 0 and blocksize >= _ROWS_BLOCK_K else "nf4"


def _base_pass(label: str, plan: str, n: int, k: int, act: int, absmax, nested, offset, blocksize: int):
    """(kernels before the GEMM, bytes of W the GEMM streams, scratch bytes) for a pass over W by ``plan``."""
    if not blocksize:
        return [], n * k * act, 0
    packed = _nf4_bytes(n, k, absmax, nested, offset)
    if plan in (plans.DEQUANT_FUSED, plans.LIBRARY):
        return [Kernel(f"{label}: scratch deq(W)", 0.0, packed + n * k * act)], n * k * act, n * k * act
    return [], packed, 0


def _lora_linear(call: OpCall):
    x, _, absmax, nested, offset, blocksize, _, lora_b, bias = call.args[:9]
    m, k = x.shape
    n, rank = lora_b.shape
    act = x.element_size()
    epilogue = 2.0 * m * n * rank
    io = m * rank * act + n * rank * act + _nbytes(bias) + m * n * act
    plan = plans.lora_forward_plan(m, n, k, _base_kind(k, blocksize), x.dtype, rank, 0.0)[0]
    if plan == plans.DECODE:  # one launch: W once, X and A per slice, fp32 partials of Y and H
        splits = one_launch_decode_splits(n, k)
        partials = splits * m * (n + _cdiv(n, _DECODE_BLOCK_N) * _block_r(rank)) * 4
        w_bytes = _nf4_bytes(n, k, absmax, nested, offset)
        flops = 2.0 * m * n * k + 2.0 * m * k * rank + epilogue
        return [Kernel("decode: Y and H in one launch", flops, w_bytes + m * k * act + rank * k * act + io
                       + 2 * partials)], partials  # fmt: skip
    before, w_bytes, deq_scratch = _base_pass("Y", plan, n, k, act, absmax, nested, offset, blocksize)
    if plan == plans.LIBRARY:  # H and C = b + s·H·Bᵀ in one pass, then cuBLAS adds X·deq(W)ᵀ into C
        down_up = Kernel("H = drop(X)·Aᵀ, C = b + s·H·Bᵀ", 2.0 * m * k * rank + epilogue,
                         m * k * act + rank * k * act + io)  # fmt: skip
        gemm = Kernel("cuBLAS Y = C + X·deq(W)ᵀ", 2.0 * m * n * k, m * k * act + w_bytes + 2 * m * n * act)
        return [down_up, *before, gemm], deq_scratch
    splits = lora_down_splits(m, k, rank, act)
    kernels = [
        Kernel(
            "H = drop(X)·Aᵀ",
            2.0 * m * k * rank,
            m * k * act + rank * k * act + (splits * m * rank * 4 if splits > 1 else m * rank * act),
        )
    ]
    kernels += _partials("H", splits, m, rank, act)
    scratch = splits * m * rank * 4 if splits > 1 else 0
    if plan == plans.SPLITK:
        k_splits = decode_splits(m, n, k)
        w_bytes = _nf4_bytes(n, k, absmax, nested, offset) if blocksize else n * k * act
        kernels += [Kernel("split-K GEMV partials", 2.0 * m * n * k, m * k * act + w_bytes + k_splits * m * n * 4),
                    Kernel("split-K epilogue (+ s·H·Bᵀ)", epilogue, k_splits * m * n * 4 + io)]  # fmt: skip
        return kernels, scratch + k_splits * m * n * 4
    if plan == plans.LIBRARY_ADDMM:  # cuBLAS writes Y, then the LoRA term is an addmm reading and writing it again
        kernels += [*before, Kernel("cuBLAS Y = X·deq(W)ᵀ + b", 2.0 * m * n * k, m * k * act + w_bytes + m * n * act),
                    Kernel("Y += s·H·Bᵀ (addmm)", epilogue, io + m * n * act)]  # fmt: skip
        return kernels, scratch + deq_scratch
    kind = {plans.ROWS: "row-streaming NF4 GEMM + LoRA", plans.DEQUANT_FUSED: "dense GEMM + LoRA epilogue"}.get(
        plan, "fused GEMM + LoRA epilogue"
    )
    kernels += [*before, Kernel(kind, 2.0 * m * n * k + epilogue, m * k * act + w_bytes + io)]
    return kernels, scratch + deq_scratch


def _lora_linear_backward(call: OpCall):
    x, _, absmax, nested, offset, blocksize, _, lora_b = (call.args[i] for i in (1, 3, 4, 5, 6, 7, 8, 9))
    needs_dx, needs_da, needs_db = call.args[13:16]
    m, k = x.shape
    n, rank = lora_b.shape
    act = x.element_size()
    dy, small = m * n * act, m * rank * act
    kernels: list[Kernel] = []
    scratch = 0
    fused_dh_db = needs_db and (needs_dx or needs_da) and plans.lora_dh_db_plan(m, n, x.dtype, rank)[0] == plans.FUSED
    if fused_dh_db:  # one pass over dY: fp32 partials of dH (per N slice) and dB (per row block), one reduction
        slices, row_blocks = dh_db_partials(m, n)
        partials = (slices * m + row_blocks * n) * rank * 4
        kernels += [Kernel("dH, dB partials (one pass over dY)", 4.0 * m * n * rank,
                           dy + small + n * rank * act + partials),
                    Kernel("dH, dB: sum of partials", 0.0, partials + (m + n) * rank * act)]  # fmt: skip
        scratch += small + partials
    else:
        if needs_db:
            kernels.append(Kernel("dB = s·dYᵀ·H", 2.0 * n * m * rank, dy + small + n * rank * act))
        if needs_dx or needs_da:
            kernels.append(Kernel("dH = s·dY·B", 2.0 * m * n * rank, dy + n * rank * act + small))
            scratch += small
    if needs_dx:
        plan = plans.lora_dx_plan(m, n, k, _base_kind(k, blocksize), x.dtype, rank, 0.0)[0]
        before, w_bytes, deq_scratch = _base_pass("dX", plan, n, k, act, absmax, nested, offset, blocksize)
        if plan == plans.LIBRARY:  # the dropped LoRA term written, then cuBLAS accumulates dY·deq(W) into it
            term = Kernel("dX = (dH·A)⊙mask", 2.0 * m * k * rank, m * k * act + small + rank * k * act)
            gemm = Kernel("dX += dY·deq(W) (cuBLAS)", 2.0 * m * k * n, dy + w_bytes + 2 * m * k * act)
            kernels += [*before, term, gemm]
        else:
            kernels += [*before, Kernel("dX = dY·deq(W) + (dH·A)⊙mask", 2.0 * m * k * n + 2.0 * m * k * rank,
                                        dy + w_bytes + small + rank * k * act + m * k * act)]  # fmt: skip
        scratch += deq_scratch
    if needs_da:
        splits = da_splits(m, k, rank)
        # Split over M: fp32 partials written, then read back by each tile's last program (same launch).
        partials = 2 * splits * rank * k * 4 if splits > 1 else 0
        kernels.append(Kernel("dA = dHᵀ·drop(X)", 2.0 * rank * k * m, small + m * k * act + rank * k * act + partials))
        scratch = max(scratch, small + partials // 2)
    return kernels, scratch


def _nf4_matmul(call: OpCall):
    x, _, absmax, nested, offset, _, out_features, in_features = call.args[:8]
    m = x.numel() // x.shape[-1]
    act = x.element_size()
    dense = out_features * in_features * act
    return [
        Kernel("deq(W)", 0.0, _nf4_bytes(out_features, in_features, absmax, nested, offset) + dense),
        Kernel("X·deq(W)ᵀ", 2.0 * m * out_features * in_features, storage_bytes([x]) + dense + call.write_bytes()),
    ], dense


def bnb_uses_fused_kernel(m: int, n: int, k: int, dtype: torch.dtype, blocksize: int) -> bool:
    """``bitsandbytes.backends.cuda.ops._gemm_4bit_use_custom_cuda`` for an sm90 GPU with 132 SMs."""
    if m > 1536 or k % blocksize:
        return False
    if m <= 4:
        return True
    sms, n_blocks = H200_SMS, (n + 63) // 64
    if dtype == torch.float32:
        return m < 8
    if n * k < 4 * 1024 * 1024:
        if k * 2 < n:
            return m <= (512 if n_blocks * 3 < sms else 320)
        if n_blocks * 4 <= sms:
            return m <= 32
        return m <= 16 if n_blocks * 2 <= sms else False
    if m > 512:
        return False
    if m < 8:
        if m >= 6 and n_blocks >= 36 and k == n and n_blocks * 4 < sms * 3 and not n_blocks * 5 < sms * 3:
            return False
        return True
    if n_blocks >= sms * 3:
        return m <= 64
    if n_blocks >= sms * 2:
        return m <= 48
    if n_blocks >= sms:
        return m <= 32
    if n_blocks >= sms // 2:
        return False if (k >= n and n_blocks * 4 < sms * 3) else m <= 16
    return False


def _gemm_4bit(call: OpCall):
    a = call.args[0]
    n, k = call.args[2]
    absmax, blocksize = call.args[3], call.args[4]
    bias = call.arg("bias")
    absmax_8bit, code, offset = call.arg("absmax_8bit"), call.arg("absmax_code"), call.arg("absmax_offset")
    m = a.numel() // a.shape[-1]
    act = a.element_size()
    blocks = _cdiv(n * k, blocksize)
    scales = _nbytes(absmax) + _nbytes(absmax_8bit) + _nbytes(code) + _nbytes(offset)
    io = storage_bytes([a]) + _nbytes(bias) + m * n * act
    if bnb_uses_fused_kernel(m, n, k, a.dtype, blocksize):
        return [Kernel("cgemm_4bit (fused)", 2.0 * m * n * k, _cdiv(n * k, 2) + scales + io)], 0
    kernels = []
    scratch = n * k * act
    if absmax_8bit is not None:
        kernels += [Kernel("dequantize_blockwise (absmax)", 0.0, blocks + _nbytes(absmax) + _nbytes(code) + blocks * 4),
                    Kernel("absmax + offset", 0.0, 2 * blocks * 4)]  # fmt: skip
        scratch += 2 * blocks * 4
    kernels += [
        Kernel("dequantize_4bit", 0.0, _cdiv(n * k, 2) + blocks * 4 + n * k * act),
        Kernel("F.linear (cuBLAS)", 2.0 * m * n * k + (m * n if bias is not None else 0), n * k * act + io),
    ]
    return kernels, scratch


def _gemv_4bit(call: OpCall):
    a = call.args[0]
    n, k = call.args[2]
    return [Kernel("gemv_4bit", 2.0 * (a.numel() // a.shape[-1]) * n * k, call.read_bytes() + call.write_bytes())]


def _one_kernel(call: OpCall):
    return [Kernel(call.name, 0.0, call.read_bytes() + call.write_bytes())]


def _linear_cross_entropy(call: OpCall):
    """``kernels/cross_entropy.py``: per chunk of rows the logits GEMM, the rows kernel (two passes over
    the logits, the second writing d(loss)/d(logits) in place), dX = dlogits·W (and dW when W trains);
    the denominator (compare, sum, reciprocal) before and the loss sum after."""
    from peft_fast.kernels.cross_entropy import chunk_rows_for

    hidden, weight, bias, labels = call.args[:4]
    needs_h, needs_w = bool(call.args[8]), bool(call.args[9])
    n, h = hidden.shape
    v = weight.shape[0]
    act = hidden.element_size()
    rows = max(1, min(call.args[7] or chunk_rows_for(n, v, act, needs_w), n))
    w_bytes, lab = v * h * act, labels.element_size()
    kernels = [Kernel("labels != ignore_index", 0.0, n * (lab + 1)), Kernel("count", 0.0, n + 8),
               Kernel("1 / count", 0.0, 16)]  # fmt: skip
    write_grad = needs_h or needs_w
    for start in range(0, n, rows):
        r = min(rows, n - start)
        logits = r * v * act
        kernels.append(Kernel("logits = X·Wᵀ (chunk)", 2.0 * r * v * h, r * h * act + w_bytes + logits))
        kernels.append(Kernel("loss rows (+ dlogits in place)", 0.0, (3 if write_grad else 1) * logits + r * (lab + 4)))
        if needs_h:
            kernels.append(Kernel("dX = dlogits·W (chunk)", 2.0 * r * v * h, logits + w_bytes + r * h * act))
        if needs_w:
            kernels.append(Kernel("dW += dlogitsᵀ·X (chunk)", 2.0 * r * v * h, logits + r * h * act + 2 * w_bytes))
    kernels += [Kernel("loss sum", 0.0, n * 4 + 4), Kernel("loss / count", 0.0, 12)]
    del bias
    return kernels, rows * (-(-v // 64) * 64) * act + n * 4


def _rms_norm_backward(call: OpCall):
    """One kernel; with dW (a trained norm) its per-program fp32 partials (~one per SM) are summed and cast."""
    kernels = _one_kernel(call)
    dw = call.returned()[1]
    if dw.numel():
        partials = H200_SMS * dw.numel() * 4
        kernels += [Kernel("dW partials sum", 0.0, partials + dw.numel() * 4),
                    Kernel("dW cast", 0.0, dw.numel() * (4 + dw.element_size()))]  # fmt: skip
    return kernels


RULES = {
    "peft_fast.lora_linear": _lora_linear,
    "peft_fast.lora_linear_backward": _lora_linear_backward,
    "peft_fast.nf4_matmul": _nf4_matmul,
    "bitsandbytes.gemm_4bit": _gemm_4bit,
    "bitsandbytes.gemv_4bit": _gemv_4bit,
    "bitsandbytes.dequantize_4bit": _one_kernel,
    "bitsandbytes.dequantize_blockwise": _one_kernel,
    "bitsandbytes.quantize_4bit": _one_kernel,
    "peft_fast.linear_cross_entropy": _linear_cross_entropy,
    "peft_fast.rms_norm_backward": _rms_norm_backward,
}

# FLOPs of custom ops priced by the generic bytes rule (inputs + outputs) that do matmul work.
CUSTOM_FLOPS: dict[str, Callable[[OpCall], float]] = {
    "peft_fast.ia3_linear": lambda call: 2.0 * call.args[0].numel() * call.returned()[0].shape[-1],
    "peft_fast.bottleneck_adapter": lambda call: 4.0 * call.args[0].numel() * call.args[4].shape[0],
}  # fmt: skip
