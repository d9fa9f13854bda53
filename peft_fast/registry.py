"""The methods peft_fast knows, by config type and by adapter file: what the front doors look up.

Adding a method is one module with a :class:`peft_fast.method.Method` and one line here.
"""

from __future__ import annotations

from torch import nn

from peft_fast import adapters, ia3, lora
from peft_fast.method import Method
from peft_fast.prompt_methods import method as prompt_method

__all__ = ["FILE_FALLBACK", "METHODS", "method_for_config", "method_for_file", "methods_on"]

# In this order: the front doors visit a model's methods so (unpatch backwards), and save the
# first one's adapter when no adapter name is given.
METHODS: tuple[Method, ...] = (lora.METHOD, ia3.METHOD, adapters.METHOD, prompt_method.METHOD)
# An adapter file no method claims goes to LoRA's reader, whose error names the unsupported peft_type.
FILE_FALLBACK: Method = lora.METHOD


def method_for_config(config: object) -> Method:
    """The method a config selects; a TypeError for anything that is not a peft_fast config."""
    for method in METHODS:
        if isinstance(config, method.config_types):
            return method
    kind = f"{type(config).__module__}.{type(config).__qualname__}"
    raise TypeError(
        f"config must be a peft_fast config (peft_fast.LoraConfig, peft_fast.IA3Config, ...), got {kind}"
        + ("; peft's configs are not accepted, build the peft_fast one with the same fields" if "peft." in kind else "")
    )


def method_for_file(adapter_config: dict) -> Method:
    """The method whose adapter directory holds a config file with ``adapter_config``."""
    return next((method for method in METHODS if method.reads(adapter_config)), FILE_FALLBACK)


def methods_on(model: nn.Module) -> list[Method]:
    """The methods that have patched ``model``, in registry order."""
    return [method for method in METHODS if method.is_on(model)]
