"""Train a tiny Llama for 30 steps with peft_fast and with the reference stack, from one seed.

One wrong gradient anywhere shows up here as diverging loss curves or adapter weights, even when
every unit test passes. Dense base: PEFT 0.21 LoRA; NF4 base: PEFT + bitsandbytes 0.50.2 4-bit.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers

import peft_fast
from peft_fast.lora import lora_layers

STEPS = 30
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def train(model, batches) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for ids in batches:
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def copy_peft_init_into_ours(peft_model, ours) -> None:
    for name, layer in lora_layers(ours):
        theirs = peft_model.base_model.model.get_submodule(name)
        layer.lora_A["default"].weight.data.copy_(theirs.lora_A["default"].weight)
        layer.lora_B["default"].weight.data.copy_(theirs.lora_B["default"].weight)


def adapter_weights(model, prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        name.removeprefix(prefix).replace(".default", ""): p.detach().clone()
        for name, p in model.named_parameters()
        if "lora_" in name
    }


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_thirty_steps_match_the_reference_stack(quantize, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")
    generator = torch.Generator().manual_seed(3)
    # Two fixed batches, alternating: the adapters can memorise them, so the loss really falls.
    fixed = [torch.randint(0, 128, (4, 12), generator=generator) for _ in range(2)]
    batches = [fixed[step % 2] for step in range(STEPS)]

    base = tiny_llama()
    config = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGETS}
    if quantize is None:
        reference_model = copy.deepcopy(base)
    else:
        base.save_pretrained(tmp_path)
        bnb_config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
        reference_model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=bnb_config, device_map="cpu", dtype=torch.float32
        )
    torch.manual_seed(1)
    reference = peft.get_peft_model(reference_model, peft.LoraConfig(**config))
    ours = peft_fast.patch(copy.deepcopy(base), peft_fast.LoraConfig(**config, quantize=quantize))
    copy_peft_init_into_ours(reference, ours)

    reference_losses = train(reference, batches)
    our_losses = train(ours, batches)

    assert max(our_losses[-2:]) < 0.85 * min(our_losses[:2]), our_losses  # it learns
    tolerance = 1e-4 if quantize is None else 1e-3
    for step, (a, b) in enumerate(zip(our_losses, reference_losses, strict=False)):
        assert abs(a - b) <= tolerance * abs(b), (step, a, b)
    theirs = adapter_weights(reference, "base_model.model.")
    mine = adapter_weights(ours)
    assert theirs.keys() == mine.keys()
    for name, weight in theirs.items():
        error = (mine[name] - weight).norm() / weight.norm()
        assert error < 10 * tolerance, (name, float(error))
