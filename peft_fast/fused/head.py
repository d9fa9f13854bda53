"""A causal LM's training loss through ``peft_fast::linear_cross_entropy``: the lm_head GEMM inside, no logits.

In training with labels the fused forward runs the backbone as Hugging Face's forward does, then
the loss straight from the last hidden states (chunked over tokens, fp32, ignore_index, the causal
shift, ``num_items_in_batch``, Gemma 2's final-logit softcapping) and returns **no logits**, as
Liger-Kernel does. In eval mode, without labels, with ``logits_to_keep``, or with an lm_head that
is not a plain ``nn.Linear`` (LoRA on it, say), it is Hugging Face's forward, logits and all.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

from peft_fast.fused.classes import fused_subclass
from peft_fast.models import Family

_LOSS_ONLY = ("labels", "logits_to_keep", "return_dict")


def _causal_lm_forward(self, *args, **kwargs):
    original = self._peft_fast_original_forward
    arguments = self._peft_fast_signature.bind(self, *args, **kwargs).arguments
    extra = arguments.pop("kwargs", {})
    labels = arguments.get("labels")
    head = self.get_output_embeddings()
    if not (
        self.training
        and labels is not None
        and not arguments.get("logits_to_keep")
        and type(head) is nn.Linear
        and not (head._forward_hooks or head._forward_pre_hooks)
    ):
        return original(self, *args, **kwargs)
    return_dict = extra.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    backbone = {name: value for name, value in arguments.items() if name != "self" and name not in _LOSS_ONLY}
    outputs = getattr(self, self.base_model_prefix)(**backbone, **extra)
    from peft_fast.ops.cross_entropy import linear_cross_entropy

    softcap = getattr(self.config, self._peft_fast_softcap_attr, None) if self._peft_fast_softcap_attr else None
    loss = linear_cross_entropy(
        outputs[0], head.weight, labels, bias=head.bias, ignore_index=extra.get("ignore_index", -100),
        num_items_in_batch=extra.get("num_items_in_batch"), shift_labels=extra.get("shift_labels"), softcap=softcap,
    )  # fmt: skip
    result = self._peft_fast_output_class(loss=loss, logits=None)
    for name in result.__dataclass_fields__:
        if name not in ("loss", "logits") and getattr(outputs, name, None) is not None:
            result[name] = getattr(outputs, name)
    return result if return_dict else result.to_tuple()


def fusable_head(model: nn.Module, family: Family) -> bool:
    """A causal LM of the family with a backbone and an output embedding to compute the loss from."""
    cls = type(model)
    return (
        cls.__name__ in family.causal_lm_classes
        and isinstance(getattr(model, getattr(model, "base_model_prefix", ""), None), nn.Module)
        and isinstance(model.get_output_embeddings(), nn.Module)
    )


def fuse_head(model: nn.Module, family: Family) -> None:
    """Give the causal LM the forward whose training loss never builds the logits."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    cls = type(model)

    # functools.wraps keeps the original's signature (Trainer and generate() read it).
    @functools.wraps(cls.forward)
    def forward(self, *args, **kwargs):
        return _causal_lm_forward(self, *args, **kwargs)

    members = {
        "forward": forward,
        "_peft_fast_original_forward": staticmethod(cls.forward),
        "_peft_fast_signature": inspect.signature(cls.forward),
        "_peft_fast_softcap_attr": family.logit_softcap_attr,
        "_peft_fast_output_class": CausalLMOutputWithPast,
    }
    model.__class__ = fused_subclass(cls, "linear_cross_entropy", members, (family.logit_softcap_attr,))
