"""Triton kernels: the bottleneck adapter ``Y = R + s·drop(act(LN?(X)·Wdᵀ + bd)·Wuᵀ + bu)``, forward and backward.

X [M, D] is the adapter's input and R [M, D] the tensor its output is added to: X itself for a
serial (Houlsby / Pfeiffer) adapter, the host sublayer's output for a parallel one. Wd [B, D],
bd [B] project down to the bottleneck width B; Wu [D, B], bu [D] project back up. LN is an
optional LayerNorm (γ, β, eps) on X; act is relu, gelu (erf form) or swish (z·σ(z)); s a scalar.
Dropout is inverted dropout on the up-projection's output (where AdapterHub applies it): element
(m, d) is kept per :mod:`peft_fast.kernels.dropout` (the LoRA kernels' Philox stream), so
:func:`peft_fast.kernels.dropout.dropout_mask` replays it.

Forward, two kernels:

* ``_adapter_down_kernel``  Z = LN?(X)·Wdᵀ + bd [M, B]. With LN, each program first computes the
  mean and 1/std of its rows (fp32, stored for backward) and normalises X tiles in registers.
* ``_adapter_up_kernel``    Y = R + s·drop(act(Z)·Wuᵀ + bu). act is applied to Z tiles as they are
  loaded (the GEMM's prologue), so act(Z) never exists in memory; bias, scale, dropout and the
  residual add are the epilogue.

Saved for backward: X, Z (the pre-activation), mean and 1/std, the seed; never act(Z), LN(X),
the up-projection's output or a dropout mask. With G = s·drop(dY) (the mask regenerated as dY
tiles load):

* ``_adapter_dz_kernel``    dZ = (G·Wu) ⊙ act'(Z)
* ``_adapter_dup_kernel``   dWu = Gᵀ·act(Z) and dbu = Σ_m G
* ``_adapter_ddown_kernel`` dWd = dZᵀ·LN?(X) and dbd = Σ_m dZ
* ``_adapter_dx_kernel``    dX = LN-backward(dZ·Wd) (+ dY when R is X). The LayerNorm backward needs
  two sums over each whole row, so with LN a program owns BLOCK_M complete rows: one sweep over D
  for the sums, one for dX, recomputing the thin dZ·Wd tiles (B-deep) rather than storing them.
  dγ and dβ come out as per-row-block partial sums, reduced in a fixed order by torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton

from peft_fast.kernels.adapter_gemms import (
    _DX_LAUNCH,
    _adapter_ddown_kernel,
    _adapter_down_kernel,
    _adapter_dup_kernel,
    _adapter_dx_kernel,
    _adapter_dz_kernel,
    _adapter_fused_fwd_kernel,
    _adapter_up_kernel,
)
from peft_fast.kernels.common import (
    _DOT_PRECISION,
    _INTERPRET,
    _SUPPORTED_DTYPES,
    _block_r,
    _m_bucket,
    fitted_block,
    interpreted,
)
from peft_fast.kernels.dropout import dropout_threshold, dropout_tiled

__all__ = [
    "ACTIVATIONS",
    "AdapterGradients",
    "bottleneck_adapter_backward",
    "bottleneck_adapter_forward",
    "bottleneck_adapter_reference_backward",
    "bottleneck_adapter_reference_forward",
]

# Activation codes passed to the kernels as a constexpr.
ACTIVATIONS = {"relu": 0, "gelu": 1, "swish": 2}
_MAX_SEED = 2**63

# -- launchers --------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests poison it to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_tensor(t, name: str, shape: tuple[int, ...], x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_operands(x, down_weight, ln_weight, ln_bias, activation, p, seed, others) -> tuple[int, int]:
    """(D, B); raises ValueError/TypeError naming the first problem. ``others``: (name, tensor, shape)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [M, D], got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 at import), got {x.device}")
    d = x.shape[1]
    if not isinstance(down_weight, torch.Tensor) or down_weight.dim() != 2 or down_weight.shape[0] == 0:
        raise ValueError(f"down_weight must be a 2-D tensor [B, {d}] with B >= 1")
    b = down_weight.shape[0]
    if b > d:
        raise ValueError(f"the bottleneck ({b}) is larger than the hidden size ({d})")
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("give both ln_weight and ln_bias, or neither")
    expected = [("down_weight", down_weight, (b, d)), *others]
    if ln_weight is not None:
        expected += [("ln_weight", ln_weight, (d,)), ("ln_bias", ln_bias, (d,))]
    for name, t, shape in expected:
        _check_tensor(t, name, shape, x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid choices: {', '.join(ACTIVATIONS)}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return d, b


def bottleneck_adapter_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    ln_eps: float,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    scale: float,
    activation: str,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Y = R + s·drop(act(LN?(X)·Wdᵀ + bd)·Wuᵀ + bu)``; R = X when ``residual`` is None.

    Args:
        x: adapter input [M, D] (fp32, fp16 or bf16); residual: [M, D] or None.
        ln_weight, ln_bias: LayerNorm on x (both [D]) or both None; ln_eps its epsilon.
        down_weight [B, D], down_bias [B], up_weight [D, B], up_bias [D]: the projections (x's dtype).
        scale: s. activation: "relu", "gelu" or "swish".
        dropout_p, seed: dropout on the up-projection's output (see :func:`dropout_mask`).

    Returns (y [M, D], z [M, B] the pre-activation, mean [M], rstd [M]); mean and rstd are fp32,
    empty without LayerNorm. z, mean and rstd are what the backward needs besides x.
    """
    m, d, b = x.shape[0], x.shape[-1], down_weight.shape[0]
    others = [("down_bias", down_bias, (b,)), ("up_weight", up_weight, (d, b)), ("up_bias", up_bias, (d,))]
    if residual is not None:
        others.append(("residual", residual, (m, d)))
    _check_operands(x, down_weight, ln_weight, ln_bias, activation, dropout_p, seed, others)
    x, residual, ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias = (
        None if t is None else t.contiguous()
        for t in (x, residual, ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias)
    )
    has_ln = ln_weight is not None
    z = _empty((m, b), x.dtype, x.device)
    y = _empty((m, d), x.dtype, x.device)
    stats_rows = m if has_ln else 0
    mean = _empty((stats_rows,), torch.float32, x.device)
    rstd = _empty((stats_rows,), torch.float32, x.device)
    if m == 0:
        return y, z, mean, rstd
    dot_precision = _DOT_PRECISION[x.dtype]
    block_b = _block_r(b)
    p = float(dropout_p)
    if not has_ln and residual is None and b <= block_b:
        # Grid: one program per BLOCK_M rows, both projections in one pass over its rows.
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)
        _adapter_fused_fwd_kernel[grid](
            x, down_weight, down_bias, up_weight, up_bias, z, y,
            m, d, b, float(scale), seed, dropout_threshold(p), 1.0 / (1.0 - p), _m_bucket(m),
            ACTIVATION=ACTIVATIONS[activation], HAS_DROPOUT=p > 0, DROPOUT_TILED=dropout_tiled(d),
            DOT_PRECISION=dot_precision, BLOCK_B=block_b,
        )  # fmt: skip
        return y, z, mean, rstd
    # Grid: (row blocks, bottleneck blocks); B is small, so usually one bottleneck block and each
    # program streams its X rows once (three times with LN: two statistics sweeps, one GEMM sweep).
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(b, block_b))
    _adapter_down_kernel[grid](
        x, ln_weight if has_ln else x, ln_bias if has_ln else x, down_weight, down_bias, z,
        mean if has_ln else x, rstd if has_ln else x, m, d, b, float(ln_eps), _m_bucket(m),
        HAS_LN=has_ln, DOT_PRECISION=dot_precision, BLOCK_B=block_b,
    )  # fmt: skip
    # Grid: one program per [BLOCK_M, BLOCK_N] tile of Y, GROUP_M-swizzled so neighbours share Wu
    # tiles; each reduces over the B-wide bottleneck.
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(d, meta["BLOCK_N"]),)
    _adapter_up_kernel[grid](
        z, up_weight, up_bias, x if residual is None else residual, y,
        m, d, b, float(scale), seed, dropout_threshold(p), 1.0 / (1.0 - p), _m_bucket(m),
        ACTIVATION=ACTIVATIONS[activation], HAS_DROPOUT=p > 0, DROPOUT_TILED=dropout_tiled(d),
        DOT_PRECISION=dot_precision, BLOCK_B=block_b,
    )  # fmt: skip
    return y, z, mean, rstd


def _dx_launch(x: torch.Tensor) -> dict:
    """dX's fixed launch (adapter_gemms._DX_LAUNCH), its blocks fitted to X's shape under the interpreter."""
    if not interpreted((x,)):
        return _DX_LAUNCH
    m, d = x.shape
    fitted = {"BLOCK_M": fitted_block(_DX_LAUNCH["BLOCK_M"], m), "BLOCK_K": fitted_block(_DX_LAUNCH["BLOCK_K"], d)}
    return _DX_LAUNCH | fitted


class AdapterGradients(NamedTuple):
    """Gradients of :func:`bottleneck_adapter_forward`'s inputs (None where not requested)."""

    x: torch.Tensor | None
    ln_weight: torch.Tensor | None
    ln_bias: torch.Tensor | None
    down_weight: torch.Tensor | None
    down_bias: torch.Tensor | None
    up_weight: torch.Tensor | None
    up_bias: torch.Tensor | None


def bottleneck_adapter_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    scale: float,
    activation: str,
    dropout_p: float,
    seed: int,
    residual_is_x: bool,
    needs_dx: bool,
    needs_dln: bool,
    needs_ddown: bool,
    needs_dup: bool,
) -> AdapterGradients:
    """Gradients of :func:`bottleneck_adapter_forward` from its saved z, mean, rstd and seed.

    ``residual_is_x`` adds dY to dX (a serial adapter); the residual's own gradient, when it is a
    separate tensor, is dY itself and is not computed here. ``needs_dln`` asks for both LayerNorm
    parameters, ``needs_ddown`` / ``needs_dup`` for a projection's weight and bias.
    """
    m, d, b = x.shape[0], x.shape[-1], down_weight.shape[0]
    others = [("up_weight", up_weight, (d, b)), ("grad_y", grad_y, (m, d)), ("z", z, (m, b))]
    _check_operands(x, down_weight, ln_weight, ln_bias, activation, dropout_p, seed, others)
    has_ln = ln_weight is not None
    for name, t in (("mean", mean), ("rstd", rstd)):
        if has_ln and (t.shape != (m,) or t.dtype != torch.float32):
            raise ValueError(f"{name} must be float32 [{m}] (from the forward), got {t.dtype} {tuple(t.shape)}")
    grad_y, x, z, down_weight, up_weight = (t.contiguous() for t in (grad_y, x, z, down_weight, up_weight))
    needs_dln = needs_dln and has_ln
    zeros = lambda *shape: torch.zeros(shape, dtype=x.dtype, device=x.device)
    if m == 0:  # weight gradients are sums over no rows
        return AdapterGradients(
            _empty((0, d), x.dtype, x.device) if needs_dx else None,
            zeros(d) if needs_dln else None, zeros(d) if needs_dln else None,
            zeros(b, d) if needs_ddown else None, zeros(b) if needs_ddown else None,
            zeros(d, b) if needs_dup else None, zeros(d) if needs_dup else None,
        )  # fmt: skip
    p = float(dropout_p)
    grad_scale = float(scale) / (1.0 - p)
    dot_precision = _DOT_PRECISION[x.dtype]
    block_b = _block_r(b)
    act = ACTIVATIONS[activation]
    dwu = dbu = dwd = dbd = dx = dgamma = dbeta = None
    if needs_dup:
        dwu, dbu = _empty((d, b), x.dtype, x.device), _empty((d,), x.dtype, x.device)
        # Grid: (D blocks, bottleneck blocks); dWu is small (D x B), each program reduces over all rows.
        grid = lambda meta: (triton.cdiv(d, meta["BLOCK_K"]), triton.cdiv(b, block_b))
        _adapter_dup_kernel[grid](
            grad_y, z, dwu, dbu, m, d, b, grad_scale, seed, dropout_threshold(p), _m_bucket(m),
            ACTIVATION=act, HAS_DROPOUT=p > 0, DOT_PRECISION=dot_precision, BLOCK_B=block_b,
        )  # fmt: skip
    if needs_dx or needs_dln or needs_ddown:
        dz = _empty((m, b), x.dtype, x.device)
        # Grid: (row blocks, bottleneck blocks), each program reducing over D.
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(b, block_b))
        _adapter_dz_kernel[grid](
            grad_y, up_weight, z, dz, m, d, b, grad_scale, seed, dropout_threshold(p), _m_bucket(m),
            ACTIVATION=act, HAS_DROPOUT=p > 0, DROPOUT_TILED=dropout_tiled(d), DOT_PRECISION=dot_precision,
            BLOCK_B=block_b,
        )  # fmt: skip
        stats = (mean, rstd) if has_ln else (x, x)
        ln_params = (ln_weight.contiguous(), ln_bias.contiguous()) if has_ln else (x, x)
        if needs_ddown:
            dwd, dbd = _empty((b, d), x.dtype, x.device), _empty((b,), x.dtype, x.device)
            # Grid: (bottleneck blocks, D blocks), each program reducing over all rows.
            grid = lambda meta: (triton.cdiv(b, block_b), triton.cdiv(d, meta["BLOCK_K"]))
            _adapter_ddown_kernel[grid](
                dz, x, *ln_params, *stats, dwd, dbd, m, d, b, _m_bucket(m),
                HAS_LN=has_ln, DOT_PRECISION=dot_precision, BLOCK_B=block_b,
            )  # fmt: skip
        if needs_dx or needs_dln:
            dx = _empty((m, d), x.dtype, x.device)
            launch = _dx_launch(x)
            row_blocks = triton.cdiv(m, launch["BLOCK_M"])
            dgamma_part = _empty((row_blocks if has_ln else 0, d), torch.float32, x.device)
            dbeta_part = _empty((row_blocks if has_ln else 0, d), torch.float32, x.device)
            # Grid: with LN, one program per row block (it owns whole rows); without, one per
            # [BLOCK_M, BLOCK_K] tile of dX.
            grid = (row_blocks, 1 if has_ln else triton.cdiv(d, launch["BLOCK_K"]))
            _adapter_dx_kernel[grid](
                dz, down_weight, grad_y, x, ln_params[0], *stats, dx,
                dgamma_part if has_ln else x, dbeta_part if has_ln else x, m, d, b,
                HAS_LN=has_ln, ADD_GRAD_Y=residual_is_x, DOT_PRECISION=dot_precision, BLOCK_B=block_b, **launch,
            )  # fmt: skip
            if needs_dln:
                dgamma, dbeta = dgamma_part.sum(0).to(x.dtype), dbeta_part.sum(0).to(x.dtype)
    return AdapterGradients(dx if needs_dx else None, dgamma, dbeta, dwd, dbd, dwu, dbu)


# -- the torch reference (also the op's torch backend) --------------------------------------------

_TORCH_ACTIVATIONS = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "swish": torch.nn.functional.silu}


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dropped(t: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    return t if keep is None else torch.where(keep, t / (1.0 - p), 0.0)  # a dropped element is exactly 0


def _activation_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    """act'(z) in the accumulation dtype (relu' is 0 at 0, as torch's)."""
    z = z.to(_accumulate_dtype(z.dtype))
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "gelu":
        return 0.5 * (1.0 + torch.erf(z * math.sqrt(0.5))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    sig = torch.sigmoid(z)
    return sig * (1.0 + z * (1.0 - sig))


def _layer_norm(x, ln_weight, ln_bias, ln_eps):
    """(LN(x) in x's dtype, mean [M], rstd [M]); without LayerNorm (x, empty, empty).

    Computed here rather than by torch's layer norm, whose CPU statistics for bf16 inputs are
    themselves rounded to bf16; the kernels keep them in fp32 and so does this.
    """
    acc = _accumulate_dtype(x.dtype)
    if ln_weight is None:
        return x, x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc)  # distinct: op outputs may not alias
    xs = x.to(acc)
    mean = xs.mean(-1)
    rstd = torch.rsqrt((xs - mean[:, None]).square().mean(-1) + ln_eps)
    h = (xs - mean[:, None]) * rstd[:, None] * ln_weight.to(acc) + ln_bias.to(acc)
    return h.to(x.dtype), mean, rstd


def _layer_norm_backward(dh, x, mean, rstd, ln_weight):
    """(dx, dγ, dβ) of :func:`_layer_norm`: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), g = dh·γ."""
    acc = mean.dtype
    x_hat = (x.to(acc) - mean[:, None]) * rstd[:, None]
    dh = dh.to(acc)
    g = dh * ln_weight.to(acc)
    dx = (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True)) * rstd[:, None]
    return dx.to(x.dtype), (dh * x_hat).sum(0).to(x.dtype), dh.sum(0).to(x.dtype)


def bottleneck_adapter_reference_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    ln_eps: float,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    scale: float,
    activation: str,
    keep: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch reference of :func:`bottleneck_adapter_forward` (and the op's torch backend): (y, z, mean, rstd).

    ``keep`` is the dropout keep-mask of the output [M, D] (None without dropout). The linears
    round as ``nn.Linear`` does; LayerNorm statistics stay fp32. A zero up-projection gives
    y == residual bit for bit.
    """
    h, mean, rstd = _layer_norm(x, ln_weight, ln_bias, ln_eps)
    z = torch.nn.functional.linear(h, down_weight, down_bias)
    u = torch.nn.functional.linear(_TORCH_ACTIVATIONS[activation](z), up_weight, up_bias)
    y = (x if residual is None else residual) + scale * _dropped(u, keep, dropout_p)
    return y, z, mean, rstd


def bottleneck_adapter_reference_backward(
    grad_y, x, z, mean, rstd, ln_weight, ln_bias, ln_eps, down_weight, up_weight, scale, activation, keep, dropout_p,
    residual_is_x, needs_dx, needs_dln, needs_ddown, needs_dup,
):  # fmt: skip
    """The torch reference of :func:`bottleneck_adapter_backward`: (dx, dγ, dβ, dWd, dbd, dWu, dbu) or None each."""
    dtype, acc = x.dtype, _accumulate_dtype(x.dtype)
    g = (scale * _dropped(grad_y, keep, dropout_p)).to(dtype)
    d_up_w = d_up_b = d_down_w = d_down_b = dx = d_ln_w = d_ln_b = None
    if needs_dup:
        d_up_w = g.t() @ _TORCH_ACTIVATIONS[activation](z)
        d_up_b = g.sum(0, dtype=acc).to(dtype)
    if not (needs_dx or needs_dln or needs_ddown):
        return dx, d_ln_w, d_ln_b, d_down_w, d_down_b, d_up_w, d_up_b
    dz = ((g @ up_weight).to(acc) * _activation_grad(z, activation)).to(dtype)
    if needs_ddown:
        d_down_w = dz.t() @ _layer_norm(x, ln_weight, ln_bias, ln_eps)[0]
        d_down_b = dz.sum(0, dtype=acc).to(dtype)
    if needs_dx or needs_dln:
        dh = dz @ down_weight
        if ln_weight is None:
            dx = dh
        else:
            dx, d_ln_w, d_ln_b = _layer_norm_backward(dh, x, mean, rstd, ln_weight)
        if needs_dx and residual_is_x:
            dx = dx + grad_y
    return dx, d_ln_w, d_ln_b, d_down_w, d_down_b, d_up_w, d_up_b
