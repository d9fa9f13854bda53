"""LoRA initialisations from the base weight (peft_fast/lora/init.py): PiSSA, OLoRA, LoftQ, against PEFT.

PEFT runs PiSSA and OLoRA on CPU, so the same tiny model patched by both must have the same A, B,
residual base, outputs and gradients. PEFT's LoftQ needs CUDA (it quantizes through bitsandbytes
on the GPU), so ours is checked against the same alternating steps written here with
bitsandbytes' own CPU quantizer (blocksize 64, no double quantization, as PEFT asks it).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

import peft_fast
from peft_fast.layers import LoraLinear, NF4Linear
from peft_fast.lora.init import base_init
from peft_fast.nf4 import dequantize_nf4, quantize_nf4

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def both(init: str, **extra):
    """The same tiny model under peft_fast.patch and under PEFT, both initialised with ``init``."""
    base = tiny_llama()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    settings = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, **extra)
    peft_fast.patch(ours, peft_fast.LoraConfig(**settings))
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(**settings))
    return base, ours, theirs


def ours_and_peft_layers(ours, theirs):
    for name, module in ours.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module, theirs.base_model.model.get_submodule(name)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_matches_peft(init):
    base, ours, theirs = both(init)
    checked = 0
    for name, layer, peft_layer in ours_and_peft_layers(ours, theirs):
        assert rel(layer.lora_A["default"].weight, peft_layer.lora_A["default"].weight) < 1e-5, name
        assert rel(layer.lora_B["default"].weight, peft_layer.lora_B["default"].weight) < 1e-5, name
        residual = layer.base_layer.weight
        assert rel(residual, peft_layer.base_layer.weight) < 1e-5, name
        original = base.get_submodule(name).weight
        assert rel(residual, original) > 1e-3  # the base really became the residual
        checked += 1
    assert checked == 2 * len(TARGETS)
    ids = torch.randint(0, 96, (2, 12))
    # The adapted model starts as the original one, in both libraries.
    want = base(ids).logits
    assert rel(ours(ids).logits, want) < 1e-4 and rel(theirs(ids).logits, want) < 1e-4
    loss, peft_loss = ours(ids, labels=ids).loss, theirs(ids, labels=ids).loss
    assert loss.item() == pytest.approx(peft_loss.item(), rel=1e-5)
    loss.backward()
    peft_loss.backward()
    for name, layer, peft_layer in ours_and_peft_layers(ours, theirs):
        for part in ("lora_A", "lora_B"):
            ours_grad = getattr(layer, part)["default"].weight.grad
            assert rel(ours_grad, getattr(peft_layer, part)["default"].weight.grad) < 1e-4, (name, part)


def test_pissa_niter_is_the_fast_svd_and_keeps_the_output():
    """pissa_niter_<n>: torch.svd_lowrank with n iterations (random: PEFT draws its other random
    numbers in another order, so the draws, not the formula, differ from PEFT's)."""
    base = tiny_llama()
    model = copy.deepcopy(base)
    torch.manual_seed(5)
    peft_fast.patch(model, peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                init_lora_weights="pissa_niter_4"))  # fmt: skip
    torch.manual_seed(5)  # the first random draw of patch is the first target's svd_lowrank
    weight = base.model.layers[0].self_attn.q_proj.weight.detach().float()
    v, s, u = torch.svd_lowrank(weight, 4, niter=4)
    s = s / 2.0
    layer = model.model.layers[0].self_attn.q_proj
    assert rel(layer.lora_A["default"].weight, torch.diag(s.sqrt()) @ u.t()) < 1e-6
    assert rel(layer.lora_B["default"].weight, v @ torch.diag(s.sqrt())) < 1e-6
    ids = torch.randint(0, 96, (2, 12))
    assert rel(model(ids).logits, base(ids).logits) < 1e-4


def test_qlora_pissa_quantizes_the_residual():
    base, dense, _ = both("pissa")
    model = copy.deepcopy(base)
    peft_fast.patch(model, peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa",
                                                quantize="nf4"))  # fmt: skip
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            assert isinstance(module.base_layer, NF4Linear)
            residual = dense.get_submodule(name).base_layer.weight
            expected = quantize_nf4(residual.detach(), 64, True)
            assert torch.equal(module.base_layer.weight_packed, expected.packed), name  # NF4 of PiSSA's residual
            assert torch.equal(module.lora_A["default"].weight, dense.get_submodule(name).lora_A["default"].weight)


def test_olora_over_an_nf4_base_requantizes_in_its_format():
    model = tiny_llama()
    peft_fast.quantize_model(model, blocksize=64, double_quant=True, progress=False)
    before = {n: m.dequantized_weight(torch.float32) for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    peft_fast.patch(model, peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="olora"))
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            nf4 = module.base_layer.nf4
            assert nf4.blocksize == 64 and nf4.double_quant
            a, _, residual = base_init(before[name], "olora", 4, 2.0)
            assert torch.equal(module.lora_A["default"].weight, a)
            assert torch.equal(nf4.packed, quantize_nf4(residual, 64, True).packed)


def test_pissa_over_an_nf4_base_is_refused_as_in_peft():
    model = tiny_llama()
    peft_fast.quantize_model(model, progress=False)
    untouched = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"needs the full-precision weight, but the base is NF4 already; patch the "
                                        r"unquantized model with quantize='nf4'"):  # fmt: skip
        peft_fast.patch(model, peft_fast.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in untouched.items())  # nothing changed


def _loftq_with_bitsandbytes(weight: torch.Tensor, r: int, iterations: int):
    """PEFT's loftq_init steps, on bitsandbytes' CPU NF4 quantizer (its own code needs CUDA)."""
    bnb = pytest.importorskip("bitsandbytes")
    w = weight.float()
    residual = w.clone()
    for i in range(iterations):
        packed, state = bnb.functional.quantize_4bit(residual, blocksize=64, quant_type="nf4",
                                                     compress_statistics=False)  # fmt: skip
        dequantized = bnb.functional.dequantize_4bit(packed, state)
        u, s, vh = torch.linalg.svd(w - dequantized, full_matrices=False)
        left = u @ torch.sqrt(torch.diag(s)[:, :r])
        right = torch.sqrt(torch.diag(s)[:r, :]) @ vh
        if i + 1 == iterations:
            break
        residual = w - left @ right
    return right, left, dequantized


@pytest.mark.parametrize("iterations", [1, 3])
def test_loftq_is_peft_steps_with_our_nf4(iterations):
    torch.manual_seed(0)
    weight = torch.randn(96, 128) * 0.05
    a, b, base = base_init(weight, "loftq", 8, 2.0, {"loftq_bits": 4, "loftq_iter": iterations})
    want_a, want_b, want_base = _loftq_with_bitsandbytes(weight, 8, iterations)
    assert torch.equal(base, want_base)  # our NF4 round trip is bitsandbytes', bit for bit
    assert rel(a, want_a) < 1e-5 and rel(b, want_b) < 1e-5
    # What LoftQ is for: deq(Q) + B·A is closer to W than deq(Q) alone (PEFT applies no scaling here).
    plain = dequantize_nf4(quantize_nf4(weight, 64, double_quant=False), torch.float32)
    assert (base + b @ a - weight).norm() < 0.9 * (plain - weight).norm()


def test_loftq_qlora_model_starts_nearer_the_dense_one():
    base = tiny_llama()
    plain, loftq = copy.deepcopy(base), copy.deepcopy(base)
    common = dict(r=8, lora_alpha=8, target_modules=TARGETS, quantize="nf4", double_quant=False)
    peft_fast.patch(plain, peft_fast.LoraConfig(**common))
    peft_fast.patch(loftq, peft_fast.LoraConfig(**common, init_lora_weights="loftq",
                                                loftq_config={"loftq_bits": 4, "loftq_iter": 2}))  # fmt: skip
    ids = torch.randint(0, 96, (2, 12))
    want = base(ids).logits
    assert rel(loftq(ids).logits, want) < rel(plain(ids).logits, want)


def test_files_round_trip_with_peft(tmp_path):
    """A PiSSA adapter: PEFT loads our file onto the original base (re-running PiSSA there, as it does
    for its own files) and gets our outputs; we load PEFT's file likewise."""
    base, ours, theirs = both("pissa")
    with torch.no_grad():  # some training: A and B away from their initialisation
        for model in (ours, theirs):
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
    ids = torch.randint(0, 96, (2, 12))
    peft_fast.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "pissa" and config["loftq_config"] == {}
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert rel(loaded(ids).logits, ours(ids).logits) < 1e-5
    theirs.save_pretrained(tmp_path / "theirs")
    mine = peft_fast.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert rel(mine(ids).logits, theirs(ids).logits) < 1e-5


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="init_lora_weights must be True, False, 'gaussian', 'pissa'"):
        peft_fast.LoraConfig(target_modules=TARGETS, init_lora_weights="svd")
    with pytest.raises(ValueError, match="'pissa_niter_<n>' needs a positive number"):
        peft_fast.LoraConfig(target_modules=TARGETS, init_lora_weights="pissa_niter_x")
    with pytest.raises(ValueError, match="needs loftq_config"):
        peft_fast.LoraConfig(target_modules=TARGETS, init_lora_weights="loftq")
    with pytest.raises(ValueError, match="NF4 \\(4 bits\\) only"):
        peft_fast.LoraConfig(target_modules=TARGETS, init_lora_weights="loftq", loftq_config={"loftq_bits": 8})
    with pytest.raises(ValueError, match="loftq_iter must be a positive integer"):
        peft_fast.LoraConfig(target_modules=TARGETS, init_lora_weights="loftq", loftq_config={"loftq_iter": 0})
    with pytest.raises(ValueError, match=r"needs r <= min\(out_features, in_features\) = 64, got r = 65"):
        base_init(torch.randn(64, 128), "olora", 65, 1.0)
    model = tiny_llama()
    with pytest.raises(TypeError, match=r"runs on Linear layers .*, not Embedding"):
        peft_fast.patch(model, peft_fast.LoraConfig(target_modules=["embed_tokens"], init_lora_weights="olora"))
