"""Triton kernel: fused linear cross-entropy (lm_head GEMM + causal-LM loss) without the [tokens × vocab] logits.

The loss Hugging Face computes in a causal LM's forward with labels, ``ForCausalLMLoss`` of
``logits = hidden·Wᵀ + b`` (optionally soft-capped, Gemma 2's ``cap·tanh(logits / cap)``), is
computed over chunks of token rows whose logits fit a small budget (:func:`chunk_rows_for`):

1. ``logits = hidden[chunk]·Wᵀ (+ b)``: a library GEMM in the compute dtype (fp32 accumulation,
   rounded once to that dtype, as HF's logits are), into one reused chunk buffer (rows padded
   to 64 elements, so that they are 16-byte aligned for any vocabulary size);
2. ``_cross_entropy_rows_kernel``, one program per row, loops over the vocabulary in blocks:
   pass 1 an online max and sum of exponentials in fp32 (fp64 for fp64 logits), the row's loss
   ``log Σ exp(z − max) − (z[label] − max)`` (torch's log_softmax order); pass 2 overwrites the
   row in place with d(loss)/d(logits) = ``(softmax − onehot(label))·scale`` (× ``1 − tanh²``
   when capped), rounded to the compute dtype where autograd rounds HF's, and 0 for rows whose
   label is ``ignore_index`` (never read);
3. ``grad_hidden[chunk] = dlogits·W``, ``grad_weight += dlogitsᵀ·hidden[chunk]`` and
   ``grad_bias += Σ_rows dlogits`` (the last two only when W / b train): library GEMMs.

All gradients are computed in the forward (as Liger-Kernel's fused linear cross-entropy does), so
the backward only multiplies them by the loss's incoming gradient (a scalar). Without gradients
(``no_grad``, eval) pass 2 and step 3 are skipped. ``scale`` is 1/denominator: the number of
non-ignored tokens (HF's "mean"), or ``num_items_in_batch`` (HF's "sum" divided by it); it is read
from a device tensor, so nothing synchronises with the host.

Live memory beyond the inputs and the returned gradients: one [chunk, V] logits buffer in the
compute dtype and an fp32 loss per token (the torch reference adds an fp32 copy of the chunk for
bf16 / fp16, and under a softcap two more chunk-sized tensors).

The torch reference (:func:`linear_cross_entropy_reference_forward`, the op's ``torch-cpu``
backend) runs the same chunk loop with the row math in torch, so CPU memory stays bounded too.
Labels outside [0, V) that are not ``ignore_index`` give a NaN loss on both (HF raises instead;
a device-side check would cost a host synchronisation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peft_fast.kernels.common import _INTERPRET

__all__ = [
    "chunk_rows_for",
    "cross_entropy_rows_",
    "cross_entropy_rows_reference_",
    "linear_cross_entropy_forward",
    "linear_cross_entropy_reference_forward",
]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Logits of one chunk, in bytes: 64 MiB is 256 bf16 rows of Llama-3's 128256-token vocabulary,
# 6.25% of the 1.05 GB of fp32 logits of 2048 tokens (the unfused loss holds those, their bf16
# original and their log-softmax, and in backward their gradient).
_CHUNK_LOGITS_BYTES = 64 * 2**20
# Each chunk re-reads W (V·H elements) in each GEMM, which does 2·rows·V·H FLOPs: rows FLOPs per
# byte of bf16 W. H200's ridge is 790 TFLOP/s / 4.3 TB/s ≈ 184, so ≥ 256 rows keep the GEMMs
# compute-bound whatever the budget says. dW's GEMM also reads and writes its [V, H] accumulator
# each chunk (rows / 2 FLOPs per byte): 512 rows when W trains.
_MIN_CHUNK_ROWS = 256
_MIN_CHUNK_ROWS_WEIGHT_TRAINS = 512
# Bytes of logits a program streams per loop iteration: 8192 bf16 over 8 warps is 32 elements,
# four independent 16-byte loads per thread, ~32 KB in flight per SM at two programs per SM
# (a 256-row chunk over 132 SMs): about what Little's law asks of HBM3e's latency.
_BLOCK_BYTES = 16384
_ELEMENTS_PER_THREAD = 32
_MAX_WARPS = 8
# Registers per thread, capped so that two 8-warp programs fit an SM (64K registers): the compiler
# takes up to 207 for a vocabulary with a ragged tail block (50257), 127 for 128256. At 128 the
# sm_90 builds spill nothing in any loop (8 stack bytes outside them for a ragged tail + softcap).
_MAX_REGISTERS = 128
# The chunk buffer's rows are padded to a multiple of this many elements (128 bytes of bf16), so
# every row of any vocabulary (GPT-2's 50257, one resized for added tokens) starts 16-byte aligned
# and its whole blocks load and store in 16-byte vectors; the GEMMs write through the row stride.
_ROW_ALIGN = 64


# Triton 3.9's interpreter truncates fp32 -> bf16 (the GPU's cvt.rn rounds to nearest even), which
# would bias every emulated HF rounding: there the rounding is done on the bits instead.
_BF16_ROUNDING_ON_BITS = tl.constexpr(_INTERPRET)


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` to nearest even, as torch (and the GPU's conversion) round."""
    if _BF16_ROUNDING_ON_BITS and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: the low 16 bits are 0
    else:
        return x.to(dtype)


@triton.jit
def _tanh(a, FP64: tl.constexpr):
    """tanh(a) from exp (tl has no tanh and the interpreter cannot call libdevice).

    ``(1 − e^{−2|a|}) / (1 + e^{−2|a|})`` loses relative precision near 0 (1 − e cancels): below
    |a| = 1/4 fp32 takes the Taylor series to a⁹ instead (truncation < 1e-8 relative); fp64's
    cancellation error, 1e-16 absolute, is below what its tests resolve (and fp64 divides exactly).
    """
    magnitude = tl.abs(a)
    e = tl.exp(-2.0 * magnitude)
    if FP64:
        t = (1.0 - e) / (1.0 + e)
    else:
        # div.approx (2 ulp, as CUDA's tanhf): IEEE division is a dozen instructions per element.
        t = tl.fdiv(1.0 - e, 1.0 + e, approx=True)
        a2 = a * a
        series = magnitude * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
        t = tl.where(magnitude < 0.25, series, t)
    return tl.where(a < 0, -t, t)


@triton.jit
def _divide_by_cap(x, softcap, inv_softcap, FP64: tl.constexpr):
    """x / cap as torch computes it on CUDA for a scalar divisor, x·(1/cap) in fp32; fp64 divides."""
    if FP64:
        return x / softcap
    else:
        return x * inv_softcap


@triton.jit
def _capped_logits(raw, softcap, inv_softcap, HAS_SOFTCAP: tl.constexpr, FP64: tl.constexpr):
    """(z, t): the logits HF's loss sees, in fp32 (fp64), and tanh(logits / cap) (unused without a cap).

    Gemma 2's ``logits / cap``, ``tanh``, ``· cap`` are three torch ops on the compute-dtype
    logits, each rounded to that dtype: so are they here (no-ops for fp32 / fp64 logits).
    """
    acc = tl.float64 if FP64 else tl.float32
    z = raw.to(acc)
    if HAS_SOFTCAP:
        a = _round_to(_divide_by_cap(z, softcap, inv_softcap, FP64), raw.dtype).to(acc)
        t = _round_to(_tanh(a, FP64), raw.dtype).to(acc)
        z = _round_to(t * softcap, raw.dtype).to(acc)
    else:
        t = z
    return z, t


@triton.jit
def _load_block(row_ptr, v0, cols, V, softcap, inv_softcap, HAS_SOFTCAP: tl.constexpr, FP64: tl.constexpr,
                MASKED: tl.constexpr):  # fmt: skip
    """(z, t) of logits [v0, v0 + BLOCK_V) of a row (see _capped_logits); lanes past V get z = -inf.

    Only the tail block is masked: an unmasked load of an aligned row is 16-byte vectors whatever
    V is (a mask against a V the compiler cannot prove divisible by 8 splits them into 2-byte loads).
    """
    if MASKED:
        mask = v0 + cols < V
        raw = tl.load(row_ptr + v0 + cols, mask=mask, other=0.0)
        z, t = _capped_logits(raw, softcap, inv_softcap, HAS_SOFTCAP, FP64)
        z = tl.where(mask, z, float("-inf"))  # after the cap: a capped -inf would be -cap
    else:
        raw = tl.load(row_ptr + v0 + cols)
        z, t = _capped_logits(raw, softcap, inv_softcap, HAS_SOFTCAP, FP64)
    return z, t


@triton.jit
def _online_update(z, m, lane_sums):
    """The running max m (one block reduction) and, per lane, Σ exp(z − m), rescaled when m grows."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    return m_new, lane_sums * tl.exp(m - m_new) + tl.exp(z - m_new)


@triton.jit
def _store_grad_block(row_ptr, v0, cols, V, label, m, log_s, scale, softcap, inv_softcap,
                      HAS_SOFTCAP: tl.constexpr, FP64: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """Logits [v0, v0 + BLOCK_V) overwritten with (softmax − onehot)·scale (· (1 − tanh²) under a cap)."""
    acc = tl.float64 if FP64 else tl.float32
    elem_ty = row_ptr.dtype.element_ty
    z, t = _load_block(row_ptr, v0, cols, V, softcap, inv_softcap, HAS_SOFTCAP, FP64, MASKED)
    p = tl.exp((z - m) - log_s)
    grad = tl.where(v0 + cols == label, p - 1.0, p) * scale
    if HAS_SOFTCAP:
        # Autograd through HF's `· cap`, tanh, `/ cap`, each backward rounded to the logits' dtype.
        grad = _round_to(_round_to(grad, elem_ty).to(acc) * softcap, elem_ty).to(acc)
        grad = _divide_by_cap(_round_to(grad * (1.0 - t * t), elem_ty).to(acc), softcap, inv_softcap, FP64)
    if MASKED:
        tl.store(row_ptr + v0 + cols, _round_to(grad, elem_ty), mask=v0 + cols < V)
    else:
        tl.store(row_ptr + v0 + cols, _round_to(grad, elem_ty))


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, labels_ptr, loss_ptr, grad_scale_ptr,
    V, row_stride, ignore_index, softcap, inv_softcap,
    HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, FP64: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Row pid's loss, and (WRITE_GRAD) the row overwritten with d(loss)/d(logits).

    ``logits_ptr`` is [rows, V] with unit column stride and ``row_stride`` between rows (the op's
    buffer pads it to a multiple of 64, so every row starts 16-byte aligned); ``labels_ptr``
    int64 [rows]; ``loss_ptr`` [rows] fp32 (fp64); ``grad_scale_ptr`` one value, the reduction's
    1/denominator. Each loop runs over the whole blocks unmasked, then the tail block masked.
    """
    acc = tl.float64 if FP64 else tl.float32
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    cols = tl.arange(0, BLOCK_V)
    v_whole = V - V % BLOCK_V
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        # An ignored row adds nothing to the loss and gets a zero gradient: never read.
        tl.store(loss_ptr + row, tl.zeros((), dtype=acc))
        if WRITE_GRAD:
            zeros = tl.zeros((BLOCK_V,), dtype=logits_ptr.dtype.element_ty)
            for v0 in range(0, v_whole, BLOCK_V):
                tl.store(row_ptr + v0 + cols, zeros)
            if v_whole < V:
                tl.store(row_ptr + v_whole + cols, zeros, mask=v_whole + cols < V)
    else:
        # Pass 1: per-lane sums of exp(z − m) under the running max, summed once after the loop.
        m = tl.full((), float("-inf"), dtype=acc)
        lane_sums = tl.zeros((BLOCK_V,), dtype=acc)
        for v0 in range(0, v_whole, BLOCK_V):
            z, _ = _load_block(row_ptr, v0, cols, V, softcap, inv_softcap, HAS_SOFTCAP, FP64, False)
            m, lane_sums = _online_update(z, m, lane_sums)
        if v_whole < V:
            z, _ = _load_block(row_ptr, v_whole, cols, V, softcap, inv_softcap, HAS_SOFTCAP, FP64, True)
            m, lane_sums = _online_update(z, m, lane_sums)
        # log_softmax as torch computes it, (z − max) − log Σ: m + log Σ would round away low bits of log Σ.
        log_s = tl.log(tl.sum(lane_sums, axis=0))
        # A label outside [0, V) gives NaN (loud, without a host synchronisation).
        in_range = (label >= 0) & (label < V)
        raw_target = tl.load(row_ptr + label, mask=in_range, other=0.0)
        z_target, _ = _capped_logits(raw_target, softcap, inv_softcap, HAS_SOFTCAP, FP64)
        tl.store(loss_ptr + row, tl.where(in_range, log_s - (z_target - m), float("nan")))
        if WRITE_GRAD:
            # Pass 2, in place.
            scale = tl.load(grad_scale_ptr).to(acc)
            for v0 in range(0, v_whole, BLOCK_V):
                _store_grad_block(row_ptr, v0, cols, V, label, m, log_s, scale, softcap, inv_softcap,
                                  HAS_SOFTCAP, FP64, False)  # fmt: skip
            if v_whole < V:
                _store_grad_block(row_ptr, v_whole, cols, V, label, m, log_s, scale, softcap, inv_softcap,
                                  HAS_SOFTCAP, FP64, True)  # fmt: skip


# -- launchers --------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel or GEMM writes comes from here (tests poison it to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 logits (gradcheck, exact comparisons), else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_shape(v: int, element_size: int, block_v: int | None = None) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of v logits of ``element_size`` bytes (see _BLOCK_BYTES);
    ``block_v`` given: that block, with the warps that give each thread _ELEMENTS_PER_THREAD."""
    if block_v is None:
        block_v = min(triton.next_power_of_2(v), _BLOCK_BYTES // element_size)
    return block_v, max(1, min(_MAX_WARPS, block_v // (32 * _ELEMENTS_PER_THREAD)))


def chunk_rows_for(n: int, v: int, element_size: int, weight_trains: bool = False) -> int:
    """Token rows per chunk: the largest power of two whose logits fit _CHUNK_LOGITS_BYTES, ≥ the
    rows that keep the GEMMs compute-bound (256, 512 when W trains), at most ``n`` (≥ 1).

    Liger-Kernel takes next_pow2(ceil(N / ceil(V / H))) (a chunk of logits as large as the hidden
    states: 64 rows for Llama-3-8B at N = 2048), which re-reads W every 64 rows: 64 FLOPs per byte,
    a third of H200's ridge, so its GEMMs are W-bandwidth-bound. Here 256 rows (65.7 MB of bf16
    logits for Llama-3) are as many GEMM FLOPs per W byte as the ridge wants.
    """
    budget = max(1, _CHUNK_LOGITS_BYTES // max(1, v * element_size))
    rows = max(1 << (budget.bit_length() - 1), _MIN_CHUNK_ROWS_WEIGHT_TRAINS if weight_trains else _MIN_CHUNK_ROWS)
    return max(1, min(rows, n))


def _check_rows(logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor, grad_scale: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1 or logits.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"logits must be a float [rows, V] tensor with unit column stride, got {logits.dtype} "
                         f"{tuple(logits.shape)} strides {logits.stride()}")  # fmt: skip
    rows = logits.shape[0]
    if labels.shape != (rows,) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 [{rows}], got {labels.dtype} {tuple(labels.shape)}")
    acc = _math_dtype(logits.dtype)
    if losses.shape != (rows,) or losses.dtype != acc or not losses.is_contiguous():
        raise ValueError(f"losses must be a contiguous {acc} [{rows}], got {losses.dtype} {tuple(losses.shape)}")
    if grad_scale.numel() != 1 or grad_scale.dtype != acc:
        raise ValueError(f"grad_scale must be one {acc} value, got {grad_scale.dtype} {tuple(grad_scale.shape)}")
    devices = {str(t.device) for t in (logits, labels, losses, grad_scale)}
    if len(devices) > 1:
        raise ValueError(f"all operands must be on one device, got {sorted(devices)}")


def cross_entropy_rows_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    losses: torch.Tensor,
    grad_scale: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    write_grad: bool,
    block_v: int | None = None,
) -> None:
    """Each row's loss into ``losses``; with ``write_grad`` the logits overwritten by d(loss)/d(logits).

    Args:
        logits: [rows, V] (fp32, fp16, bf16, fp64), unit column stride; the softcap (if any) is
            applied here, to the raw ``hidden·Wᵀ + b``. Read only without ``write_grad``.
        labels: int64 [rows], already shifted; ``ignore_index`` rows get loss 0 and gradient 0.
        losses: contiguous [rows] fp32 (fp64 for fp64 logits), written.
        grad_scale: one value of that dtype, multiplied into every gradient (1/denominator).
        softcap: Gemma 2's final-logit cap, or None; read as fp32 (30.0 and 50.0 are exact). fp32
            math multiplies by its reciprocal where HF divides, as torch on CUDA does for a scalar.
        block_v: vocabulary entries per loop iteration (a power of two); None picks it from V.
    """
    _check_rows(logits, labels, losses, grad_scale)
    if logits.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 at import), got {logits.device}")
    rows, v = logits.shape
    if rows == 0:
        return
    block_v, num_warps = _launch_shape(v, logits.element_size(), block_v)
    cap = 1.0 if softcap is None else float(softcap)
    # Grid: one program per row; each streams its row twice (pass 2 only with write_grad).
    _cross_entropy_rows_kernel[(rows,)](
        logits, labels, losses, grad_scale,
        v, logits.stride(0) if rows > 1 else 0, int(ignore_index), cap, 1.0 / cap,
        HAS_SOFTCAP=softcap is not None, WRITE_GRAD=write_grad, FP64=logits.dtype == torch.float64,
        BLOCK_V=block_v, num_warps=num_warps, maxnreg=_MAX_REGISTERS,
    )  # fmt: skip


def cross_entropy_rows_reference_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    losses: torch.Tensor,
    grad_scale: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    write_grad: bool,
) -> None:
    """The torch reference of :func:`cross_entropy_rows_`, same contract.

    The row math is done in place on an fp32 (fp64) copy of the chunk, which for fp32 / fp64
    logits is the logits buffer itself. The softcap runs as HF's three torch ops on the
    compute-dtype logits and its backward as autograd's, keeping tanh and one more chunk-sized
    tensor alive.
    """
    _check_rows(logits, labels, losses, grad_scale)
    acc = _math_dtype(logits.dtype)
    tanh = None
    if softcap is not None:
        tanh = (logits / softcap).tanh_()
        z = (tanh * softcap).to(acc)
    else:
        z = logits.to(acc)
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < z.shape[1])
    index = torch.where(in_range, labels, 0).unsqueeze(1)
    target = torch.where(in_range, z.gather(1, index).squeeze(1), float("nan"))
    row_max = z.amax(1, keepdim=True)
    if not write_grad:
        # The same ops as the gradient pass below (not torch.logsumexp, whose rounding differs by
        # CPU), out of place: the logits are read only here. no_grad and grad give one loss.
        sum_exp = (z - row_max).exp_().sum(1, keepdim=True)
        losses.copy_(torch.where(ignored, 0.0, sum_exp.log().squeeze(1) - (target - row_max.squeeze(1))))
        return
    z.sub_(row_max).exp_()  # z: exp(z − max)
    sum_exp = z.sum(1, keepdim=True)
    losses.copy_(torch.where(ignored, 0.0, sum_exp.log().squeeze(1) - (target - row_max.squeeze(1))))
    z.div_(sum_exp)  # softmax
    z.scatter_add_(1, index, -(in_range & ~ignored).to(acc).unsqueeze(1))
    z.mul_(torch.where(ignored, 0.0, grad_scale.reshape(())).unsqueeze(1))
    if tanh is None:
        if z is not logits:
            logits.copy_(z)
        return
    # Autograd's own backward ops through HF's `· cap`, tanh and `/ cap`, in the logits' dtype.
    grad = z.to(logits.dtype).mul_(softcap)
    torch.ops.aten.tanh_backward.grad_input(grad, tanh, grad_input=logits)
    logits.div_(softcap)


# -- the chunk loop (both backends) ---------------------------------------------------------------


def _check_operands(hidden, weight, bias, labels, num_items) -> None:
    """Raises ValueError / TypeError naming the first problem with the operands."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or hidden.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"hidden must be a float [N, H] tensor, got {getattr(hidden, 'shape', type(hidden).__name__)}")
    n, h = hidden.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != h or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, {h}] with V > 0, got {getattr(weight, 'shape', None)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype ({hidden.dtype}), got {weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must be [{weight.shape[0]}] in {hidden.dtype}, got {bias.dtype} {tuple(bias.shape)}")
    if labels.shape != (n,) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 [{n}], got {labels.dtype} {tuple(labels.shape)}")
    if num_items is not None and num_items.numel() != 1:
        raise ValueError(f"num_items must be one value, got shape {tuple(num_items.shape)}")
    devices = {str(t.device) for t in (hidden, weight, bias, labels) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all operands must be on one device, got {sorted(devices)}")


def _chunked_forward(rows_fn, hidden, weight, bias, labels, num_items, ignore_index, softcap, chunk_rows,
                     needs_grad_hidden, needs_grad_weight, needs_grad_bias):  # fmt: skip
    _check_operands(hidden, weight, bias, labels, num_items)
    n, h = hidden.shape
    v = weight.shape[0]
    dtype, device = hidden.dtype, hidden.device
    acc = _math_dtype(dtype)
    labels = labels.contiguous()
    # HF's reduction: "mean" over non-ignored tokens (NaN when there are none, as HF), or "sum"
    # divided by num_items_in_batch (how Trainer makes gradient accumulation exact).
    denominator = (labels != ignore_index).sum().to(acc) if num_items is None else num_items.reshape(()).to(device, acc)
    grad_scale = (1.0 / denominator).reshape(1)
    write_grad = needs_grad_hidden or needs_grad_weight or needs_grad_bias
    rows = chunk_rows if chunk_rows > 0 else chunk_rows_for(n, v, hidden.element_size(), needs_grad_weight)
    rows = max(1, min(rows, n))
    logits_buffer = _empty((rows, triton.cdiv(v, _ROW_ALIGN) * _ROW_ALIGN), dtype, device)
    losses = _empty((n,), acc, device)
    grad_hidden = _empty((n, h), dtype, device) if needs_grad_hidden else None
    grad_weight = _empty((v, h), dtype, device) if needs_grad_weight else None
    grad_bias = torch.zeros((v,), dtype=acc, device=device) if needs_grad_bias else None
    if n == 0 and grad_weight is not None:
        grad_weight.zero_()
    weight_t = weight.t()
    for start in range(0, n, rows):
        end = min(start + rows, n)
        hidden_chunk = hidden[start:end]
        logits = logits_buffer[: end - start, :v]
        # F.linear's own GEMM (addmm with the bias, mm without), rounded once to the compute dtype.
        if bias is None:
            torch.mm(hidden_chunk, weight_t, out=logits)
        else:
            torch.addmm(bias, hidden_chunk, weight_t, out=logits)
        rows_fn(logits, labels[start:end], losses[start:end], grad_scale, ignore_index, softcap, write_grad)
        if needs_grad_hidden:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if needs_grad_weight:
            # Accumulated in the compute dtype (an fp32 [V, H] would outweigh the logits chunk):
            # one rounding per chunk, and chunks are few (≥ 512 rows when W trains).
            if start == 0:
                torch.mm(logits.t(), hidden_chunk, out=grad_weight)
            else:
                grad_weight.addmm_(logits.t(), hidden_chunk)
        if needs_grad_bias:
            grad_bias += logits.sum(0, dtype=acc)
    loss = losses.sum() / denominator
    return loss, grad_hidden, grad_weight, None if grad_bias is None else grad_bias.to(dtype)


def linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    num_items: torch.Tensor | None,
    ignore_index: int,
    softcap: float | None,
    chunk_rows: int,
    needs_grad_hidden: bool,
    needs_grad_weight: bool,
    needs_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(loss, grad_hidden, grad_weight, grad_bias) of HF's causal-LM loss of ``hidden·Wᵀ + b``, by chunks.

    Args:
        hidden: [N, H] (fp32, fp16, bf16, fp64), the compute dtype; weight: [V, H] and bias: [V]
            or None, in that dtype.
        labels: int64 [N], already shifted (HF's ``shift_labels``), ``ignore_index`` where no loss.
        num_items: None for the mean over non-ignored tokens, else one value: the sum is divided by it.
        softcap: Gemma 2's final-logit cap, or None.
        chunk_rows: token rows per chunk; 0 picks :func:`chunk_rows_for`.
        needs_grad_*: which gradients to compute (none: the loss only, no gradient pass).

    loss is a 0-d fp32 (fp64 for fp64 hidden) tensor; the gradients are those of the loss itself
    (the caller multiplies them by the loss's gradient), in hidden's dtype, None where not needed.
    """
    return _chunked_forward(cross_entropy_rows_, hidden, weight, bias, labels, num_items, ignore_index, softcap,
                            chunk_rows, needs_grad_hidden, needs_grad_weight, needs_grad_bias)  # fmt: skip


def linear_cross_entropy_reference_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    num_items: torch.Tensor | None,
    ignore_index: int,
    softcap: float | None,
    chunk_rows: int,
    needs_grad_hidden: bool,
    needs_grad_weight: bool,
    needs_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The torch reference of :func:`linear_cross_entropy_forward` (and the op's torch backend): the same
    chunk loop and GEMMs, the row math in torch (:func:`cross_entropy_rows_reference_`)."""
    return _chunked_forward(cross_entropy_rows_reference_, hidden, weight, bias, labels, num_items, ignore_index,
                            softcap, chunk_rows, needs_grad_hidden, needs_grad_weight, needs_grad_bias)  # fmt: skip
