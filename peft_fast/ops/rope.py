"""``apply_rope``: Hugging Face's ``apply_rotary_pos_emb`` as one kernel that rotates q and k in place.

In eager mode q and k are overwritten with their rotations and returned (no new [B, H, S, D]
tensors: q alone is 3.3 GB at 400k tokens of Llama-3-8B). Two custom ops carry it:

* ``peft_fast::rope_`` mutates q and k (one launch for both, GQA included). A mutating custom
  op cannot take ``register_autograd``, so autograd goes through :class:`_InPlaceRotation`, a
  ``torch.autograd.Function`` with ``ctx.mark_dirty``. Autograd lets a Function that modifies a
  *view* in place (HF's q is ``q_proj(x).view(...).transpose(1, 2)``) return only that one
  tensor, so q's node launches the kernel for q and k, and k gets a second node that only tells
  autograd k was rotated.
* ``peft_fast::rope`` is the functional rotation of q and k (new tensors, one launch) with
  ``register_autograd``: the backward of both ops (the transpose of the rotation applied to the
  incoming gradients; its own backward is the rotation again), and the forward where writing in
  place is not allowed or not safe: a leaf that requires grad (or a view of one), and everything
  under ``torch.compile``.

Why functional under ``torch.compile``: Dynamo's handling of ``ctx.mark_dirty`` in torch 2.13
loses the Function's backward when the dirty tensor is an input of the compiled graph (gradients
silently wrong; pytorch/pytorch#133491, #184113), and a graph break can make q such an input.
Compiled code therefore gets new tensors; the compiler frees q's buffer once it is dead.

The backward writes new gradient tensors rather than overwriting the incoming ones: autograd may
hand one gradient tensor to several consumers (an ``add``'s backward passes its gradient to both
inputs), so a Function must never modify its gradients in place.

Saved for backward: cos and sin only (gradient checkpointing recomputes them with the layer).
The kernels and the torch reference are in :mod:`peft_fast.kernels.rope`.
"""

from __future__ import annotations

import torch

from peft_fast.ops._common import FLOAT_DTYPES, uses_kernels

__all__ = ["apply_rope"]


def _rope_kernels():
    from peft_fast.kernels import rope

    return rope


@torch.library.custom_op("peft_fast::rope_", mutates_args=("q", "k"))
def _rope_inplace_op(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                     unsqueeze_dim: int) -> None:  # fmt: skip
    """q (and k) <- their rotations by cos / sin, in place."""
    kernels = _rope_kernels()
    if uses_kernels(q):
        kernels.rope_rotate_(q, k, cos, sin, unsqueeze_dim)
    else:
        kernels.rope_reference_(q, k, cos, sin, unsqueeze_dim)


@_rope_inplace_op.register_fake
def _(q, k, cos, sin, unsqueeze_dim) -> None:
    return None


@torch.library.custom_op("peft_fast::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int,
             inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(q_rot, k_rot): new tensors with their inputs' strides where dense (k_rot empty without k)."""
    kernels = _rope_kernels()
    rotate = kernels.rope_rotate if uses_kernels(q) else kernels.rope_reference_rotate
    q_rot, k_rot = rotate(q, k, cos, sin, unsqueeze_dim, inverse)
    return q_rot, (q.new_empty(0) if k_rot is None else k_rot)


@_rope_op.register_fake
def _(q, k, cos, sin, unsqueeze_dim, inverse):
    return torch.empty_like(q), (q.new_empty(0) if k is None else torch.empty_like(k))


def _rope_setup_context(ctx, inputs, output) -> None:
    _, k, cos, sin, unsqueeze_dim, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.unsqueeze_dim, ctx.inverse, ctx.has_k = unsqueeze_dim, inverse, k is not None


def _rope_backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    # The rotation is linear: its gradient is the transpose map (and that one's is the rotation).
    d_q, d_k = _rope_op(grad_q, grad_k if ctx.has_k else None, cos, sin, ctx.unsqueeze_dim, not ctx.inverse)
    return d_q, (d_k if ctx.has_k else None), None, None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


class _InPlaceRotation(torch.autograd.Function):
    """x rotated in place, autograd told: x's history continues from this node (``mark_dirty``).

    ``rotate``: launch the kernel here, for x and, in the same launch, ``partner`` (k's detached
    alias: it shares k's version counter, so the op's mutation is still recorded on k). With
    ``rotate=False`` x was rotated by such a partner launch just before and only autograd learns it.
    """

    @staticmethod
    def forward(ctx, x, partner, cos, sin, unsqueeze_dim: int, rotate: bool):
        if rotate:
            _rope_inplace_op(x, partner, cos, sin, unsqueeze_dim)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        return x

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        d_x, _ = _rope_op(grad, None, cos, sin, ctx.unsqueeze_dim, True)
        return d_x, None, None, None, None, None


def _mutable(t: torch.Tensor) -> bool:
    """Whether autograd lets ``t`` be modified in place here (not a leaf that requires grad, nor a view of one)."""
    if t.is_inference() and not torch.is_inference_mode_enabled():
        return False
    if not (torch.is_grad_enabled() and t.requires_grad):
        return True
    base = t if t._base is None else t._base
    return not base.is_leaf


def _rotate_in_place(q: torch.Tensor, k: torch.Tensor, cos, sin, unsqueeze_dim: int):
    """q and k rotated in place with one launch, each returned with its autograd history."""
    q_tracked, k_tracked = (torch.is_grad_enabled() and t.requires_grad for t in (q, k))
    if not (q_tracked or k_tracked):
        _rope_inplace_op(q, k, cos, sin, unsqueeze_dim)
        return q, k
    q = _InPlaceRotation.apply(q, k.detach(), cos, sin, unsqueeze_dim, True)
    if k_tracked:
        k = _InPlaceRotation.apply(k, None, cos, sin, unsqueeze_dim, False)
    return q, k


def _hf_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """HF's own expression (Phi-3's form; Llama's when rd = D), out of place with its dtype promotion."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    rotated_half = torch.cat((-x_rot[..., rd // 2 :], x_rot[..., : rd // 2]), dim=-1)
    return torch.cat([(x_rot * cos) + (rotated_half * sin), x_pass], dim=-1)


def _autocast_enabled(device: torch.device) -> bool:
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    *,
    in_place: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_embed, k_embed)`` of Hugging Face's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``, in place.

    Args:
        q: [B, Hq, S, D] (``unsqueeze_dim=1``; [B, S, Hq, D] with 2), any strides (HF's transposed
            views are read and written where they are).
        k: the same with Hkv heads (GQA: Hkv < Hq), q's dtype.
        cos, sin: [B or 1, S, rd] as HF's rotary embedding modules return them (every rope type and
            attention scaling folded in); per-row positions give [B, S, rd]. rd even and <= D; with
            rd < D (Phi-3's partial rotary) features rd.. pass through.

    In eager mode returns q and k themselves, overwritten with their rotations; under
    ``torch.compile``, and for a q or k autograd forbids to modify (a leaf that requires grad, a
    view of one, an inference tensor outside inference mode), new tensors from the same kernel.
    Gradients flow as through HF's expression. Computed in fp32 (fp64 for fp64) with one rounding
    per element: fp32 / fp64 equal HF's bit for bit, bf16 / fp16 differ by their rounding; the
    torch backend rounds as HF does.

    Falls back to HF's expression, out of place, where it cannot write in place exactly: q and k
    of different dtypes, cos / sin of another dtype outside autocast (HF would promote the
    result), or cos / sin that require grad. Under autocast, where HF's fp32 cos / sin promote a
    bf16 q to fp32 and the attention that follows casts it back, q and k keep their dtype: the
    fp32 result rounded once, what that attention consumes.

    ``in_place=False`` always writes new tensors (one launch for both). The fused training step
    uses it: there q and k are views of the projections' outputs, and autograd's backward of an
    in-place op on a view (``CopySlices``) clones and copies the whole gradient of q and k once
    more, ~0.9 ms per Llama-3-8B step in the step model, while the out-of-place q / k are
    transients freed at once, never at the step's memory peak.
    """
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    promotes = cos.dtype != q.dtype or sin.dtype != q.dtype
    if (
        q.dtype != k.dtype
        or (promotes and not _autocast_enabled(q.device))
        or (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))
    ):
        return _hf_rotation(q, cos, sin, unsqueeze_dim), _hf_rotation(k, cos, sin, unsqueeze_dim)
    # (Dynamo cannot trace is_inference() nor ._base: _mutable is only asked in eager mode.)
    if in_place and not torch.compiler.is_compiling() and k is not q and _mutable(q) and _mutable(k):
        return _rotate_in_place(q, k, cos, sin, unsqueeze_dim)
    q_embed, k_embed = _rope_op(q, k, cos, sin, unsqueeze_dim, False)
    return q_embed, k_embed
