"""DoRA (``use_dora=True``) against Hugging Face PEFT 0.21's DoRA, and its weight-norm kernel.

1. the weight-norm kernel (``kernels/dora.py``) against its torch reference and float64, odd shapes,
   dense fp32 / bf16 / fp16 and NF4 (with and without double quantization), poisoned outputs;
2. a tiny Llama with DoRA on every linear, dense fp32, against PEFT: the magnitude's initialisation,
   logits, loss and the gradients of lora_A, lora_B and the magnitude (torch backend and the
   Triton kernels under the interpreter), dropout included (both draw torch's RNG in the same order);
3. QDoRA (NF4 base) against PEFT on a transformers + bitsandbytes 4-bit model, in train mode
   (bitsandbytes' CPU eval path computes in bf16); in_features are multiples of 64, where
   bitsandbytes 0.50.2's CPU dequantize_4bit is right;
4. files both ways (PEFT loads ours, we load PEFT's), merge against the unmerged forward and
   against PEFT's merge_and_unload, the eval-mode norm cache, and refusals.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import bitsandbytes as bnb
import peft
import pytest
import torch
import transformers
from safetensors import safe_open

import peft_fast
from peft_fast.kernels.dora import dora_weight_norm_reference, dora_weight_norm_triton
from peft_fast.lora import lora_layers
from peft_fast.nf4 import quantize_nf4

VOCAB = 128
ADAPTER = "default"
PREFIX = "base_model.model."
DENSE_TOL = 1e-5  # fp32, relative to the largest |value|
NF4_TOL = 1e-4
GRAD_TOL = 1e-4  # gradients through a whole model, fp32 (PEFT's autograd against our ops)


def tiny_llama() -> torch.nn.Module:
    """hidden 64, intermediate 128 (every in_features a multiple of 64), 2 layers, seeded, fp32."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float().eval()


def batch(seq: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randint(0, VOCAB, (2, seq), generator=generator),
            torch.randint(0, VOCAB, (2, seq), generator=generator))  # fmt: skip


def loss_of(model, ids, labels) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), labels.flatten())


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return ((actual.detach().double() - expected.detach().double()).abs().max() / expected.detach().abs().max()).item()


def assert_close(actual, expected, tol: float, what: str) -> None:
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def config_kwargs(**extra) -> dict:
    return dict(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True, **extra)


def peft_layers(peft_model) -> dict[str, torch.nn.Module]:
    return {name.removeprefix(PREFIX): m for name, m in peft_model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}  # fmt: skip


def adapter_params(model, peft_model: bool) -> dict[str, torch.Tensor]:
    """{layer.A / .B / .m: parameter} of ours or of a PEFT model, under the same keys."""
    layers = peft_layers(model) if peft_model else dict(lora_layers(model))
    out = {}
    for name, layer in layers.items():
        out[f"{name}.A"] = layer.lora_A[ADAPTER].weight
        out[f"{name}.B"] = layer.lora_B[ADAPTER].weight
        out[f"{name}.m"] = layer.lora_magnitude_vector[ADAPTER].weight
    return out


def copy_from_peft(theirs, ours, magnitude_factor: float = 1.0) -> None:
    """Give ours PEFT's A, B and magnitude; ``magnitude_factor`` moves both magnitudes off their init
    so that m/‖·‖ ≠ 1 and the magnitude's part of the forward counts."""
    mine, their = adapter_params(ours, False), adapter_params(theirs, True)
    assert mine.keys() == their.keys()
    with torch.no_grad():
        for key, param in their.items():
            if key.endswith(".m"):
                param.mul_(magnitude_factor)
            mine[key].copy_(param)


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("PEFT_FAST_BACKEND", request.param)
    return request.param


# -- 1. the weight-norm kernel ----------------------------------------------------------------

# r = 70 > 64 (the largest rank chunk): B·A summed over two rank chunks per tile.
DENSE_SHAPES = [(37, 53, 3), (64, 128, 8), (5, 200, 17), (1, 16, 1), (24, 96, 70)]
# Kernel vs reference: fp32 summation order; in half precision at most one ulp of the output (the
# interpreter matches the reference bit for bit; a GPU's summation order may flip a last rounding).
KERNEL_TOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k", "r"), DENSE_SHAPES)
def test_weight_norm_kernel_dense(n, k, r, dtype, kernel_device):
    generator = torch.Generator().manual_seed(n * k + r)
    w, a, b = (torch.randn(*shape, generator=generator) for shape in ((n, k), (r, k), (n, r)))
    w, a, b = (t.to(kernel_device, dtype) for t in (w, a, b))
    out = torch.full((n,), float("nan"), dtype=dtype, device=kernel_device)  # poisoned
    got = dora_weight_norm_triton(w, a, b, 0.7, out=out)
    assert got.data_ptr() == out.data_ptr() and not got.isnan().any()
    ref = dora_weight_norm_reference(w, a, b, 0.7)
    assert_close(got, ref, KERNEL_TOL[dtype], "kernel vs reference")
    exact = torch.linalg.vector_norm(w.double() + 0.7 * (b.double() @ a.double()), dim=1)
    # Against float64 of the same (rounded) inputs: the roundings of W + s·B·A in the dtype, then one of the norm.
    assert_close(got, exact, 1e-6 if dtype == torch.float32 else 2e-2, "kernel vs float64")


@pytest.mark.parametrize(("n", "k", "r", "blocksize", "double_quant"),
                         [(37, 128, 3, 64, True), (16, 96, 5, 32, False), (33, 64, 4, 64, True),
                          (20, 100, 2, 64, True)])  # fmt: skip
def test_weight_norm_kernel_nf4(n, k, r, blocksize, double_quant, kernel_device):
    generator = torch.Generator().manual_seed(k + r)
    w, a, b = (torch.randn(*shape, generator=generator) for shape in ((n, k), (r, k), (n, r)))
    nf4 = quantize_nf4(w, blocksize, double_quant).to(kernel_device)
    a, b = a.to(kernel_device), b.to(kernel_device)
    out = torch.full((n,), float("nan"), device=kernel_device)
    got = dora_weight_norm_triton(nf4, a, b, 0.5, out=out)
    assert not got.isnan().any()
    ref = dora_weight_norm_reference(nf4, a, b, 0.5)
    assert_close(got, ref, 1e-6, "NF4 kernel vs reference")
    deq = peft_fast.dequantize_nf4(nf4, torch.float64)
    exact = torch.linalg.vector_norm(deq + 0.5 * (b.double() @ a.double()), dim=1)
    assert_close(got, exact, 1e-6, "NF4 kernel vs float64")


def test_weight_norm_kernel_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"lora_A \(4, 32\) and lora_B \(16, 4\) do not fit a base weight of shape"):
        dora_weight_norm_triton(torch.randn(16, 64), torch.randn(4, 32), torch.randn(16, 4), 1.0)
    with pytest.raises(TypeError, match=r"base weight is torch\.bfloat16 but lora_A is torch\.float32"):
        dora_weight_norm_triton(torch.randn(16, 64).bfloat16(), torch.randn(4, 64), torch.randn(16, 4), 1.0)


# -- 2. dense parity with PEFT ------------------------------------------------------------------


def test_magnitude_init_matches_peft():
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config_kwargs()))  # B = 0: m = ‖W‖
    ours = peft_fast.patch(copy.deepcopy(base), peft_fast.LoraConfig(**config_kwargs()))
    mine, their = adapter_params(ours, False), adapter_params(theirs, True)
    for key in [k for k in their if k.endswith(".m")]:
        assert_close(mine[key], their[key], 1e-6, key)
        layer = dict(lora_layers(ours))[key.removesuffix(".m")]
        assert_close(mine[key], layer.base_layer.weight.norm(dim=1), 1e-6, f"{key} = ‖W‖")
    # B ≠ 0 (init_lora_weights=False): m = ‖W + s·B·A‖, computed from PEFT's own A and B.
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config_kwargs()))
    copy_from_peft(theirs, ours)
    for name, layer in lora_layers(ours):
        their_m = peft_layers(theirs)[name].lora_magnitude_vector[ADAPTER].weight
        assert_close(layer._initial_magnitude(ADAPTER), their_m, 1e-6, f"{name} init with B ≠ 0")


def _dense_pair(**extra):
    base = tiny_llama()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config_kwargs(**extra))
    )
    ours = peft_fast.patch(copy.deepcopy(base), peft_fast.LoraConfig(**config_kwargs(**extra)))
    copy_from_peft(theirs, ours, magnitude_factor=1.25)
    return base, theirs.train(), ours.train()


def assert_grads_match(theirs, ours, tol: float) -> None:
    mine, their = adapter_params(ours, False), adapter_params(theirs, True)
    for key, param in their.items():
        assert param.grad is not None and mine[key].grad is not None, key
        assert param.grad.abs().max() > 0, f"{key}: PEFT's gradient is zero, the comparison would see nothing"
        assert_close(mine[key].grad, param.grad, tol, f"{key} gradient")


def test_dense_logits_loss_and_gradients_match_peft(backend):
    base, theirs, ours = _dense_pair()
    ids, labels = batch()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    expected, actual = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
    assert rel_err(expected, base_logits) > 1e-2, "the adapter does not change the logits"
    assert_close(actual, expected, DENSE_TOL, "DoRA logits")
    loss_theirs, loss_ours = loss_of(theirs, ids, labels), loss_of(ours, ids, labels)
    assert_close(loss_ours, loss_theirs, DENSE_TOL, "loss")
    loss_theirs.backward()
    loss_ours.backward()
    assert_grads_match(theirs, ours, GRAD_TOL)
    assert peft_fast.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    # One SGD step on both: the same adapter after it.
    for model in (theirs, ours):
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    mine, their = adapter_params(ours, False), adapter_params(theirs, True)
    for key, param in their.items():
        assert_close(mine[key], param, DENSE_TOL, f"{key} after a step")


def test_dense_dropout_matches_peft():
    """With dropout PEFT runs base(x) on x and the DoRA term on dropout(x); ours draws the same mask
    (torch's RNG, same order), so the outputs and gradients agree."""
    _, theirs, ours = _dense_pair(lora_dropout=0.25)
    ids, labels = batch()
    torch.manual_seed(5)
    loss_theirs = loss_of(theirs, ids, labels)
    torch.manual_seed(5)
    loss_ours = loss_of(ours, ids, labels)
    assert_close(loss_ours, loss_theirs, DENSE_TOL, "loss with dropout")
    torch.manual_seed(6)
    no_drop = loss_of(ours.eval(), ids, labels)
    assert abs(no_drop.item() - loss_ours.item()) > 1e-5, "dropout had no effect"
    loss_theirs.backward()
    loss_ours.backward()
    assert_grads_match(theirs, ours, GRAD_TOL)


# -- 3. QDoRA against PEFT + bitsandbytes -------------------------------------------------------


def _nf4_pair(tmp_path: Path, double_quant: bool):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=bnb_config, device_map="cpu", dtype=torch.float32
    )
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in quantized.modules())
    theirs = peft.get_peft_model(quantized, peft.LoraConfig(init_lora_weights=False, **config_kwargs())).train()
    config = peft_fast.LoraConfig(quantize="nf4", double_quant=double_quant, **config_kwargs())
    ours = peft_fast.patch(copy.deepcopy(base), config).train()
    # The magnitude's init over deq(W), before copying: both from the same A and B.
    copy_from_peft(theirs, ours)
    for name, layer in lora_layers(ours):
        their_m = peft_layers(theirs)[name].lora_magnitude_vector[ADAPTER].weight
        assert_close(layer._initial_magnitude(ADAPTER), their_m, 1e-6, f"{name} QDoRA init")
    copy_from_peft(theirs, ours, magnitude_factor=1.25)
    return theirs, ours


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
@pytest.mark.parametrize("seq", [8, 12], ids=["16_rows", "24_rows"])
def test_qdora_matches_peft_bitsandbytes(tmp_path, backend, double_quant, seq, monkeypatch):
    """16 rows: the decode-size plan (the standalone norm); 24 rows: the norm inside the dequantization pass."""
    from peft_fast.kernels import dora as kernels

    theirs, ours = _nf4_pair(tmp_path, double_quant)
    ids, labels = batch(seq)
    ran = []
    for name, run in list(kernels._FORWARD_IMPLEMENTATIONS.items()):
        monkeypatch.setitem(kernels._FORWARD_IMPLEMENTATIONS, name,
                            lambda *args, name=name, run=run: ran.append(name) or run(*args))  # fmt: skip
    expected, actual = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
    if backend == "triton":  # every DoRA layer took the candidate its plan leads with
        assert set(ran) == {"separate" if seq == 8 else "dequant_norm"}
    else:
        assert not ran
    assert_close(actual, expected, NF4_TOL, "QDoRA logits")
    loss_theirs, loss_ours = loss_of(theirs, ids, labels), loss_of(ours, ids, labels)
    assert_close(loss_ours, loss_theirs, NF4_TOL, "QDoRA loss")
    loss_theirs.backward()
    loss_ours.backward()
    assert_grads_match(theirs, ours, 1e-3)


# -- 4. files, merge, cache, refusals --------------------------------------------------------------


def file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(directory / "adapter_model.safetensors", framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def test_files_both_ways(tmp_path):
    base, theirs, ours = _dense_pair()
    ids, _ = batch()
    ours.eval()
    with torch.no_grad():
        our_logits = ours(input_ids=ids).logits
    peft_fast.save_adapter(ours, tmp_path / "ours")
    document = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert document["use_dora"] is True
    theirs.save_pretrained(tmp_path / "theirs")
    assert file_tensors(tmp_path / "ours").keys() == file_tensors(tmp_path / "theirs").keys()
    assert any(key.endswith(".lora_magnitude_vector") for key in file_tensors(tmp_path / "ours"))

    loaded_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(loaded_by_peft(input_ids=ids).logits, our_logits, DENSE_TOL, "PEFT loading our file")
        their_logits = theirs.eval()(input_ids=ids).logits
    loaded_by_us = peft_fast.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    with torch.no_grad():
        assert_close(loaded_by_us(input_ids=ids).logits, their_logits, DENSE_TOL, "us loading PEFT's file")
    # A file saved without DoRA cannot go into a DoRA adapter in place (and vice versa).
    plain = peft_fast.patch(copy.deepcopy(base), peft_fast.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    peft_fast.save_adapter(plain, tmp_path / "plain")
    with pytest.raises(ValueError, match="use_dora: file False, model True"):
        peft_fast.lora.reload_in_place(loaded_by_us, tmp_path / "plain", ADAPTER)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_equals_unmerged_forward_and_peft(quantize):
    base, theirs, ours = _dense_pair()
    if quantize:
        config = peft_fast.LoraConfig(quantize="nf4", **config_kwargs())
        ours = peft_fast.patch(copy.deepcopy(base), config)
        copy_from_peft(theirs, ours)
    ids, _ = batch()
    ours.eval()
    with torch.no_grad():
        unmerged = ours(input_ids=ids).logits
        merged_model = peft_fast.merge(ours)
        assert not any(isinstance(m, peft_fast.NF4Linear) for m in merged_model.modules())
        assert_close(merged_model(input_ids=ids).logits, unmerged, 1e-5, "merged vs unmerged")
        if quantize is None:
            their_merged = theirs.merge_and_unload()
            for name, param in their_merged.named_parameters():
                assert_close(dict(merged_model.named_parameters())[name], param, 1e-6, f"merged {name}")


def test_eval_cache_follows_updates():
    _, _, ours = _dense_pair()
    ids, _ = batch()
    ours.eval()
    layer = dict(lora_layers(ours))["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        first = ours(input_ids=ids).logits
        assert ADAPTER in layer._dora_norms  # no-grad eval: the norm is kept
        assert torch.equal(ours(input_ids=ids).logits, first)
        layer.lora_B[ADAPTER].weight.mul_(3.0)  # an in-place update bumps the version: recomputed
        after = ours(input_ids=ids).logits
    fresh = copy.deepcopy(ours)
    for _, fresh_layer in lora_layers(fresh):
        fresh_layer._dora_norms.clear()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, after)
    assert rel_err(after, first) > 1e-3
    ours.train()
    assert not layer._dora_norms  # train() drops it


def test_refusals():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"DoRA \(use_dora=True\) is supported on Linear.*Embedding layers: "
                                         r"model\.embed_tokens"):  # fmt: skip
        peft_fast.patch(model, peft_fast.LoraConfig(target_modules=["embed_tokens", "q_proj"], use_dora=True))
    assert not any(isinstance(m, peft_fast.LoraLinear) for m in model.modules()), "the model was touched"
    with pytest.raises(TypeError, match="use_dora must be True or False"):
        peft_fast.LoraConfig(target_modules=["q_proj"], use_dora="yes")


# -- the column scale m/‖·‖ (+ bias) in one pass ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("m", "n", "bias"), [(1, 40, True), (37, 130, False), (64, 96, True)])
def test_scale_kernel_matches_reference_and_float64(m, n, bias, dtype, kernel_device):
    from peft_fast.kernels.dora import dora_scale_reference, dora_scale_triton

    y = torch.randn(m, n, device=kernel_device).to(dtype)
    magnitude = torch.rand(n, device=kernel_device) + 0.5  # fp32, as PEFT keeps it over half bases
    norm = torch.rand(n, device=kernel_device) + 0.5
    b = torch.randn(n, device=kernel_device).to(dtype) if bias else None
    got = dora_scale_triton(y, magnitude, norm, b)
    assert got.dtype == dtype and got.shape == y.shape and torch.isfinite(got).all()
    assert torch.equal(got, dora_scale_reference(y, magnitude, norm, b))  # one fp32 rounding, the same
    exact = y.double() * (magnitude.double() / norm.double()) + (b.double() if bias else 0)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert float((got.double() - exact).norm() / exact.norm()) < tol
    # A strided view (every other row) gives the same rows.
    wide = torch.randn(2 * m, n, device=kernel_device).to(dtype)
    assert torch.equal(dora_scale_triton(wide[::2], magnitude, norm, b), dora_scale_reference(wide[::2], magnitude,
                                                                                              norm, b))  # fmt: skip


def test_scale_op_gradients_match_the_formula(monkeypatch):
    from peft_fast.ops import dora_scale

    y = torch.randn(5, 3, 24, dtype=torch.float64, requires_grad=True)
    magnitude = (torch.rand(24, dtype=torch.float64) + 0.5).requires_grad_()
    norm = torch.rand(24, dtype=torch.float64) + 0.5
    bias = torch.randn(24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, m, b: dora_scale(a, m, norm, b), (y, magnitude, bias))
    for backend in ("torch", "triton"):  # fp32 on both backends: the same gradients as the formula's
        monkeypatch.setenv("PEFT_FAST_BACKEND", backend)
        y32, m32, b32 = (t.detach().float().requires_grad_() for t in (y, magnitude, bias))
        dora_scale(y32, m32, norm.float(), b32).square().sum().backward()
        want = [t.detach().clone().requires_grad_() for t in (y32, m32, b32)]
        (want[0] * (want[1] / norm.float()) + want[2]).square().sum().backward()
        for got, ref in zip((y32, m32, b32), want, strict=True):
            assert torch.allclose(got.grad, ref.grad, rtol=1e-5, atol=1e-6), backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scale_backward_kernel_is_one_pass_of_the_formula(dtype, kernel_device):
    from peft_fast.kernels.dora import dora_scale_backward_triton

    m, n = 70, 136  # row blocks of 32: three partial rows per column, the last one ragged
    grad_out = torch.randn(m, n, device=kernel_device).to(dtype)
    y = torch.randn(m, n, device=kernel_device).to(dtype)
    magnitude, norm = torch.rand(n, device=kernel_device) + 0.5, torch.rand(n, device=kernel_device) + 0.5
    grad_y, sums = dora_scale_backward_triton(grad_out, y, magnitude, norm)
    assert torch.equal(grad_y, (grad_out.float() * (magnitude / norm)).to(dtype))
    exact = (grad_out.double() * y.double()).sum(0)
    assert sums.dtype == torch.float32 and float((sums.double() - exact).norm() / exact.norm()) < 1e-5
    again, sums_again = dora_scale_backward_triton(grad_out, y, magnitude, norm)
    assert torch.equal(sums, sums_again) and torch.equal(grad_y, again)  # a fixed reduction order


# -- 5. the norm inside the dequantization pass (peft_fast::dora_linear over NF4) --------------------

# (N, K, r, blocksize, double quantization): odd N, several K slices (the interpreter's slice is
# 4 x 64 columns), K not a multiple of the block (the general loader), blocks of 32.
DEQUANT_NORM_SHAPES = [(37, 320, 3, 64, True), (20, 100, 2, 64, True), (16, 96, 5, 32, False), (70, 576, 17, 64, False),
                       (20, 128, 70, 64, True)]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("n", "k", "r", "blocksize", "double_quant"), DEQUANT_NORM_SHAPES)
def test_dequant_norm_kernel_matches_dequant_reference_and_float64(n, k, r, blocksize, double_quant, dtype,
                                                                   kernel_device):  # fmt: skip
    from peft_fast.kernels import dora as kernels
    from peft_fast.kernels.nf4_dequant import dequantize_nf4_triton

    generator = torch.Generator().manual_seed(n + k + r)
    w, a, b = (torch.randn(*shape, generator=generator) for shape in ((n, k), (r, k), (n, r)))
    nf4 = quantize_nf4(w, blocksize, double_quant).to(kernel_device)
    a, b = a.to(kernel_device, dtype), b.to(kernel_device, dtype)
    splits = kernels.dequant_norm_splits(n, k, kernel_device)
    assert splits == -(-k // 256) or kernel_device == "cuda"
    out = torch.full((n, k), float("nan"), dtype=dtype, device=kernel_device)  # poisoned
    partials = torch.full((splits, n), float("nan"), device=kernel_device)
    weight, sums = kernels.dora_dequant_norm_triton(nf4, a, b, 0.7, out=out, partials=partials)
    assert weight.data_ptr() == out.data_ptr() and sums.data_ptr() == partials.data_ptr()
    assert not sums.isnan().any()
    # deq(W) is the dequantize kernel's, bit for bit (and the torch reference's).
    assert torch.equal(weight, dequantize_nf4_triton(nf4, dtype))
    ref_weight, ref_norm = kernels.dora_dequant_norm_reference(nf4, a, b, 0.7)
    assert torch.equal(weight, ref_weight)
    norm = kernels.dora_norm_from_partials(sums, dtype)
    assert_close(norm, ref_norm, KERNEL_TOL[dtype], "fused norm vs reference")
    assert_close(norm, kernels.dora_weight_norm_triton(nf4, a, b, 0.7), KERNEL_TOL[dtype], "fused vs standalone")
    exact = torch.linalg.vector_norm(peft_fast.dequantize_nf4(nf4, torch.float64) + 0.7 * (b.double() @ a.double()),
                                     dim=1)  # fmt: skip
    assert_close(norm, exact, 1e-6 if dtype == torch.float32 else 2e-2, "fused norm vs float64")


def test_dequant_norm_kernel_refuses_bad_inputs():
    from peft_fast.kernels import dora as kernels

    nf4 = quantize_nf4(torch.randn(16, 64))
    with pytest.raises(TypeError, match="needs an NF4Weight base"):
        kernels.dora_dequant_norm_triton(torch.randn(16, 64), torch.randn(4, 64), torch.randn(16, 4), 1.0)
    with pytest.raises(ValueError, match=r"lora_A \(4, 32\) and lora_B \(16, 4\) do not fit"):
        kernels.dora_dequant_norm_triton(nf4, torch.randn(4, 32), torch.randn(16, 4), 1.0)
    with pytest.raises(ValueError, match=r"partials must be a contiguous \[1, 16\] float32 tensor"):
        kernels.dora_dequant_norm_triton(nf4, torch.randn(4, 64), torch.randn(16, 4), 1.0, partials=torch.empty(2, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("m", "n", "bias"), [(1, 40, True), (37, 130, False), (70, 96, True)])
def test_scale_from_partials_finishes_the_norm_once(m, n, bias, dtype, kernel_device):
    from peft_fast.kernels.dora import dora_norm_from_partials, dora_scale_partials_triton, dora_scale_reference

    y = torch.randn(m, n, device=kernel_device).to(dtype)
    magnitude = torch.rand(n, device=kernel_device) + 0.5
    partials = torch.rand(3, n, device=kernel_device) * 10  # three K slices of squared sums
    b = torch.randn(n, device=kernel_device).to(dtype) if bias else None
    out, norm = dora_scale_partials_triton(y, magnitude, partials, b)
    want_norm = dora_norm_from_partials(partials, dtype)
    assert norm.dtype == dtype and torch.allclose(norm.float(), want_norm.float(), rtol=2**-20 if dtype ==
                                                  torch.float32 else 2**-8)  # fmt: skip
    assert torch.equal(out, dora_scale_reference(y, magnitude, norm, b))  # the norm it stored is the one it used
    exact = torch.sqrt(partials.double().sum(0))
    got = (y.double() * magnitude.double() / exact + (b.double() if bias else 0)).to(dtype)
    assert float((out.double() - got.double()).norm() / got.double().norm()) < (1e-6 if dtype == torch.float32
                                                                                 else 1e-2)  # fmt: skip


def test_dora_forward_plan():
    from peft_fast.kernels import plans

    assert plans.dora_forward_plan(512, "nf4_rows") == ["dequant_norm", "separate"]
    assert plans.dora_forward_plan(17, "nf4") == ["dequant_norm", "separate"]
    assert plans.dora_forward_plan(16, "nf4_rows") == ["separate"]
    assert plans.dora_forward_plan(4096, "dense") == ["separate"]


def _qdora_operands(m, n, k, r, dtype, device, magnitude_zero: bool = False, blocksize: int = 64):
    generator = torch.Generator().manual_seed(m * n + k)
    x, w, a, b = (torch.randn(*shape, generator=generator) for shape in ((m, k), (n, k), (r, k), (n, r)))
    nf4 = quantize_nf4(w, blocksize, True).to(device)
    magnitude = torch.rand(n, generator=generator) + 0.5
    if magnitude_zero:
        magnitude[::3] = 0.0  # m ≈ 0: nothing divides by m / ‖·‖
    bias = torch.randn(n, generator=generator)
    x, a, b, bias = (t.to(device, dtype) for t in (x, a, b, bias))
    return x, nf4, a, b, magnitude.to(device), bias


def _qdora_float64(x, nf4, a, b, magnitude, bias, scale):
    """PEFT's DoRA without dropout in float64: (m/‖W + s·B·A‖)·(x·Wᵀ + s·x·Aᵀ·Bᵀ) + b, the norm detached."""
    w = peft_fast.dequantize_nf4(nf4, torch.float64)
    norm = torch.linalg.vector_norm(w + scale * (b @ a), dim=1).detach()
    return (magnitude / norm) * (x @ w.t() + scale * (x @ a.t()) @ b.t()) + bias


@pytest.mark.parametrize("candidate", ["dequant_norm", "separate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
# K = 320, blocks of 64: the row-scaled NF4 loader, two K slices of the norm; K = 100, blocks of
# 32: the general loader (a block straddles rows).
@pytest.mark.parametrize(("k", "blocksize"), [(320, 64), (100, 32)], ids=["rows", "general"])
def test_qdora_op_candidates_match_float64_outputs_and_gradients(candidate, dtype, k, blocksize, monkeypatch,
                                                                 kernel_device):  # fmt: skip
    monkeypatch.setenv("PEFT_FAST_BACKEND", "triton")
    monkeypatch.setenv("PEFT_FAST_FORCE", f"dora_forward={candidate}")
    from peft_fast.ops import dora_linear

    m, n, r, scale = 37, 40, 5, 0.7  # M > 16 (both candidates), odd M
    x, nf4, a, b, magnitude, bias = _qdora_operands(m, n, k, r, dtype, kernel_device, magnitude_zero=True,
                                                    blocksize=blocksize)  # fmt: skip
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b, magnitude, bias)]
    out = dora_linear(leaves[0].reshape(1, m, k), nf4, *leaves[1:3], leaves[3], leaves[4], scale)
    assert out.shape == (1, m, n) and out.dtype == dtype and torch.isfinite(out).all()
    grad = torch.randn(1, m, n, generator=torch.Generator().manual_seed(3)).to(kernel_device, dtype)
    out.backward(grad)
    wide = [t.detach().double().requires_grad_() for t in (x, a, b, magnitude, bias)]
    want = _qdora_float64(wide[0], nf4, *wide[1:3], wide[3], wide[4], scale)
    want.backward(grad.double().reshape(m, n))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(out.reshape(m, n), want, tol, f"{candidate} output vs float64")
    for name, got, ref in zip(("x", "A", "B", "m", "bias"), leaves, wide, strict=True):
        assert got.grad is not None and torch.isfinite(got.grad).all(), name
        assert got.grad.dtype == got.dtype, name
        assert_close(got.grad, ref.grad, tol if name != "m" else 2 * tol, f"{candidate} d{name} vs float64")


def test_qdora_op_candidates_agree_and_keep_no_dense_weight(monkeypatch, kernel_device):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "triton")
    from peft_fast.kernels import dora as kernels

    x, nf4, a, b, magnitude, bias = _qdora_operands(33, 24, 128, 4, torch.bfloat16, kernel_device)
    outputs = {}
    for candidate in ("dequant_norm", "separate"):
        monkeypatch.setenv("PEFT_FAST_FORCE", f"dora_forward={candidate}")
        outputs[candidate] = kernels.dora_linear_forward(x, nf4, a, b, magnitude, bias, 0.7)
    reference = kernels.dora_linear_reference_forward(x, nf4, a, b, magnitude, bias, 0.7)
    for got, sep, ref, what in zip(outputs["dequant_norm"], outputs["separate"], reference, ("out", "norm", "Y0", "H"),
                                   strict=True):  # fmt: skip
        assert_close(got, sep, 2**-7, f"{what}: dequant_norm vs separate")
        assert_close(got, ref, 2e-2, f"{what}: dequant_norm vs reference")
    assert torch.equal(outputs["dequant_norm"][3], outputs["separate"][3])  # H: the same kernel
    # Saved for the backward: X, H, Y0, the norm, the NF4 tensors, A, B, m; no [N, K] dense weight.
    leaves = [t.detach().clone().requires_grad_() for t in (a, b)]
    from peft_fast.ops import dora_linear

    out = dora_linear(x, nf4, *leaves, magnitude.requires_grad_(), bias, 0.7)
    node = out.grad_fn
    while "dora_linear" not in type(node).__name__:  # past the reshape to the op's own node
        node = node.next_functions[0][0]
    saved = [tuple(t.shape) for t in node.saved_tensors if t is not None]
    assert (24, 128) not in saved and (1536, 1) in saved  # the packed codes, not deq(W)
    assert sorted(saved) == sorted([(33, 128), (33, 4), (33, 24), (24,), (1536, 1), (48,), (1,), (), (4, 128),
                                    (24, 4), (24,)])  # fmt: skip
