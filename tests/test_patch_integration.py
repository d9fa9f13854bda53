"""`patch` inside the Hugging Face stack: Trainer, generate, checkpointing, compile, errors, saving."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import transformers

import peft_fast
from peft_fast.layers import LoraLinear, NF4Linear
from peft_fast.lora import lora_layers


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def lora_config(**overrides) -> peft_fast.LoraConfig:
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    return peft_fast.LoraConfig(**{**settings, **overrides})


def randomize_adapters(model) -> None:
    """Give B non-zero values so the adapter changes outputs (PEFT initialises B to zero)."""
    generator = torch.Generator().manual_seed(1)
    for _, layer in lora_layers(model):
        for adapter in layer.lora_B:
            weight = layer.lora_B[adapter].weight
            weight.data.copy_(torch.randn(weight.shape, generator=generator) * 0.1)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gradient_checkpointing_gives_the_same_gradients(quantize):
    ids = torch.randint(0, 128, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model = peft_fast.patch(tiny_llama(), lora_config(quantize=quantize, lora_dropout=0.1))
        randomize_adapters(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        torch.manual_seed(5)  # the same dropout seeds in both runs
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_trainer_step_changes_only_adapter_weights(tmp_path):
    model = peft_fast.patch(tiny_llama(), lora_config(quantize="nf4"))
    randomize_adapters(model)
    before = snapshot(model)
    ids = torch.randint(0, 128, (8, 10))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=dataset).train()
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the step changed nothing"
    assert all(".lora_A." in k or ".lora_B." in k for k in changed), sorted(changed)[:5]
    assert sum(".lora_A." in k or ".lora_B." in k for k in changed) == 2 * len(list(lora_layers(model)))


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_generate_works_and_uses_the_adapter(quantize):
    model = peft_fast.patch(tiny_llama(), lora_config(quantize=quantize))
    randomize_adapters(model)
    prompt = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        with peft_fast.disable_adapters(model):
            base_out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        logits = model(prompt).logits
        with peft_fast.disable_adapters(model):
            base_logits = model(prompt).logits
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    assert not torch.allclose(logits, base_logits)  # the adapter is live during generation too
    assert base_out.shape == out.shape


def test_torch_compile_on_the_patched_model():
    model = peft_fast.patch(tiny_llama(), lora_config(quantize="nf4"))
    randomize_adapters(model)
    model.train()
    ids = torch.randint(0, 128, (2, 8))
    eager_loss = model(ids, labels=ids).loss
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


def test_patched_nf4_model_state_dict_has_peft_bnb_keys_and_reloads():
    model = peft_fast.patch(tiny_llama(), lora_config(quantize="nf4"))
    randomize_adapters(model)
    state = model.state_dict()
    prefix = "model.layers.0.self_attn.q_proj.base_layer.weight"
    suffixes = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")
    for suffix in suffixes:
        assert prefix + suffix in state
    assert "model.layers.0.mlp.up_proj.weight.absmax" in state  # untargeted layers are NF4 too
    fresh = peft_fast.patch(tiny_llama(seed=7), lora_config(quantize="nf4"))
    fresh.load_state_dict(state)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_merge_and_unpatch():
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        reference = base(ids).logits
    original_types = {n: type(m) for n, m in base.named_modules()}
    model = peft_fast.patch(copy.deepcopy(base), lora_config())
    randomize_adapters(model)
    with torch.no_grad():
        patched = model(ids).logits
    peft_fast.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == original_types
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)

    model = peft_fast.patch(copy.deepcopy(base), lora_config())
    randomize_adapters(model)
    with torch.no_grad():
        patched = model(ids).logits
    assert not torch.allclose(patched, reference)
    merged = peft_fast.merge(model)
    assert not any(type(m).__module__.startswith("peft_fast") for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, patched, rtol=1e-5, atol=1e-5)


def test_qlora_merge_dequantizes_everything():
    model = peft_fast.patch(tiny_llama(), lora_config(quantize="nf4"))
    randomize_adapters(model)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        patched = model(ids).logits
        merged = peft_fast.merge(model)
        assert not any(isinstance(m, (NF4Linear, LoraLinear)) for m in merged.modules())
        torch.testing.assert_close(merged(ids).logits, patched, rtol=1e-4, atol=1e-4)


def test_adapters_add_set_and_disable():
    model = peft_fast.patch(tiny_llama(), lora_config())
    randomize_adapters(model)
    peft_fast.add_adapter(model, lora_config(r=2), "second")
    randomize_adapters(model)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        first = model(ids).logits
        peft_fast.set_adapter(model, "second")
        second = model(ids).logits
        with peft_fast.disable_adapters(model):
            base = model(ids).logits
        reference = tiny_llama()(ids).logits
    assert not torch.allclose(first, second)
    torch.testing.assert_close(base, reference)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n for n in trainable)
    with pytest.raises(ValueError, match="unknown adapter"):
        peft_fast.set_adapter(model, "third")


# -- errors leave the model unchanged -----------------------------------------------------


def assert_unchanged(model, before_state, before_types) -> None:
    assert {n: type(m) for n, m in model.named_modules()} == before_types
    after = model.state_dict()
    assert after.keys() == before_state.keys()
    assert all(torch.equal(after[k], v) for k, v in before_state.items())


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (lora_config(target_modules=["q_prj"]), r"matches no module.*q_proj"),
        # LoRA on embed_tokens (an nn.Embedding) is supported since PEFT-semantics work; a norm is still refused.
        (lora_config(target_modules=["q_proj", "input_layernorm"]), "not Linear / Conv1D.*LlamaRMSNorm"),
        (lora_config(modules_to_save=["nothing_here"]), "modules_to_save"),
    ],
)
def test_bad_patch_is_a_clear_error_and_changes_nothing(config, match):
    model = tiny_llama()
    state, types = snapshot(model), {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=match):
        peft_fast.patch(model, config)
    assert_unchanged(model, state, types)


def test_patching_twice_is_an_error():
    model = peft_fast.patch(tiny_llama(), lora_config())
    state, types = snapshot(model), {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="already patched"):
        peft_fast.patch(model, lora_config())
    assert_unchanged(model, state, types)


def test_loading_an_adapter_for_another_base_is_an_error(tmp_path):
    model = peft_fast.patch(tiny_llama(), lora_config())
    peft_fast.save_adapter(model, tmp_path)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)  # fmt: skip
    other = transformers.LlamaForCausalLM(config)
    state, types = snapshot(other), {n: type(m) for n, m in other.named_modules()}
    with pytest.raises(ValueError, match="does not fit"):
        peft_fast.load_adapter(other, tmp_path)
    assert_unchanged(other, state, types)


def test_loading_an_adapter_with_a_wrong_rank_is_an_error(tmp_path):
    model = peft_fast.patch(tiny_llama(), lora_config())
    peft_fast.save_adapter(model, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = 8
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lora_A\.weight: file has \(4, 64\), model needs \(8, 64\)"):
        peft_fast.load_adapter(tiny_llama(), tmp_path)


def test_unsupported_peft_features_and_pickles_are_refused(tmp_path):
    model = peft_fast.patch(tiny_llama(), lora_config())
    peft_fast.save_adapter(model, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "layer_replication": [[0, 1]]}))
    with pytest.raises(ValueError, match="layer_replication"):
        peft_fast.load_adapter(tiny_llama(), tmp_path)
    config_path.write_text(json.dumps(config))
    os.rename(tmp_path / "adapter_model.safetensors", tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        peft_fast.load_adapter(tiny_llama(), tmp_path)


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model = peft_fast.patch(tiny_llama(), lora_config())
    randomize_adapters(model)
    peft_fast.save_adapter(model, tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for _, layer in lora_layers(model):
        layer.lora_B["default"].weight.data.add_(1.0)

    real_fsync = os.fsync
    calls = {"n": 0}

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:  # the second file: the first temporary is already complete
            raise OSError("disk full")
        return real_fsync(fd)

    monkeypatch.setattr("peft_fast.io.os.fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        peft_fast.save_adapter(model, tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files  # no temp files left either


def test_trainable_parameters_and_print(capsys):
    model = peft_fast.patch(tiny_llama(), lora_config(target_modules="all-linear"))
    trainable, _total = peft_fast.trainable_parameters(model)
    per_layer = sum(4 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])
    assert trainable == 2 * per_layer
    peft_fast.print_trainable_parameters(model)
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out


@pytest.mark.slow
def test_inductor_compiles_the_qlora_model_once_and_matches_eager():
    """Inductor on CPU: same loss as eager, and new dropout seeds per call cause no recompilation."""
    from torch._dynamo.utils import counters

    model = peft_fast.patch(tiny_llama(), lora_config(quantize="nf4", lora_dropout=0.1))
    randomize_adapters(model)
    model.train()
    ids = torch.randint(0, 128, (2, 8))
    compiled = torch.compile(model)
    counters.clear()
    compiled(ids, labels=ids).loss.backward()
    compiled(ids, labels=ids).loss.backward()  # a fresh dropout seed: must reuse the graph
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for _, layer in lora_layers(model):
        layer.lora_dropout_p["default"] = 0.0
    torch._dynamo.reset()
    eager = model(ids, labels=ids).loss
    torch.testing.assert_close(torch.compile(model)(ids, labels=ids).loss, eager, rtol=1e-5, atol=1e-5)
