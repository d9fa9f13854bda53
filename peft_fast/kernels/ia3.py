"""Triton kernels: a linear layer with (IA)³ scaling, over a dense or NF4 base weight, forward and backward.

(IA)³ multiplies a learned vector l into a frozen linear layer, as Hugging Face PEFT does:

* output scaling (attention k / v):        ``Y = (X·deq(W)ᵀ + b) ⊙ l``,  l [N]
* input scaling (``feedforward_modules``): ``Y = (X ⊙ l)·deq(W)ᵀ + b``,  l [K]

Both are one GEMM with the scale fused in: input scaling in the prologue (each X tile is scaled
in fp32 and rounded to X's dtype, as PEFT's ``(x * l).to(x.dtype)``), output scaling in the
epilogue after the bias. W is dequantized tile by tile in registers (``_load_weight_tile`` of the
LoRA kernels); deq(W) never exists in memory.

* ``_ia3_linear_fwd_kernel`` Y, and for output scaling also Y0 = X·deq(W)ᵀ + b, the unscaled
  output that the gradient of l needs (PEFT's autograd keeps the same tensor).
* ``_ia3_linear_dx_kernel``  dX = (dY ⊙ l)·deq(W) for output scaling, (dY·deq(W)) ⊙ l for input
  scaling, with the gradient of l from the same pass, as per-row-block partial sums reduced by
  torch in a fixed order: Σ_m dY ⊙ Y0 (output scaling; the programs of the first K block add it
  while they stream dY) or Σ_m X ⊙ (dY·deq(W)) (input scaling; every program for its own tile).

Saved for backward: Y0 (output scaling) or X (input scaling), besides l and the weight itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peft_fast.kernels.common import _DOT_PRECISION, _INTERPRET, _SUPPORTED_DTYPES, _dot, _grouped_tile, _m_bucket
from peft_fast.kernels.lora_gemms import _GEMM_CONFIGS
from peft_fast.kernels.lora_linear import _dense_base_for
from peft_fast.kernels.nf4_tiles import _base_args, _compile_options, _load_weight_tile
from peft_fast.nf4 import NF4Weight, dequantize_nf4

__all__ = [
    "ia3_linear_backward",
    "ia3_linear_forward",
    "ia3_linear_reference_backward",
    "ia3_linear_reference_forward",
]


@triton.autotune(configs=_GEMM_CONFIGS, key=["m_bucket", "N", "K"])
@triton.jit
def _ia3_linear_fwd_kernel(
    x_ptr, w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr,
    l_ptr, bias_ptr, y_ptr, y0_ptr,
    M, N, K, m_bucket,
    IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    BLOCKS_IN_ROWS: tl.constexpr, SCALE_INPUT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Y tile = (X ⊙ l)·deq(W)ᵀ + b (SCALE_INPUT) or (X·deq(W)ᵀ + b) ⊙ l, writing Y0 for the latter."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m[:, None].to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows * K + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        if SCALE_INPUT:
            l_in = tl.load(l_ptr + offs_k, mask=offs_k < K, other=0.0)
            x = (x.to(tl.float32) * l_in[None, :]).to(x.dtype)
        w_t = _load_weight_tile(
            w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr,
            offs_n[None, :], offs_k[:, None], k0, N, K,
            IS_NF4, DOUBLE_QUANT, BLOCKSIZE, NESTED, BLOCKS_IN_ROWS, BLOCK_K,
        )  # fmt: skip
        acc = _dot(x, w_t.to(x.dtype), acc, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if not SCALE_INPUT:
        tl.store(y0_ptr + rows * N + offs_n[None, :], acc.to(y0_ptr.dtype.element_ty), mask=y_mask)
        acc = acc * tl.load(l_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    tl.store(y_ptr + rows * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


# The dl partial sums are per BLOCK_M rows and the candidates differ in BLOCK_M: the autotuner
# zeroes the buffer before every trial and before the real run, so no trial leaves rows behind.
@triton.autotune(configs=_GEMM_CONFIGS, key=["m_bucket", "N", "K"], reset_to_zero=["dl_part_ptr"])
@triton.jit
def _ia3_linear_dx_kernel(
    dy_ptr, w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr,
    l_ptr, saved_ptr, dx_ptr, dl_part_ptr,
    M, N, K, m_bucket,
    IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    BLOCKS_IN_ROWS: tl.constexpr, SCALE_INPUT: tl.constexpr, STORE_DX: tl.constexpr, NEEDS_DL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dX tile (dequantizing W in the N loop) and row block pid_m's partial sums of dl.

    ``saved_ptr`` is Y0 [M, N] (output scaling) or X [M, K] (input scaling); ``dl_part_ptr`` is a
    [row blocks, N or K] fp32 buffer whose row pid_m this program (or, for output scaling, the
    program of the first K block) fills.
    """
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = offs_m[:, None].to(tl.int64)
    row_mask = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy_mask = row_mask & (offs_n[None, :] < N)
        dy = tl.load(dy_ptr + rows * N + offs_n[None, :], mask=dy_mask, other=0.0)
        if not SCALE_INPUT:
            if NEEDS_DL:
                # dl[n] = Σ_m dY[m, n]·Y0[m, n]: added by the first K block, which streams all of dY anyway.
                first_block = dy_mask & (offs_n[None, :] + pid_k * N < N)
                y0 = tl.load(saved_ptr + rows * N + offs_n[None, :], mask=first_block, other=0.0)
                dl = tl.sum(dy.to(tl.float32) * y0.to(tl.float32), axis=0)
                tl.store(dl_part_ptr + pid_m.to(tl.int64) * N + offs_n, dl, mask=offs_n + pid_k * N < N)
            # dY ⊙ l rounded to dY's dtype, as autograd through PEFT's multiply produces it.
            l_out = tl.load(l_ptr + offs_n, mask=offs_n < N, other=0.0)
            dy = (dy.to(tl.float32) * l_out[None, :]).to(dy.dtype)
        w = _load_weight_tile(
            w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr,
            offs_n[:, None], offs_k[None, :], pid_k * BLOCK_K, N, K,
            IS_NF4, DOUBLE_QUANT, BLOCKSIZE, NESTED, BLOCKS_IN_ROWS, BLOCK_K,
        )  # fmt: skip
        acc = _dot(dy, w.to(dy.dtype), acc, DOT_PRECISION)
    tile_mask = row_mask & (offs_k[None, :] < K)
    if SCALE_INPUT:
        if NEEDS_DL:
            x = tl.load(saved_ptr + rows * K + offs_k[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            tl.store(dl_part_ptr + pid_m.to(tl.int64) * K + offs_k, tl.sum(x * acc, axis=0), mask=offs_k < K)
        acc = acc * tl.load(l_ptr + offs_k, mask=offs_k < K, other=0.0)[None, :]
    if STORE_DX:
        tl.store(dx_ptr + rows * K + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty), mask=tile_mask)


# -- launchers --------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests poison it to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_inputs(x, base, ia3_scale, bias, scale_input: bool) -> tuple[int, int]:
    """(N, K) of the base; raises ValueError/TypeError naming the first problem with the operands."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [M, K], got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 at import), got {x.device}")
    if isinstance(base, NF4Weight):
        base_device = base.device
    elif isinstance(base, torch.Tensor):
        if base.dtype != x.dtype:
            raise TypeError(f"base weight must have the dtype of x ({x.dtype}), got {base.dtype}")
        base_device = base.device
    else:
        raise TypeError(f"base must be a torch.Tensor or an NF4Weight, got {type(base).__name__}")
    if len(base.shape) != 2:
        raise ValueError(f"base weight must be 2-D [N, K], got shape {tuple(base.shape)}")
    n, k = base.shape
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]} features but the base weight {tuple(base.shape)} expects K={k}")
    length = k if scale_input else n
    if not isinstance(ia3_scale, torch.Tensor) or ia3_scale.shape != (length,) or ia3_scale.dtype != torch.float32:
        what = "K (input scaling)" if scale_input else "N (output scaling)"
        raise ValueError(f"ia3_scale must be a float32 vector of {what} = {length} entries")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (n,):
            raise ValueError(f"bias must be 1-D with N={n} entries")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have the dtype of x ({x.dtype}), got {bias.dtype}")
    devices = {str(t.device) for t in (x, ia3_scale, bias) if t is not None} | {str(base_device)}
    if len(devices) > 1:
        raise ValueError(f"all operands must be on one device, got {sorted(devices)}")
    return n, k


def ia3_linear_forward(
    x: torch.Tensor,
    base: torch.Tensor | NF4Weight,
    ia3_scale: torch.Tensor,
    bias: torch.Tensor | None,
    scale_input: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, Y0): ``Y = (X ⊙ l)·deq(W)ᵀ + b`` (``scale_input``) or ``(X·deq(W)ᵀ + b) ⊙ l``.

    Args:
        x: activations [M, K] (fp32, fp16 or bf16); base: W [N, K], a tensor of x's dtype or an
            :class:`NF4Weight`; ia3_scale: l, fp32 [K] or [N]; bias: [N] in x's dtype, or None.

    Y0 = X·deq(W)ᵀ + b is returned for output scaling (the backward needs it) and is empty for
    input scaling.
    """
    n, k = _check_inputs(x, base, ia3_scale, bias, scale_input)
    x = x.contiguous()
    m = x.shape[0]
    y = _empty((m, n), x.dtype, x.device)
    y0 = _empty((0 if scale_input else m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return y, y0
    # Large M: dequantize W once into a scratch buffer and stream it dense (as lora_linear does).
    base = _dense_base_for(base.contiguous() if isinstance(base, torch.Tensor) else base, m, x.dtype)
    base_ptrs, base_meta = _base_args(base, x)
    # Grid: one program per [BLOCK_M, BLOCK_N] tile of Y, GROUP_M-swizzled for L2 reuse of W tiles;
    # the LoRA GEMM's autotuned tile set.
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _ia3_linear_fwd_kernel[grid](
        x, *base_ptrs, ia3_scale.contiguous(), x if bias is None else bias.contiguous(), y, x if scale_input else y0,
        m, n, k, _m_bucket(m),
        **base_meta, SCALE_INPUT=scale_input, HAS_BIAS=bias is not None, DOT_PRECISION=_DOT_PRECISION[x.dtype],
        **_compile_options(base),
    )  # fmt: skip
    return y, y0


def ia3_linear_backward(
    grad_y: torch.Tensor,
    saved: torch.Tensor,
    base: torch.Tensor | NF4Weight,
    ia3_scale: torch.Tensor,
    scale_input: bool,
    needs_dx: bool,
    needs_dl: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dX [M, K] in grad_y's dtype, dl fp32), None where not needed.

    ``saved`` is the forward's X for input scaling and its Y0 for output scaling. W gets no
    gradient; the bias's, Σ_m dY (⊙ l), is left to the caller.
    """
    m, n = grad_y.shape
    saved_cols = n if not scale_input else saved.shape[-1]
    _check_inputs(saved if scale_input else torch.empty(m, base.shape[1], dtype=grad_y.dtype, device=grad_y.device),
                  base, ia3_scale, None, scale_input)  # fmt: skip
    if grad_y.shape != (m, base.shape[0]) or saved.shape != (m, saved_cols) or saved.dtype != grad_y.dtype:
        raise ValueError(
            f"grad_y {tuple(grad_y.shape)} and the saved tensor {tuple(saved.shape)} ({saved.dtype}) do not fit "
            f"the base {tuple(base.shape)}"
        )
    k = base.shape[1]
    grad_y, saved = grad_y.contiguous(), saved.contiguous()
    if m == 0:
        dx = _empty((0, k), grad_y.dtype, grad_y.device) if needs_dx else None
        return dx, torch.zeros_like(ia3_scale) if needs_dl else None
    if not needs_dx and not scale_input:
        # Output scaling without dX: dl is a plain reduction, no GEMM needed.
        return None, (grad_y.float() * saved.float()).sum(0) if needs_dl else None
    if not (needs_dx or needs_dl):
        return None, None
    base = _dense_base_for(base.contiguous() if isinstance(base, torch.Tensor) else base, m, grad_y.dtype)
    base_ptrs, base_meta = _base_args(base, grad_y)
    dx = _empty((m, k) if needs_dx else (0, k), grad_y.dtype, grad_y.device)
    # Partial sums of dl, a row per BLOCK_M rows of X: sized for the smallest candidate BLOCK_M and
    # zero-filled, so that a config with larger blocks leaves zeros in the rows it does not use.
    row_blocks = triton.cdiv(m, min(c.kwargs["BLOCK_M"] for c in _GEMM_CONFIGS)) if needs_dl else 1
    dl_part = torch.zeros((row_blocks, k if scale_input else n), dtype=torch.float32, device=grad_y.device)
    # Grid: one program per [BLOCK_M, BLOCK_K] tile of dX (the N loop is the reduction).
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)
    _ia3_linear_dx_kernel[grid](
        grad_y, *base_ptrs, ia3_scale.contiguous(), saved, dx if needs_dx else grad_y, dl_part, m, n, k, _m_bucket(m),
        **base_meta, SCALE_INPUT=scale_input, STORE_DX=needs_dx, NEEDS_DL=needs_dl,
        DOT_PRECISION=_DOT_PRECISION[grad_y.dtype], **_compile_options(base),
    )  # fmt: skip
    return (dx if needs_dx else None), (dl_part.sum(0) if needs_dl else None)


def _base_matmul(x: torch.Tensor, base: torch.Tensor | NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x·Wᵀ + b computed exactly as nn.Linear (dense) or NF4Linear (NF4) compute it."""
    if not isinstance(base, NF4Weight):
        return torch.nn.functional.linear(x, base, bias)
    y = x @ dequantize_nf4(base, x.dtype).t()
    return y if bias is None else y + bias


def ia3_linear_reference_forward(
    x: torch.Tensor,
    base: torch.Tensor | NF4Weight,
    ia3_scale: torch.Tensor,
    bias: torch.Tensor | None,
    scale_input: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of :func:`ia3_linear_forward` (and the op's torch backend): (y, y0).

    The base matmul rounds as ``nn.Linear`` / ``NF4Linear`` do, so a vector of ones leaves the
    output bit-identical to the base layer's; l is applied in ``ia3_scale``'s dtype (fp32, or
    fp64 for fp64 x). y0 is the unscaled output (empty with ``scale_input``).
    """
    acc = ia3_scale.dtype
    if scale_input:
        return _base_matmul((x.to(acc) * ia3_scale).to(x.dtype), base, bias), x.new_empty(0)
    y0 = _base_matmul(x, base, bias)
    return (y0.to(acc) * ia3_scale).to(x.dtype), y0


def ia3_linear_reference_backward(
    grad_y: torch.Tensor,
    saved: torch.Tensor,
    base: torch.Tensor | NF4Weight,
    ia3_scale: torch.Tensor,
    scale_input: bool,
    needs_dx: bool,
    needs_dl: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The torch reference of :func:`ia3_linear_backward`: (dx, dl); ``saved`` is X (input scaling) or Y0."""
    acc = ia3_scale.dtype
    weight = dequantize_nf4(base, grad_y.dtype) if isinstance(base, NF4Weight) else base.to(grad_y.dtype)
    if scale_input:
        grad_in = grad_y @ weight
        dx = (grad_in.to(acc) * ia3_scale).to(grad_y.dtype) if needs_dx else None
        dl = (saved.to(acc) * grad_in.to(acc)).reshape(-1, weight.shape[1]).sum(0) if needs_dl else None
        return dx, dl
    dx = (grad_y.to(acc) * ia3_scale).to(grad_y.dtype) @ weight if needs_dx else None
    dl = (grad_y.to(acc) * saved.to(acc)).reshape(-1, weight.shape[0]).sum(0) if needs_dl else None
    return dx, dl
