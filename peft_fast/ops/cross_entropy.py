"""``peft_fast::linear_cross_entropy``: the lm_head GEMM and Hugging Face's causal-LM loss as one custom op.

``linear_cross_entropy(hidden, weight, labels)`` is the loss a causal LM's forward returns with
``labels`` (``F.linear`` + Gemma 2's optional final-logit softcap + ``ForCausalLMLoss``), without
ever holding the [tokens × vocab] logits: tokens go through in chunks, and each chunk's logits
buffer is overwritten in place by their gradient (:mod:`peft_fast.kernels.cross_entropy`).

The op computes the gradients of hidden (and of W and b when they train, an lm_head in
``modules_to_save``) in its forward, when autograd will want them, and returns them beside the
loss; its autograd formula multiplies them by the loss's gradient. Without gradients (no_grad,
eval, nothing requiring grad) only the loss is computed.
"""

from __future__ import annotations

import numbers

import torch

from peft_fast.ops._common import (
    FLOAT_DTYPES,
    accumulate_dtype,
    autocast_dtype,
    autocast_inputs,
    no_autocast,
    uses_kernels,
)

__all__ = ["linear_cross_entropy"]


def _cross_entropy_kernels():
    from peft_fast.kernels import cross_entropy

    return cross_entropy


@torch.library.custom_op("peft_fast::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias): the gradients of the loss itself, empty where not needed."""
    kernels = _cross_entropy_kernels()
    if uses_kernels(hidden):
        forward = kernels.linear_cross_entropy_forward
    else:
        forward = kernels.linear_cross_entropy_reference_forward
    with no_autocast(hidden.device):
        loss, grad_hidden, grad_weight, grad_bias = forward(
            hidden, weight, bias, labels, num_items, ignore_index, softcap, chunk_rows,
            needs_grad_hidden, needs_grad_weight, needs_grad_bias,
        )  # fmt: skip
    # A gradient not computed comes back empty (an op's outputs are tensors, never None).
    grads = (g if g is not None else hidden.new_empty(0) for g in (grad_hidden, grad_weight, grad_bias))
    return (loss, *grads)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, labels, num_items, ignore_index, softcap, chunk_rows, needs_grad_hidden,
      needs_grad_weight, needs_grad_bias):  # fmt: skip
    loss = hidden.new_empty((), dtype=accumulate_dtype(hidden.dtype))
    grad_hidden = hidden.new_empty(hidden.shape if needs_grad_hidden else (0,))
    grad_weight = hidden.new_empty(weight.shape if needs_grad_weight else (0,))
    grad_bias = hidden.new_empty((weight.shape[0],) if needs_grad_bias else (0,))
    return loss, grad_hidden, grad_weight, grad_bias


def _setup_context(ctx, inputs, output) -> None:
    _loss, grad_hidden, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_bias)
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.computed = inputs[8:11]  # needs_grad_hidden, needs_grad_weight, needs_grad_bias


def _backward(ctx, grad_loss, _grad_hidden, _grad_weight, _grad_bias):
    saved = ctx.saved_tensors
    grads = []
    for needed, computed, grad in zip(ctx.needs_input_grad[:3], ctx.computed, saved, strict=True):
        if needed and not computed:
            raise RuntimeError("linear_cross_entropy: a gradient is needed that the forward did not compute; "
                               "call it with requires_grad set on the operands before the forward")  # fmt: skip
        # The stored gradients are d(loss)/d(input); the chain rule scales them by the loss's gradient.
        grads.append(grad * grad_loss.to(grad.dtype) if needed else None)
    return (*grads, None, None, None, None, None, None, None, None)


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def _shifted_labels(labels, shift_labels, lead_shape, ignore_index: int) -> torch.Tensor:
    """The flat int64 targets of ``ForCausalLMLoss``: ``shift_labels``, else labels shifted left by one per sequence."""
    if shift_labels is None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError("labels (or shift_labels) must be an integer tensor")
        if labels.shape != lead_shape:
            raise ValueError(f"labels must have hidden's leading shape {tuple(lead_shape)}, got {tuple(labels.shape)}")
        # HF: pad with ignore_index, then drop the first: position t predicts token t + 1.
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    elif not isinstance(shift_labels, torch.Tensor) or shift_labels.shape != lead_shape:
        raise ValueError(f"shift_labels must be a tensor of hidden's leading shape {tuple(lead_shape)}")
    if shift_labels.dtype.is_floating_point or shift_labels.dtype.is_complex or shift_labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {shift_labels.dtype}")
    return shift_labels.reshape(-1).to(torch.int64)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """The causal-LM loss of ``logits = F.linear(hidden, weight, bias)``, as Hugging Face computes it, fused.

    Equal to ``ForCausalLMLoss(logits, labels, V, num_items_in_batch, ignore_index, shift_labels)``
    (``transformers.loss.loss_utils``) after the optional softcap ``cap·tanh(logits / cap)``
    (Gemma 2's ``final_logit_softcapping``), without materialising the logits.

    Args:
        hidden: the final hidden states [B, S, H] (or [N, H]): fp32, fp16, bf16 or fp64 (gradcheck).
        weight: the lm_head weight [V, H] in hidden's dtype; gets a gradient if it requires one.
        labels: [B, S] (hidden's leading shape) token ids; shifted by one as HF does, each
            sequence's last position getting ``ignore_index``. Unused (may be None) with ``shift_labels``.
        bias: optional [V] in hidden's dtype; gets a gradient if it requires one.
        ignore_index: label of positions that carry no loss (padding, prompt tokens).
        num_items_in_batch: None: the mean over non-ignored tokens (NaN when every token is
            ignored, as HF's); else (an int or a one-element tensor) the sum divided by it, as
            ``Trainer`` passes for exact gradient accumulation.
        shift_labels: already shifted targets of hidden's leading shape (HF's ``shift_labels``).
        softcap: the final-logit cap, or None.
        chunk_rows: token rows per chunk; None picks them from the shape (see
            :func:`peft_fast.kernels.cross_entropy.chunk_rows_for`).

    Returns:
        The loss, a 0-d fp32 tensor (fp64 for fp64 hidden), differentiable in hidden, weight, bias.

    Under ``torch.autocast`` hidden, weight and bias are cast to the autocast dtype, as
    ``nn.Linear`` is, so the logits are in that dtype; each gets its gradient in its own dtype.
    The gradients are computed during this call when autograd records it (grad mode on and an
    operand requiring grad). Labels outside [0, V) other than ``ignore_index`` give a NaN loss
    (HF raises).
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2 or hidden.dtype not in FLOAT_DTYPES:
        raise TypeError("hidden must be a float tensor of shape [..., H] with at least 2 dimensions")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError("weight must be a [V, H] tensor")
    cast = autocast_dtype(hidden)
    hidden, weight, bias = autocast_inputs(cast, hidden, weight, bias)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden has {hidden.shape[-1]} features but weight [V, H] is {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"weight and bias must have hidden's dtype {hidden.dtype} (or run under torch.autocast)")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or softcap <= 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    targets = _shifted_labels(labels, shift_labels, hidden.shape[:-1], int(ignore_index)).to(hidden.device)
    num_items = None
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items = num_items_in_batch.detach().to(hidden.device)
        elif isinstance(num_items_in_batch, numbers.Real) and not isinstance(num_items_in_batch, bool):
            num_items = torch.tensor(num_items_in_batch, device=hidden.device)
        else:
            raise TypeError(f"num_items_in_batch must be an int, a tensor or None, got {num_items_in_batch!r}")
        if num_items.numel() != 1:
            raise ValueError(f"num_items_in_batch must be one value, got shape {tuple(num_items.shape)}")
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)  # fmt: skip
    loss, *_ = _linear_cross_entropy_op(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets, num_items, int(ignore_index),
        None if softcap is None else float(softcap), chunk_rows or 0, *needs,
    )  # fmt: skip
    return loss
