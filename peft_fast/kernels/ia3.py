"""Triton kernels: a linear layer with (IA)³ scaling, over a dense or NF4 base weight, forward and backward.

(IA)³ multiplies a learned vector l into a frozen linear layer, as Hugging Face PEFT does:

* output scaling (attention k / v):        ``Y = (X·deq(W)ᵀ + b) ⊙ l``,  l [N]
* input scaling (``feedforward_modules``): ``Y = (X ⊙ l)·deq(W)ᵀ + b``,  l [K]

Both are one GEMM with the scale fused in: input scaling in the prologue (the general kernels
scale each X tile in fp32 and round it to X's dtype, as PEFT's ``(x * l).to(x.dtype)``; the row
GEMM scales W's columns instead, the same product rounded once), output scaling in the epilogue
after the bias. Which GEMM runs at a shape is the list of
:func:`peft_fast.kernels.plans.ia3_forward_plan` / :func:`~peft_fast.kernels.plans.ia3_backward_plan`,
run through a :class:`~peft_fast.kernels.choice.Choice` ("ia3_forward", "ia3_backward"): the
row-streaming NF4 GEMM of :mod:`peft_fast.kernels.nf4_gemm` (``_ia3_rows_fwd_kernel``, every M
when K % blocksize == 0), the general kernels below over the base as it is (dense, or NF4
dequantized tile by tile in registers by the LoRA kernels' ``_load_weight_tile``) or over a
scratch deq(W), or the library path (our dequantization, cuBLAS, the scale and dl as elementwise
torch ops), which leads the output-scaling backward.

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

from peft_fast.kernels import plans
from peft_fast.kernels.choice import Candidate, Choice
from peft_fast.kernels.common import (
    _DOT_PRECISION,
    _INTERPRET,
    _SUPPORTED_DTYPES,
    _dot,
    _grouped_tile,
    _m_bucket,
    autotune,
    smallest_block,
)
from peft_fast.kernels.lora_gemms import _GEMM_CONFIGS, _GEMM_DIMS
from peft_fast.kernels.nf4_dequant import dequantize_nf4_triton
from peft_fast.kernels.nf4_gemm import _ia3_rows_fwd_kernel, base_kind
from peft_fast.kernels.nf4_tiles import _base_args, _compile_options, _load_weight_tile, rows_base_args
from peft_fast.nf4 import NF4Weight, dequantize_nf4

__all__ = [
    "BACKWARD_CHOICE",
    "FORWARD_CHOICE",
    "backward_candidates",
    "forward_candidates",
    "ia3_linear_backward",
    "ia3_linear_forward",
    "ia3_linear_reference_backward",
    "ia3_linear_reference_forward",
]


@autotune(_GEMM_CONFIGS, key=["m_bucket", "N", "K"], dims=_GEMM_DIMS)
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
@autotune(_GEMM_CONFIGS, key=["m_bucket", "N", "K"], dims=_GEMM_DIMS, reset_to_zero=["dl_part_ptr"])
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


def _fwd_fused(x, base, ia3_scale, bias, scale_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, Y0) through the general GEMM, the base streamed as it is (candidate ``fused_gemm``)."""
    m, k = x.shape
    n = base.shape[0]
    y = _empty((m, n), x.dtype, x.device)
    y0 = _empty((0 if scale_input else m, n), x.dtype, x.device)
    base_ptrs, base_meta = _base_args(base, x)
    # Grid: one program per [BLOCK_M, BLOCK_N] tile of Y, GROUP_M-swizzled for L2 reuse of W tiles;
    # the LoRA GEMM's autotuned tile set.
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _ia3_linear_fwd_kernel[grid](
        x, *base_ptrs, ia3_scale, x if bias is None else bias, y, x if scale_input else y0,
        m, n, k, _m_bucket(m),
        **base_meta, SCALE_INPUT=scale_input, HAS_BIAS=bias is not None, DOT_PRECISION=_DOT_PRECISION[x.dtype],
        **_compile_options(base),
    )  # fmt: skip
    return y, y0


def _fwd_dequant_fused(x, base: NF4Weight, ia3_scale, bias, scale_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """deq(W) once into a scratch buffer (live for this GEMM only), then the general GEMM over it."""
    return _fwd_fused(x, dequantize_nf4_triton(base, x.dtype), ia3_scale, bias, scale_input)


def _fwd_rows(x, base: NF4Weight, ia3_scale, bias, scale_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, Y0) through the row-streaming NF4 GEMM (candidate ``nf4_rows``)."""
    m, k = x.shape
    n = base.shape[0]
    y = _empty((m, n), x.dtype, x.device)
    y0 = _empty((0 if scale_input else m, n), x.dtype, x.device)
    base_ptrs, base_meta = rows_base_args(base, x)
    # Grid: one program per [BLOCK_N, BLOCK_M] tile of Yᵀ, GROUP_N-swizzled so neighbours in
    # launch order share X tiles; W rows stream once per token tile.
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"]),)
    _ia3_rows_fwd_kernel[grid](
        x, *base_ptrs, ia3_scale, x if bias is None else bias, y, x if scale_input else y0,
        m, n, k, _m_bucket(m),
        **base_meta, SCALE_INPUT=scale_input, HAS_BIAS=bias is not None, DOT_PRECISION=_DOT_PRECISION[x.dtype],
        **_compile_options(base),
    )  # fmt: skip
    return y, y0


def _dense_weight(base: torch.Tensor | NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_nf4_triton(base, dtype) if isinstance(base, NF4Weight) else base


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def _fwd_library(x, base, ia3_scale, bias, scale_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Our dequantization, a cuBLAS GEMM with the bias, the scale as a torch multiply (candidate ``library``)."""
    weight = _dense_weight(base, x.dtype)
    if scale_input:
        return _linear((x.float() * ia3_scale).to(x.dtype), weight, bias), x.new_empty((0, weight.shape[0]))
    y0 = _linear(x, weight, bias)
    return (y0.float() * ia3_scale).to(x.dtype), y0


_FORWARD_IMPLEMENTATIONS = {
    plans.ROWS: _fwd_rows,
    plans.FUSED: _fwd_fused,
    plans.DEQUANT_FUSED: _fwd_dequant_fused,
    plans.LIBRARY: _fwd_library,
}


def forward_candidates(x, base, ia3_scale, bias, scale_input) -> list[Candidate]:
    """The forward's candidates for these operands, in the plan's order; each returns (y, y0)."""
    m, k = x.shape
    names = plans.ia3_forward_plan(m, base.shape[0], k, base_kind(base), x.dtype, scale_input)
    return [Candidate(name, lambda *args, name=name: _FORWARD_IMPLEMENTATIONS[name](*args)) for name in names]


def _forward_bucket(x, base, ia3_scale, bias, scale_input) -> tuple:
    m, k = x.shape
    return plans.choice_bucket(m, base.shape[0], k, x.dtype, base_kind(base), scale_input, bias is not None)


FORWARD_CHOICE = Choice("ia3_forward", _forward_bucket, forward_candidates)


def _bwd_fused(grad_y, saved, base, ia3_scale, scale_input: bool, needs_dx: bool, needs_dl: bool):
    """(dX or None, dl or None) from the general dX GEMM, the base streamed as it is (candidate ``fused_gemm``)."""
    m, n = grad_y.shape
    k = base.shape[1]
    base_ptrs, base_meta = _base_args(base, grad_y)
    dx = _empty((m, k) if needs_dx else (0, k), grad_y.dtype, grad_y.device)
    # Partial sums of dl, a row per BLOCK_M rows of X: sized for the smallest BLOCK_M a config may
    # get and zero-filled, so that a config with larger blocks leaves zeros in the rows it does not use.
    row_blocks = triton.cdiv(m, smallest_block(_GEMM_CONFIGS, "BLOCK_M", m)) if needs_dl else 1
    dl_part = torch.zeros((row_blocks, k if scale_input else n), dtype=torch.float32, device=grad_y.device)
    # Grid: one program per [BLOCK_M, BLOCK_K] tile of dX (the N loop is the reduction).
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)
    _ia3_linear_dx_kernel[grid](
        grad_y, *base_ptrs, ia3_scale, saved, dx if needs_dx else grad_y, dl_part, m, n, k, _m_bucket(m),
        **base_meta, SCALE_INPUT=scale_input, STORE_DX=needs_dx, NEEDS_DL=needs_dl,
        DOT_PRECISION=_DOT_PRECISION[grad_y.dtype], **_compile_options(base),
    )  # fmt: skip
    return (dx if needs_dx else None), (dl_part.sum(0) if needs_dl else None)


def _bwd_dequant_fused(grad_y, saved, base: NF4Weight, ia3_scale, scale_input: bool, needs_dx: bool, needs_dl: bool):
    """deq(W) once into a scratch buffer, then the general dX GEMM over it."""
    weight = dequantize_nf4_triton(base, grad_y.dtype)
    return _bwd_fused(grad_y, saved, weight, ia3_scale, scale_input, needs_dx, needs_dl)


def _bwd_library(grad_y, saved, base, ia3_scale, scale_input: bool, needs_dx: bool, needs_dl: bool):
    """Our dequantization, a cuBLAS GEMM, the scale and dl as torch elementwise ops (candidate ``library``)."""
    weight = _dense_weight(base, grad_y.dtype)
    if scale_input:
        grad_in = torch.mm(grad_y, weight).float()
        dx = (grad_in * ia3_scale).to(grad_y.dtype) if needs_dx else None
        return dx, (saved.float() * grad_in).sum(0) if needs_dl else None
    dl = (grad_y.float() * saved.float()).sum(0) if needs_dl else None
    return torch.mm((grad_y.float() * ia3_scale).to(grad_y.dtype), weight) if needs_dx else None, dl


_BACKWARD_IMPLEMENTATIONS = {
    plans.FUSED: _bwd_fused,
    plans.DEQUANT_FUSED: _bwd_dequant_fused,
    plans.LIBRARY: _bwd_library,
}


def backward_candidates(grad_y, saved, base, ia3_scale, scale_input, needs_dx, needs_dl) -> list[Candidate]:
    """The backward's candidates for these operands, in the plan's order; each returns (dx, dl)."""
    m, n = grad_y.shape
    names = plans.ia3_backward_plan(m, n, base.shape[1], base_kind(base), grad_y.dtype, scale_input)
    return [Candidate(name, lambda *args, name=name: _BACKWARD_IMPLEMENTATIONS[name](*args)) for name in names]


def _backward_bucket(grad_y, saved, base, ia3_scale, scale_input, needs_dx, needs_dl) -> tuple:
    m, n = grad_y.shape
    kind = base_kind(base)
    return plans.choice_bucket(m, n, base.shape[1], grad_y.dtype, kind, scale_input, needs_dx, needs_dl)


BACKWARD_CHOICE = Choice("ia3_backward", _backward_bucket, backward_candidates)


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
    input scaling. The implementation is :data:`FORWARD_CHOICE`'s for the shape.
    """
    n, _ = _check_inputs(x, base, ia3_scale, bias, scale_input)
    m = x.shape[0]
    if m == 0 or n == 0:
        return _empty((m, n), x.dtype, x.device), _empty((0 if scale_input else m, n), x.dtype, x.device)
    x, ia3_scale = x.contiguous(), ia3_scale.contiguous()
    base = base.contiguous() if isinstance(base, torch.Tensor) else base
    bias = None if bias is None else bias.contiguous()
    return FORWARD_CHOICE(x, base, ia3_scale, bias, bool(scale_input))


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
    gradient; the bias's, Σ_m dY (⊙ l), is left to the caller. The implementation is
    :data:`BACKWARD_CHOICE`'s for the shape.
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
    grad_y, saved, ia3_scale = grad_y.contiguous(), saved.contiguous(), ia3_scale.contiguous()
    if m == 0:
        dx = _empty((0, k), grad_y.dtype, grad_y.device) if needs_dx else None
        return dx, torch.zeros_like(ia3_scale) if needs_dl else None
    if not needs_dx and not scale_input:
        # Output scaling without dX: dl is a plain reduction, no GEMM needed.
        return None, (grad_y.float() * saved.float()).sum(0) if needs_dl else None
    if not (needs_dx or needs_dl):
        return None, None
    base = base.contiguous() if isinstance(base, torch.Tensor) else base
    return BACKWARD_CHOICE(grad_y, saved, base, ia3_scale, bool(scale_input), bool(needs_dx), bool(needs_dl))


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
