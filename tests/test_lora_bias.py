"""lora_bias=True (PEFT: lora_B has a bias, trained, scaled with B·A) against PEFT on a tiny Qwen2.

Qwen2's q / k / v projections have biases (merging folds s·b_B into them), o_proj has none
(PEFT warns at creation and refuses to merge; so do we, before anything changes).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

import peft_fast

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj"]


def tiny_qwen2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96)  # fmt: skip
    return transformers.Qwen2ForCausalLM(config)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def both(**extra):
    base = tiny_qwen2()
    settings = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_bias=True, **extra)
    ours = peft_fast.patch(copy.deepcopy(base), peft_fast.LoraConfig(**settings))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**settings))
    # B and its bias away from zero, the same values in both models.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        ours_params = dict(ours.named_parameters())
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                ours_params[name.removeprefix("base_model.model.")].copy_(param)
    return base, ours, theirs


def test_forward_backward_and_files_match_peft(tmp_path):
    base, ours, theirs = both()
    layer = ours.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].bias is not None and layer.lora_B["default"].bias.requires_grad
    ids = torch.randint(0, 96, (2, 10))
    assert rel(ours(ids).logits, theirs(ids).logits) < 1e-5
    assert rel(ours(ids).logits, base(ids).logits) > 1e-3  # the biases count
    ours(ids, labels=ids).loss.backward()
    theirs(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    peft_grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads.keys() == peft_grads.keys() and any(n.endswith("lora_B.default.bias") for n in grads)
    for name, grad in grads.items():
        assert rel(grad, peft_grads[name]) < 1e-4, name
    # Files: PEFT's keys and config, both ways.
    peft_fast.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["lora_bias"] is True
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert rel(loaded(ids).logits, ours(ids).logits) < 1e-6
    theirs.save_pretrained(tmp_path / "theirs")
    mine = peft_fast.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert rel(mine(ids).logits, theirs(ids).logits) < 1e-6


def test_merge_folds_the_scaled_bias_as_peft():
    base, ours, theirs = both()
    ids = torch.randint(0, 96, (2, 10))
    want = ours(ids).logits
    merged = peft_fast.merge(ours)
    peft_merged = theirs.merge_and_unload()
    assert rel(merged(ids).logits, want) < 1e-5
    ours_bias = merged.model.layers[1].self_attn.v_proj.bias
    assert rel(ours_bias, peft_merged.model.layers[1].self_attn.v_proj.bias) < 1e-6
    assert rel(ours_bias, base.model.layers[1].self_attn.v_proj.bias) > 1e-3


def test_disabled_adapters_drop_the_bias_too():
    base, ours, _ = both()
    ids = torch.randint(0, 96, (2, 10))
    with peft_fast.disable_adapters(ours):
        assert rel(ours(ids).logits, base(ids).logits) < 1e-6


def test_no_base_bias_warns_and_merge_refuses_before_changing_anything():
    model = tiny_qwen2()
    with pytest.warns(UserWarning, match="without a bias: merging this adapter will not be possible"):
        peft_fast.patch(model, peft_fast.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], lora_bias=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"cannot merge model\.layers\.0\.self_attn\.o_proj: .* no bias"):
        peft_fast.merge(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_qlora_with_lora_bias_adds_the_scaled_bias_over_nf4():
    """Over NF4 bases: the same as plain QLoRA whose base biases hold s·b_B (the op's one epilogue)."""
    base, ours, _ = both()
    common = dict(r=4, lora_alpha=8, target_modules=TARGETS, quantize="nf4")
    with_bias = peft_fast.patch(copy.deepcopy(base), peft_fast.LoraConfig(**common, lora_bias=True))
    plain = peft_fast.patch(copy.deepcopy(base), peft_fast.LoraConfig(**common))
    with torch.no_grad():
        for model in (with_bias, plain):
            params = dict(model.named_parameters())
            for name, param in ours.named_parameters():
                if param.requires_grad and name in params:
                    params[name].copy_(param)
        for name, module in with_bias.named_modules():
            if hasattr(module, "lora_B") and module.lora_B["default"].bias is not None:
                extra = module.scaling["default"] * module.lora_B["default"].bias
                plain.get_submodule(name).base_layer.bias.add_(extra)
    ids = torch.randint(0, 96, (2, 10))
    assert rel(with_bias(ids).logits, plain(ids).logits) < 1e-5
    fresh = peft_fast.patch(copy.deepcopy(base), peft_fast.LoraConfig(**common))  # B = 0: the adapter matters
    assert rel(with_bias(ids).logits, fresh(ids).logits) > 1e-3


def test_bad_combinations_are_clear_errors():
    with pytest.raises(ValueError, match="not supported for DoRA"):
        peft_fast.LoraConfig(target_modules=TARGETS, lora_bias=True, use_dora=True)
    with pytest.raises(ValueError, match="only supported with init_lora_weights=True or False"):
        peft_fast.LoraConfig(target_modules=TARGETS, lora_bias=True, init_lora_weights="gaussian")
    model = tiny_qwen2()
    with pytest.raises(ValueError, match="not supported for embedding layers"):
        peft_fast.patch(model, peft_fast.LoraConfig(target_modules=["embed_tokens"], lora_bias=True))
