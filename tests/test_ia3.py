"""(IA)³ in models: identity at init, logits and gradients equal to PEFT 0.21, PEFT-format files both
ways, merge / unpatch, NF4 bases, training, LoRA + (IA)³ together, and errors.

Tiny randomly initialised fp32 models (hidden 64) built from configs; the torch backend unless a
test says otherwise (the kernels' own float64 checks are in test_kernel_ia3.py).
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from tiny_models import VOCAB, batch, logits, loss_of
from tiny_models import build as build_tiny

import peft_fast
from peft_fast.ia3 import ia3_layers
from peft_fast.nf4 import dequantize_nf4

peft = pytest.importorskip("peft")


def build(arch: str) -> torch.nn.Module:
    return build_tiny(arch, random_bert_biases=True)


def peft_ia3(base: torch.nn.Module) -> torch.nn.Module:
    """PEFT's (IA)³ model with PEFT's default targets and random (not ones) vectors."""
    return peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(init_ia3_weights=False)).eval()


def copy_vectors_from_peft(theirs: torch.nn.Module, ours: torch.nn.Module) -> None:
    for name, layer in ia3_layers(ours):
        source = theirs.get_submodule(f"base_model.model.{name}").ia3_l["default"]
        layer.ia3_l["default"].data.copy_(source.data)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


# -- identity and parity with PEFT --------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "t5", "gpt2", "bert"])
def test_vectors_of_ones_leave_logits_bit_identical(arch):
    base = build(arch)
    inputs = batch(arch)
    expected = logits(base, inputs)
    model = peft_fast.patch_ia3(base, peft_fast.IA3Config())
    assert len(list(ia3_layers(model))) > 0
    assert torch.equal(logits(model, inputs), expected)


def test_vectors_of_ones_over_nf4_bases_leave_logits_bit_identical():
    quantized = peft_fast.quantize_model(build("llama"), progress=False)
    inputs = batch("llama")
    expected = logits(quantized, inputs)
    assert torch.equal(logits(peft_fast.patch_ia3(quantized, peft_fast.IA3Config()), inputs), expected)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_logits_equal_peft_with_the_same_vectors(arch):
    base = build(arch)
    inputs = batch(arch)
    theirs = peft_ia3(base)
    ours = peft_fast.patch_ia3(copy.deepcopy(base), peft_fast.IA3Config())
    copy_vectors_from_peft(theirs, ours)
    expected = logits(theirs, inputs)
    assert rel_err(expected, logits(base, inputs)) > 0.05  # the vectors matter
    torch.testing.assert_close(logits(ours, inputs), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_one_sgd_step_matches_peft(arch):
    base = build(arch)
    inputs = batch(arch)
    theirs = peft_ia3(base).train()
    ours = peft_fast.patch_ia3(copy.deepcopy(base), peft_fast.IA3Config()).train()
    copy_vectors_from_peft(theirs, ours)
    for model in (theirs, ours):
        loss_of(model, inputs).backward()
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param -= 0.5 * param.grad
    for name, layer in ia3_layers(ours):
        want = theirs.get_submodule(f"base_model.model.{name}").ia3_l["default"]
        torch.testing.assert_close(layer.ia3_l["default"], want, rtol=1e-5, atol=1e-6, msg=name)


def test_nf4_bases_match_peft_on_the_dequantized_weights():
    """(IA)³ over NF4 weights equals PEFT's (IA)³ over a dense model holding deq(W)."""
    base = build("llama")
    inputs = batch("llama")
    ours = peft_fast.patch_ia3(copy.deepcopy(base), peft_fast.IA3Config(quantize="nf4"))
    dense = copy.deepcopy(base)
    for name, module in ours.named_modules():
        if isinstance(module, peft_fast.NF4Linear):
            target = dense.get_submodule(name.removesuffix(".base_layer"))
            target.weight.data.copy_(dequantize_nf4(module.nf4, torch.float32))
    theirs = peft_ia3(dense)
    copy_vectors_from_peft(theirs, ours)
    assert any(isinstance(layer.base_layer, peft_fast.NF4Linear) for _, layer in ia3_layers(ours))
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=1e-5, atol=1e-5)


def test_trainable_parameter_count_matches_peft_and_the_formula(capsys):
    base = build("llama")
    ours = peft_fast.patch_ia3(copy.deepcopy(base), peft_fast.IA3Config())
    theirs = peft_ia3(base)
    # Per layer: k_proj and v_proj scale their 32 outputs (2 KV heads x 16), down_proj its 128 inputs.
    expected = 2 * (32 + 32 + 128)
    trainable, _ = peft_fast.trainable_parameters(ours)
    assert trainable == expected == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    peft_fast.print_trainable_parameters(ours)
    assert f"trainable params: {expected:,d}" in capsys.readouterr().out


# -- files ---------------------------------------------------------------------------------------


def _randomize(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(3)
    for _, layer in ia3_layers(model):
        vector = layer.ia3_l["default"]
        vector.data.copy_(1 + 0.5 * torch.randn(vector.shape, generator=generator))  # copy_ moves it


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_peft_loads_our_adapter_and_reproduces_our_logits(arch, tmp_path):
    base = build(arch)
    inputs = batch(arch)
    ours = peft_fast.patch_ia3(copy.deepcopy(base), peft_fast.IA3Config())
    _randomize(ours)
    peft_fast.save_ia3(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    expected = logits(ours, inputs)
    assert rel_err(expected, logits(base, inputs)) > 0.05
    torch.testing.assert_close(logits(theirs, inputs), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_we_load_peft_adapters_and_write_the_same_files(arch, tmp_path):
    base = build(arch)
    inputs = batch(arch)
    theirs = peft_ia3(base)
    theirs.save_pretrained(tmp_path / "peft")
    ours = peft_fast.load_ia3(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in ours.parameters())  # loaded for inference by default
    peft_fast.save_ia3(ours, tmp_path / "ours")
    files = {}
    for who in ("peft", "ours"):
        with safe_open(tmp_path / who / "adapter_model.safetensors", "pt") as handle:
            files[who] = {key: handle.get_tensor(key) for key in handle.keys()}
    assert files["ours"].keys() == files["peft"].keys()
    assert all(key.startswith("base_model.model.") and key.endswith(".ia3_l") for key in files["ours"])
    for key, tensor in files["peft"].items():
        assert torch.equal(files["ours"][key], tensor), key
    configs = {who: json.loads((tmp_path / who / "adapter_config.json").read_text()) for who in ("peft", "ours")}
    assert configs["ours"].keys() == configs["peft"].keys()
    for key in ("peft_type", "fan_in_fan_out", "init_ia3_weights", "modules_to_save", "exclude_modules"):
        assert configs["ours"][key] == configs["peft"][key], key
    for key in ("target_modules", "feedforward_modules"):
        assert sorted(configs["ours"][key]) == sorted(configs["peft"][key]), key


def test_a_wrong_adapter_is_refused_before_the_model_changes(tmp_path):
    model = peft_fast.patch_ia3(build("llama"), peft_fast.IA3Config())
    peft_fast.save_ia3(model, tmp_path)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)  # fmt: skip
    other = transformers.LlamaForCausalLM(config)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"down_proj.ia3_l: file has \(1, 128\), model needs \(1, 96\)"):
        peft_fast.load_ia3(other, tmp_path)
    assert not list(ia3_layers(other)) and other.state_dict().keys() == before.keys()


# -- merge, unpatch, training -------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "quantize"), [("llama", None), ("gpt2", None), ("llama", "nf4")])
def test_merge_gives_a_plain_model_with_the_same_logits(arch, quantize):
    inputs = batch(arch)
    model = peft_fast.patch_ia3(build(arch), peft_fast.IA3Config(quantize=quantize))
    _randomize(model)
    # Output-scaled layers with a bias (GPT-2's c_attn) must scale the bias too.
    expected = logits(model, inputs)
    merged = peft_fast.merge_ia3(model)
    assert not any(isinstance(m, (peft_fast.IA3Linear, peft_fast.NF4Linear)) for m in merged.modules())
    assert not hasattr(merged, "peft_fast_ia3_state")
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=1e-5, atol=1e-5)


def test_unpatch_restores_the_original_model():
    base = build("gpt2")
    inputs = batch("gpt2")
    keys = base.state_dict().keys()
    expected = logits(base, inputs)
    model = peft_fast.patch_ia3(copy.deepcopy(base), peft_fast.IA3Config())
    _randomize(model)
    restored = peft_fast.unpatch_ia3(model)
    assert restored.state_dict().keys() == keys
    assert type(restored.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert torch.equal(logits(restored, inputs), expected)


@pytest.mark.parametrize(("arch", "quantize"), [("llama", None), ("t5", None), ("llama", "nf4")])
def test_training_reduces_the_loss(arch, quantize):
    """20 Adam steps from vectors of ones: the loss curve and the trained vectors are those of PEFT's
    own (IA)³ on the same model (over NF4 bases: PEFT over a dense model holding deq(W)), step by
    step, and the loss falls step after step."""
    inputs = batch(arch)
    base = build(arch)
    model = peft_fast.patch_ia3(copy.deepcopy(base), peft_fast.IA3Config(quantize=quantize)).train()
    for name, module in model.named_modules():
        if isinstance(module, peft_fast.NF4Linear):
            target = base.get_submodule(name.removesuffix(".base_layer"))
            target.weight.data.copy_(dequantize_nf4(module.nf4, torch.float32))
    reference = peft.get_peft_model(base, peft.IA3Config()).train()  # PEFT's default targets, vectors of ones
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    def train(trained: torch.nn.Module) -> list[float]:
        optimizer = torch.optim.Adam([p for p in trained.parameters() if p.requires_grad], lr=0.3)
        losses = []
        for _ in range(20):
            optimizer.zero_grad()
            loss = loss_of(trained, inputs)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    losses, expected = train(model), train(reference)
    for step, (ours, theirs) in enumerate(zip(losses, expected, strict=True)):
        assert abs(ours - theirs) <= 1e-4 * theirs, (step, losses, expected)
    layers = list(ia3_layers(model))
    assert layers
    for name, layer in layers:
        want = reference.get_submodule(f"base_model.model.{name}").ia3_l["default"]
        assert rel_err(layer.ia3_l["default"], want) < 1e-3, name
    # A few hundred scales cannot memorise much of a random model's batch; the loss still falls
    # step after step.
    assert all(b < a for a, b in itertools.pairwise(losses[:6])), losses
    assert losses[-1] < 0.95 * losses[0], losses
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


def test_triton_backend_matches_the_torch_backend(monkeypatch):
    """The whole model through the kernels (the GPU when there is one, else the interpreter):
    loss and vector gradients equal the torch backend's."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = {k: v.to(device) for k, v in batch("llama").items()}
    model = peft_fast.patch_ia3(build("llama").to(device), peft_fast.IA3Config(quantize="nf4"))
    _randomize(model)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("PEFT_FAST_BACKEND", backend)
        model.zero_grad()
        loss = loss_of(model, inputs)
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    for name, grad in results["torch"][1].items():
        assert rel_err(results["triton"][1][name], grad) < 1e-4, name


# -- LoRA and (IA)³ together -----------------------------------------------------------------------


def test_lora_and_ia3_on_different_modules(tmp_path):
    base = build("llama")
    inputs = batch("llama")
    lora = peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    model = peft_fast.patch(copy.deepcopy(base), lora)
    model = peft_fast.patch_ia3(model, peft_fast.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                           feedforward_modules=["down_proj"]))  # fmt: skip
    _randomize(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".ia3_l." in n for n in trainable)
    assert any(".lora_" in n for n in trainable) and any(".ia3_l." in n for n in trainable)
    expected = logits(model, inputs)
    peft_fast.save_adapter(model, tmp_path / "lora")
    peft_fast.save_ia3(model, tmp_path / "ia3")

    # Both adapters reload into a fresh model and give the same logits.
    reloaded = peft_fast.load_ia3(peft_fast.load_adapter(copy.deepcopy(base), tmp_path / "lora"), tmp_path / "ia3")
    torch.testing.assert_close(logits(reloaded, inputs), expected, rtol=1e-6, atol=1e-6)
    # Folding both in gives a plain model with the same logits.
    merged = peft_fast.merge(peft_fast.merge_ia3(copy.deepcopy(model)))
    assert all(type(m) in (torch.nn.Linear,) for n, m in merged.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=1e-5, atol=1e-5)

    # Training moves both kinds of parameters and lowers the loss.
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = loss_of(model, inputs)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in itertools.pairwise(losses[:6])), losses
    assert losses[-1] < 0.95 * losses[0], losses
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_ia3_refuses_lora_layers():
    model = peft_fast.patch(build("llama"), peft_fast.LoraConfig(r=4, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"already a LoRA layer; .* must target different modules"):
        peft_fast.patch_ia3(model, peft_fast.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))


def test_bf16_model_with_vectors_of_ones_is_bit_identical():
    base = build("t5").to(torch.bfloat16)
    inputs = batch("t5")
    expected = logits(base, inputs)
    model = peft_fast.patch_ia3(copy.deepcopy(base), peft_fast.IA3Config())
    # fp32 vectors over the bf16 base, as PEFT's autocast_adapter_dtype keeps them.
    assert all(layer.ia3_l["default"].dtype == torch.float32 for _, layer in ia3_layers(model))
    assert torch.equal(logits(model, inputs), expected)


def test_torch_backend_gradients_pass_gradcheck_in_float64():
    x = torch.randn(2, 3, 64, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(24, dtype=torch.float64, requires_grad=True)
    for base in (torch.randn(24, 64, dtype=torch.float64), peft_fast.quantize_nf4(torch.randn(24, 64))):
        for scale_input in (False, True):
            scale = torch.randn(64 if scale_input else 24, dtype=torch.float64, requires_grad=True)

            def layer(x, scale, bias, base=base, scale_input=scale_input):
                return peft_fast.ia3_linear(x, base, scale, bias, scale_input=scale_input)

            assert torch.autograd.gradcheck(layer, (x, scale, bias))


def test_the_custom_op_passes_opcheck():
    from peft_fast.ops.ia3 import _ia3_linear_op

    x = torch.randn(2, 3, 64, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    dense = torch.randn(24, 64)
    nf4 = peft_fast.quantize_nf4(torch.randn(24, 64))
    nf4_extra = (nf4.absmax, nf4.nested_absmax, nf4.nested_offset, nf4.blocksize)
    for weight, extra in ((dense, (None, None, None, 0)), (nf4.packed, nf4_extra)):
        for scale_input in (False, True):
            scale = torch.rand(64 if scale_input else 24, requires_grad=True)
            args = (x, weight, *extra, 24, 64, scale, bias, scale_input)
            torch.library.opcheck(_ia3_linear_op, args)


# -- bad input -----------------------------------------------------------------------------------


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match=r"feedforward_modules .* must be a subset of target_modules"):
        peft_fast.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match=r"matches no module .* Close names: .*k_proj"):
        peft_fast.patch_ia3(build("llama"), peft_fast.IA3Config(target_modules=["kproj"], feedforward_modules=[]))
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=1,
                                                             num_attention_heads=4, vocab_size=VOCAB,
                                                             word_embed_proj_dim=64))  # fmt: skip
    with pytest.raises(ValueError, match=r"no default .* targets for model type 'opt'"):
        peft_fast.patch_ia3(opt, peft_fast.IA3Config())
    model = peft_fast.patch_ia3(build("llama"), peft_fast.IA3Config())
    with pytest.raises(ValueError, match=r"already has the .* adapter\(s\) \['default'\]; use peft_fast.add_adapter"):
        peft_fast.patch_ia3(model, peft_fast.IA3Config())


def test_peft_configs_we_cannot_run_are_refused(tmp_path):
    model = peft_fast.patch_ia3(build("llama"), peft_fast.IA3Config())
    peft_fast.save_ia3(model, tmp_path)
    path = Path(tmp_path) / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))  # the head's tensors are not there
    with pytest.raises(ValueError, match=r"missing base_model\.model\.lm_head\.weight"):
        peft_fast.load_ia3(build("llama"), tmp_path)
    path.write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match="not an \\(IA\\)³ adapter"):
        peft_fast.load_ia3(build("llama"), tmp_path)


# -- modules_to_save and several adapters, against PEFT ---------------------------------------------


def _peft_name(ours: str) -> str:
    """PEFT's parameter name for one of ours: its prefix, and modules_to_save inside the wrapper."""
    name = f"base_model.model.{ours}"
    return name.replace("lm_head.", "lm_head.modules_to_save.default.") if ".lm_head." in name else name


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_modules_to_save_matches_peft_outputs_gradients_files_merge_and_disable(tmp_path):
    base = build("llama")
    inputs = batch("llama")
    config = {"init_ia3_weights": False, "modules_to_save": ["lm_head"]}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**config))
    ours = peft_fast.patch(copy.deepcopy(base), peft_fast.IA3Config(**config), fused=False)
    copy_vectors_from_peft(theirs, ours)
    with torch.no_grad():  # a head PEFT and we both train, moved away from the base's
        theirs.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.05)
        ours.lm_head.weight.add_(0.05)
    their_params = dict(theirs.named_parameters())
    assert {_peft_name(n) for n in _trainable(ours)} == set(_trainable(theirs))
    assert "lm_head.weight" in _trainable(ours)
    assert ours.lm_head.weight is not base.lm_head.weight

    theirs.eval(), ours.eval()
    expected = logits(theirs, inputs)
    torch.testing.assert_close(logits(ours, inputs), expected, rtol=1e-5, atol=1e-5)
    for model in (theirs, ours):
        loss_of(model, inputs).backward()
    for name, param in _trainable(ours).items():
        torch.testing.assert_close(param.grad, their_params[_peft_name(name)].grad, rtol=1e-4, atol=1e-6, msg=name)

    with peft_fast.disable_adapters(ours), theirs.disable_adapter():  # the original head and no vectors
        assert torch.equal(logits(ours, inputs), logits(base, inputs))
        torch.testing.assert_close(logits(theirs, inputs), logits(base, inputs), rtol=0, atol=1e-6)

    peft_fast.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    files = {who: load_file_dict(tmp_path / who / "adapter_model.safetensors") for who in ("ours", "peft")}
    assert files["ours"].keys() == files["peft"].keys() and "base_model.model.lm_head.weight" in files["ours"]
    for key, tensor in files["peft"].items():
        assert torch.equal(files["ours"][key], tensor), key
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["lm_head"]
    loaded_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded_by_peft, inputs), expected, rtol=1e-5, atol=1e-5)
    loaded_by_us = peft_fast.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded_by_us, inputs), expected, rtol=1e-5, atol=1e-5)

    merged = peft_fast.merge(copy.deepcopy(ours))
    torch.testing.assert_close(logits(merged, inputs), logits(theirs.merge_and_unload(), inputs), rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    restored = peft_fast.unpatch(ours)
    assert torch.equal(restored.lm_head.weight, base.lm_head.weight)
    assert torch.equal(logits(restored, inputs), logits(base, inputs))


def load_file_dict(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def test_several_adapters_with_set_adapter_match_peft_and_save_in_its_layout(tmp_path):
    """Two (IA)³ adapters, each with its own copy of the head: switching, both active, files both ways."""
    base = build("llama")
    inputs = batch("llama")
    first = {"init_ia3_weights": False, "modules_to_save": ["lm_head"]}
    second = {"target_modules": ["q_proj", "down_proj"], "feedforward_modules": ["down_proj"],
              "init_ia3_weights": False, "modules_to_save": ["lm_head"]}  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**first))
    theirs.add_adapter("other", peft.IA3Config(**second))
    ours = peft_fast.patch(copy.deepcopy(base), peft_fast.IA3Config(**first), fused=False)
    peft_fast.add_adapter(ours, peft_fast.IA3Config(**second), "other")
    assert ours.active_adapters() == ["default"]
    assert not any(".other" in n for n in _trainable(ours))  # added inactive and frozen, as PEFT does
    with torch.no_grad():  # PEFT's vectors and a different head per adapter, in both models
        for name, layer in ia3_layers(ours):
            for adapter, vector in layer.ia3_l.items():
                vector.copy_(theirs.get_submodule(f"base_model.model.{name}").ia3_l[adapter])
        heads = theirs.base_model.model.lm_head.modules_to_save
        for shift, adapter in ((0.05, "default"), (-0.08, "other")):
            heads[adapter].weight.add_(shift)
        ours.lm_head.weight.add_(0.05)
        peft_fast.set_adapter(ours, "other")
        ours.lm_head.weight.add_(-0.08)
    theirs.eval(), ours.eval()
    outputs = {}
    # Both active would need two heads at once: PEFT refuses it, so do we (naming the module).
    with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
        theirs.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"lm_head is in modules_to_save of several active adapters"):
        peft_fast.set_adapter(ours, ["default", "other"])
    for active in (["default"], ["other"]):
        theirs.base_model.set_adapter(active)
        peft_fast.set_adapter(ours, active)
        outputs[tuple(active)] = logits(ours, inputs)
        torch.testing.assert_close(outputs[tuple(active)], logits(theirs, inputs), rtol=1e-5, atol=1e-5, msg=active)
        assert {_peft_name(n) for n in _trainable(ours)} == {
            n.replace(".modules_to_save.other.", ".modules_to_save.default.") for n in _trainable(theirs)
        }, active
    assert rel_err(outputs[("default",)], outputs[("other",)]) > 0.01

    # PEFT's layout: "default" at the top of the directory, "other" in <dir>/other/, both ways.
    peft_fast.set_adapter(ours, "other")
    ours.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ours" / "other" / "adapter_model.safetensors").is_file()
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    reloaded.load_adapter(tmp_path / "ours" / "other", adapter_name="other")
    reloaded.set_adapter("other")
    torch.testing.assert_close(logits(reloaded.eval(), inputs), outputs[("other",)], rtol=1e-5, atol=1e-5)

    theirs.base_model.set_adapter(["default"])
    theirs.save_pretrained(tmp_path / "peft")
    loaded = peft_fast.load_adapter(copy.deepcopy(base), tmp_path / "peft", fused=False)
    loaded.load_adapter(tmp_path / "peft" / "other", "other")
    assert loaded.active_adapters() == ["default"]
    torch.testing.assert_close(logits(loaded, inputs), outputs[("default",)], rtol=1e-5, atol=1e-5)
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded, inputs), outputs[("other",)], rtol=1e-5, atol=1e-5)
