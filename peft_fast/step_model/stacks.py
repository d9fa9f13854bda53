"""The model and the two fine-tuning stacks, built on fake CUDA tensors (or real CPU ones, for the checks).

- The model: ``AutoModelForCausalLM.from_config`` in bf16 with SDPA attention, built on the meta
  device, then every parameter and buffer given a fresh fake storage (ties kept): nothing is
  initialised or allocated. Buffers computed at init (rotary frequencies) have no values, which
  shapes-only tracing never needs.
- **peft_fast**: ``peft_fast.patch(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
  target_modules="all-linear", quantize="nf4"))``, with the fused step ``patch`` applies by default
  (``fused=`` passes another choice), then the model moved to CUDA tensor by tensor. The Linear
  layers ``patch`` would quantize get :class:`peft_fast.NF4Linear` layers with fake NF4 weights of
  the right shapes and dtypes first (``quantize_nf4`` reads values: its NaN check), chosen by
  ``patch``'s rule (every ``nn.Linear`` but the output heads and ``_keep_in_fp32_modules``);
  ``patch`` then finds the model quantized and keeps them.
- **PEFT + bitsandbytes**: what ``from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4,
  double quant, bf16 compute))`` does, on the meta device: transformers' quantizer replaces the
  Linear layers by ``bnb.nn.Linear4bit`` (``preprocess_model``, lm_head left out) and marks the
  model 4-bit (``postprocess_model``); ``peft.get_peft_model(model, LoraConfig(r=16, lora_alpha=32,
  lora_dropout=0.05, target_modules="all-linear"))`` adds the adapters (fp32, PEFT's
  ``autocast_adapter_dtype``). Then every tensor gets a fake storage, each ``Params4bit`` a
  quantized fake one (:func:`_fake_params4bit`: bitsandbytes' quantizer reads values). No
  ``prepare_model_for_kbit_training`` by default (as the study this model reproduces);
  ``kbit_prepare=True`` runs it (it casts embeddings, norms and lm_head to fp32).

Gradient checkpointing, when asked: ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=
{"use_reentrant": False})`` after the stack, as ``Trainer`` does.
"""

from __future__ import annotations

import inspect
import math
import re

import torch
from torch import nn

__all__ = ["STACKS", "build_model", "build_stack", "llama3_8b_config", "lora_settings"]

STACKS = ("peft_fast", "peft_bnb")


def llama3_8b_config(layers: int = 32):
    """Llama-3-8B's dimensions (llama3 rope scaling), bf16, SDPA attention."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )  # fmt: skip
    config.torch_dtype = torch.bfloat16
    return config


def lora_settings() -> dict:
    """The LoRA hyper-parameters both stacks get."""
    return {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}


def build_model(config, dtype: torch.dtype = torch.bfloat16, fake: bool = True) -> nn.Module:
    """The causal LM of ``config``: fake storages on the CPU (``fake``), or a real initialised model."""
    import transformers

    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if not fake:
        return transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    _materialize(model, "cpu")
    return model


def _fake_nf4_linear(module: nn.Linear, blocksize: int = 64):
    from peft_fast import NF4Linear, NF4Weight

    out_features, in_features = module.weight.shape
    numel = out_features * in_features
    blocks = math.ceil(numel / blocksize)
    device = module.weight.device
    weight = NF4Weight(
        packed=torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=device),
        absmax=torch.empty(blocks, dtype=torch.uint8, device=device),
        shape=module.weight.shape, dtype=module.weight.dtype, blocksize=blocksize,
        nested_absmax=torch.empty(math.ceil(blocks / 256), dtype=torch.float32, device=device),
        nested_offset=torch.empty((), dtype=torch.float32, device=device),
    )  # fmt: skip
    return NF4Linear(weight, None if module.bias is None else module.bias.detach())


def _skipped(name: str, patterns) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(name == p or last == p or re.fullmatch(p, name) for p in patterns)


def fake_quantize_like_patch(model: nn.Module) -> int:
    """Give every Linear ``patch(quantize="nf4")`` would quantize a fake NF4 weight; returns how many."""
    from peft_fast.quantize import is_quantizable_linear
    from peft_fast.targeting import output_head_names

    skip = (*output_head_names(model), *(getattr(model, "_keep_in_fp32_modules", None) or ()))
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    targets = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and is_quantizable_linear(module) and not _skipped(name, skip)
        and seen.get(id(module.weight), 0) == 1
    ]  # fmt: skip
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _fake_nf4_linear(getattr(parent, child)))
    return len(targets)


def _peft_fast(model: nn.Module, fake: bool, offload: bool, device: str, fused=None) -> nn.Module:
    import peft_fast

    if fake:
        fake_quantize_like_patch(model)
    kwargs = {}
    if fused is not None:  # patch's default (every piece) unless asked
        if "fused" not in inspect.signature(peft_fast.patch).parameters:
            raise ValueError("fused: this peft_fast.patch has no fused argument")
        kwargs["fused"] = fused
    if offload:
        if "offload_activations" not in inspect.signature(peft_fast.patch).parameters:
            raise ValueError("offload=True: this peft_fast.patch has no offload_activations")
        kwargs["offload_activations"] = True
    peft_fast.patch(model, peft_fast.LoraConfig(**lora_settings(), quantize="nf4"), **kwargs)
    move_to(model, device)
    return model


def move_to(model: nn.Module, device: str) -> None:
    """``model.to(device)`` one tensor at a time, ties and ``requires_grad`` kept.

    ``Module.to`` would swap fake tensors across devices (``swap_tensors``), which refuses tensors
    that the fake mode holds weak references to.
    """
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in done:
                    done[id(param)] = nn.Parameter(param.detach().to(device), requires_grad=param.requires_grad)
                module._parameters[name] = done[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


def _fake_params4bit(shape: torch.Size, module: nn.Module, device: str, blocksize: int = 64):
    """A quantized bitsandbytes weight (NF4, double quant) as fake tensors of the right shapes and dtypes.

    What ``Params4bit._quantize`` makes of a bf16 [N, K] weight: packed uint8 [(N·K + 1) // 2, 1] and a
    ``QuantState`` (uint8 block codes, fp32 nested scales per 256 blocks, the 16-entry NF4 code, the
    256-entry dynamic map, a 0-d fp32 offset). bitsandbytes' quantizer reads values (its dynamic
    map goes through ``.tolist()``), so it cannot run on fake tensors. ``Params4bit`` cannot wrap a
    fake tensor either (``_make_subclass`` needs a plain one): the packed fake tensor is given a
    class that is both a ``FakeTensor`` and a ``Params4bit``.
    """
    from bitsandbytes.functional import QuantState

    numel = math.prod(shape)
    blocks = math.ceil(numel / blocksize)
    state2 = QuantState(
        absmax=torch.empty(math.ceil(blocks / 256), dtype=torch.float32, device=device),
        code=torch.empty(256, dtype=torch.float32, device=device),
        blocksize=256,
        dtype=torch.float32,
    )
    state = QuantState(
        absmax=torch.empty(blocks, dtype=torch.uint8, device=device), shape=torch.Size(shape), dtype=torch.bfloat16,
        blocksize=blocksize, code=torch.empty(16, dtype=torch.float32, device=device), quant_type="nf4",
        offset=torch.empty((), dtype=torch.float32, device=device), state2=state2,
    )  # fmt: skip
    packed = torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=device)
    packed.__class__ = _fake_params4bit_class()
    packed.__dict__.update(
        blocksize=blocksize, compress_statistics=True, quant_type="nf4", quant_state=state, quant_storage=torch.uint8,
        bnb_quantized=True, module=module,
    )  # fmt: skip
    module.quant_state = state
    return packed


_FAKE_PARAMS4BIT: list[type] = []


def _fake_params4bit_class() -> type:
    if not _FAKE_PARAMS4BIT:
        import bitsandbytes as bnb
        from torch._subclasses.fake_tensor import FakeTensor

        # Named as bitsandbytes' class: PEFT and transformers test ``__class__.__name__ == "Params4bit"``.
        _FAKE_PARAMS4BIT.append(type("Params4bit", (FakeTensor, bnb.nn.Params4bit), {"__module__": __name__}))
    return _FAKE_PARAMS4BIT[0]


def _materialize(model: nn.Module, device: str) -> None:
    """Fresh (fake) storages on ``device`` for every meta parameter and buffer, ties kept; a bitsandbytes
    ``Params4bit`` becomes a quantized fake one (:func:`_fake_params4bit`)."""
    import sys

    bnb = sys.modules.get("bitsandbytes")  # only a model bitsandbytes built can hold a Params4bit
    params4bit = bnb.nn.Params4bit if bnb is not None else ()
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                if isinstance(param, params4bit):
                    done[id(param)] = _fake_params4bit(param.shape, module, device)
                else:
                    value = torch.empty(param.shape, dtype=param.dtype, device=device)
                    done[id(param)] = nn.Parameter(value, requires_grad=param.requires_grad)
            module._parameters[name] = done[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)


def _peft_bnb(config, device: str, kbit_prepare: bool) -> nn.Module:
    """PEFT + bitsandbytes on fake tensors: the whole structure on the meta device, then fake storages.

    Plain (not fake) meta tensors because bitsandbytes' ``Params4bit`` wraps plain tensors only;
    PEFT's adapters are made (and initialised) on the CPU and follow the base layers to meta.
    """
    import peft
    import transformers
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from transformers.quantizers import AutoHfQuantizer

    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=False)
    with unset_fake_temporarily():
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                                  attn_implementation="sdpa")  # fmt: skip
        quantizer.preprocess_model(model, device_map={"": device})
        quantizer.postprocess_model(model)
        if kbit_prepare:
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = peft.get_peft_model(model, peft.LoraConfig(**lora_settings()))
    _materialize(model, device)
    return model


def build_stack(
    config,
    stack: str,
    *,
    fake: bool = True,
    device: str = "cuda",
    checkpointing: bool = True,
    offload: bool = False,
    kbit_prepare: bool = False,
    fused=None,
) -> nn.Module:
    """The model of ``config`` under ``stack`` ("peft_fast", "peft_bnb", or "none": the plain model, all trained)."""
    if stack == "peft_fast":
        model = _peft_fast(build_model(config, fake=fake), fake, offload, device, fused)
    elif stack == "peft_bnb":
        if offload:
            raise ValueError("offload is a peft_fast option; PEFT + bitsandbytes has none")
        if not fake:
            raise ValueError("the peft_bnb stack is built on fake tensors only (bitsandbytes needs CUDA to quantize)")
        model = _peft_bnb(config, device, kbit_prepare)
    elif stack == "none":  # the plain model, every parameter trained (full fine-tuning)
        model = build_model(config, fake=fake)
        move_to(model, device)
    else:
        raise ValueError(f"unknown stack {stack!r}; choose from {', '.join(STACKS)} (or 'none')")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model
