"""LoRA initialisations that read and change the base weight: PiSSA, OLoRA and LoftQ, as PEFT computes them.

Each starts A and B from the base weight W and leaves a residual base, so the adapted layer still
computes W at the start (PiSSA, OLoRA: W_res + s·B·A = W) or approximates it better than a plain
NF4 quantization does (LoftQ: deq(Q) + B·A ≈ W):

- ``"pissa"`` (Meng et al., 2024): the rank-r SVD of W, B = V_r·√(S_r/s), A = √(S_r/s)·U_rᵀ,
  W_res = W − s·B·A; ``"pissa_niter_<n>"`` takes ``torch.svd_lowrank`` with n subspace
  iterations instead of the full SVD (random: seed it for a repeatable base).
- ``"olora"`` (Büyükakyüz, 2024): W = Q·R, B = Q[:, :r], A = R[:r], W_res = W − s·B·A.
- ``"loftq"`` (Li et al., 2023): ``loftq_iter`` rounds of quantizing W minus the low-rank part
  with our NF4 quantizer (blocksize 64, no double quantization: what PEFT asks bitsandbytes for)
  and taking the rank-r SVD of what the quantization missed; the base becomes deq(Q), A = R,
  B = L (PEFT does not divide by the scaling here).

All of it in fp32 on W's device, in PEFT's order of operations; A and B stay fp32 (PEFT assigns
the fp32 results). Over a QLoRA model (``quantize="nf4"``) ``patch`` initialises on the dense
weights first and quantizes the residual, as PEFT advises for PiSSA and LoftQ ("re-quantize the
residual model"); OLoRA also runs over a base that is NF4 already (dequantized, re-quantized in
its own format, as PEFT does over bitsandbytes' 4-bit weights).
"""

from __future__ import annotations

import torch
from torch import nn

from peft_fast.layers import NF4Linear
from peft_fast.nf4 import dequantize_nf4, quantize_nf4

__all__ = ["base_init", "init_from_base", "is_base_init"]

LOFTQ_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which PEFT's loftq_init quantizes with


def is_base_init(init_lora_weights: object) -> bool:
    """Whether ``init_lora_weights`` names an initialisation that reads and changes the base weight."""
    return isinstance(init_lora_weights, str) and (
        init_lora_weights in ("pissa", "olora", "loftq") or init_lora_weights.startswith("pissa_niter_")
    )


def _pissa(weight: torch.Tensor, init: str, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    if init == "pissa":
        v, s, uh = torch.linalg.svd(weight, full_matrices=False)
        vr, sr, uhr = v[:, :r], s[:r], uh[:r]
    else:
        vr, sr, ur = torch.svd_lowrank(weight, r, niter=int(init.split("_niter_")[-1]))
        uhr = ur.t()
    sr = sr / scaling
    lora_a = torch.diag(torch.sqrt(sr)) @ uhr
    lora_b = vr @ torch.diag(torch.sqrt(sr))
    return lora_a, lora_b


def _olora(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, rr = torch.linalg.qr(weight)
    return rr[:r].contiguous(), q[:, :r].contiguous()


def _low_rank(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) of the rank-r SVD split √S to both sides, as PEFT's ``_low_rank_decomposition``."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    left = u @ torch.sqrt(torch.diag(s)[:, :r])
    right = torch.sqrt(torch.diag(s)[:r, :]) @ vh
    return left, right


def _loftq(weight: torch.Tensor, r: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    residual = weight.clone()
    for i in range(iterations):
        dequantized = dequantize_nf4(quantize_nf4(residual, LOFTQ_BLOCKSIZE, double_quant=False), torch.float32)
        left, right = _low_rank(weight - dequantized, r)
        if i + 1 == iterations:
            break
        residual = weight - left @ right
    return right, left, dequantized


def base_init(
    weight: torch.Tensor, init: str, r: int, scaling: float, loftq_config: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [r, K], B [N, r], the new base W' [N, K]) in fp32 for a dense weight W [N, K] (any float dtype)."""
    if not is_base_init(init):
        raise ValueError(
            f"{init!r} is not an initialisation from the base weight (pissa, pissa_niter_<n>, olora, loftq)"
        )
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{init} initialises from a float32, float16 or bfloat16 weight, got {weight.dtype}")
    if r > min(weight.shape):
        raise ValueError(f"{init} needs r <= min(out_features, in_features) = {min(weight.shape)}, got r = {r}")
    w = weight.detach().to(torch.float32)
    if init == "loftq":
        config = loftq_config or {}
        lora_a, lora_b, base = _loftq(w, r, int(config.get("loftq_iter", 1)))
        return lora_a, lora_b, base
    lora_a, lora_b = _pissa(w, init, r, scaling) if init.startswith("pissa") else _olora(w, r)
    return lora_a, lora_b, w - scaling * lora_b @ lora_a


def init_from_base(
    base: nn.Module, init: str, r: int, scaling: float, loftq_config: dict | None = None, where: str = "the layer"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initialise from ``base`` (an ``nn.Linear`` or an :class:`NF4Linear`) and leave it the residual; returns (A, B).

    An NF4 base is dequantized and re-quantized in its own format for OLoRA; PiSSA and LoftQ need
    the full-precision weight (PEFT refuses them over a quantized weight too): patch the dense
    model with ``quantize="nf4"``, which initialises first and quantizes the residual.
    """
    if isinstance(base, NF4Linear):
        if init != "olora":
            raise TypeError(
                f"{where}: init_lora_weights={init!r} needs the full-precision weight, but the base is NF4 already; "
                "patch the unquantized model with quantize='nf4' (it initialises, then quantizes the residual)"
            )
        nf4 = base.nf4
        lora_a, lora_b, residual = base_init(dequantize_nf4(nf4, torch.float32), init, r, scaling, loftq_config)
        base._set_weight(quantize_nf4(residual.to(nf4.dtype), nf4.blocksize, nf4.double_quant).to(nf4.device))
        return lora_a, lora_b
    if type(base) is not nn.Linear:
        raise TypeError(
            f"{where}: init_lora_weights={init!r} runs on Linear layers (dense or NF4), not {type(base).__name__}"
        )
    lora_a, lora_b, residual = base_init(base.weight, init, r, scaling, loftq_config)
    with torch.no_grad():
        base.weight.copy_(residual.to(base.weight.dtype))
    return lora_a, lora_b
