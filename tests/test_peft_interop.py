"""``peft_fast.patch(peft_model)``: an existing PEFT LoRA / QLoRA model runs our fused op.

Reference models are PEFT 0.21 LoRA on a tiny fp32 Llama (nn.Linear) and PEFT on the same Llama
loaded by transformers + bitsandbytes 4-bit NF4 (double quantization on and off). Comparisons run
in train mode with LoRA dropout 0: bitsandbytes' eval-mode CPU path computes in bf16 on AVX512-BF16
CPUs (and repacks the weight, see ``peft_fast/peft_interop.py``). ``init_lora_weights=False`` makes
B non-zero, so the LoRA path shows in every comparison. The fused training step (norms, RoPE, MLP,
loss) is off here (``fused=False``): these tests are about the LoRA layers; tests/test_fused_step.py
covers the fused step under ``patch(peft_model)``.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import warnings
from pathlib import Path

import bitsandbytes as bnb
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import peft_fast
from peft_fast import peft_interop

VOCAB = 128
DENSE_TOL = 1e-5  # relative to the largest |value|
NF4_TOL = 1e-4
BF16_TOL = 2e-2


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


def llama_config(**overrides) -> transformers.LlamaConfig:
    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)  # fmt: skip
    return transformers.LlamaConfig(**{**settings, **overrides})


def tiny_llama() -> transformers.LlamaForCausalLM:
    """With biases on every projection (random, not Llama's zero init), so the op's bias path counts."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(attention_bias=True, mlp_bias=True)).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(std=0.1)
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The tiny Llama's checkpoint, for transformers + bitsandbytes to load in 4 bits."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(path)
    return path


def bnb_llama(base_dir: Path, double_quant: bool = True, quant_type: str = "nf4", dtype=torch.float32):
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=quant, device_map="cpu", dtype=dtype
    )


def lora_config(**overrides) -> peft.LoraConfig:
    settings = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    return peft.LoraConfig(**{**settings, **overrides})


def peft_llama(base_dir: Path | None = None, double_quant: bool = True, **overrides):
    """PEFT LoRA on the dense tiny Llama (``base_dir`` None) or on its bitsandbytes 4-bit NF4 load."""
    model = tiny_llama() if base_dir is None else bnb_llama(base_dir, double_quant)
    torch.manual_seed(1)
    return peft.get_peft_model(model, lora_config(**overrides)).train()


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))


def lora_layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def logits_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, and the gradients of every trainable parameter for a next-token loss."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def assert_same_outputs(before, after, tol: float) -> None:
    (logits_0, grads_0), (logits_1, grads_1) = before, after
    assert rel_err(logits_1, logits_0) <= tol, rel_err(logits_1, logits_0)
    assert grads_1.keys() == grads_0.keys() and grads_0
    assert all("lora_" in name for name in grads_0)
    for name, grad in grads_0.items():
        assert rel_err(grads_1[name], grad) <= tol, (name, rel_err(grads_1[name], grad))


@pytest.fixture
def op_calls(monkeypatch) -> list[int]:
    """Counts the fused op's calls from the swapped layers."""
    calls = [0]
    original = peft_interop.lora_linear

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(peft_interop, "lora_linear", counting)
    return calls


def layer_classes(model) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


# -- parity: logits and LoRA gradients before and after the swap ---------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_swap_keeps_logits_and_gradients(dtype, op_calls):
    model = peft_llama().to(dtype)
    ids = batch()
    before = logits_and_grads(model, ids)
    with model.disable_adapter():
        base_logits = model(input_ids=ids).logits.detach()
    assert rel_err(before[0], base_logits) > 1e-2  # the adapter shows in the logits

    assert peft_fast.patch(model, fused=False) is model
    layers = lora_layers(model)
    assert len(layers) == 14 and all(type(m) is peft_interop.PeftFastLinear for m in layers.values())
    after = logits_and_grads(model, ids)
    assert op_calls[0] == 14  # every LoRA layer ran the fused op once
    assert_same_outputs(before, after, DENSE_TOL if dtype == torch.float32 else BF16_TOL)
    assert after[0].dtype == dtype


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
def test_nf4_swap_keeps_logits_and_gradients(double_quant, base_dir, op_calls):
    model = peft_llama(base_dir, double_quant)
    ids = batch()
    before = logits_and_grads(model, ids)
    peft_fast.patch(model, fused=False)
    layers = lora_layers(model)
    assert len(layers) == 14 and all(type(m) is peft_interop.PeftFastLinear4bit for m in layers.values())
    after = logits_and_grads(model, ids)
    assert op_calls[0] == 14
    assert_same_outputs(before, after, NF4_TOL)


def test_nf4_bf16_swap_keeps_logits_and_gradients(base_dir, op_calls):
    """bf16 activations, bitsandbytes compute dtype and LoRA weights: one dtype, so the op runs."""
    model = bnb_llama(base_dir, True, dtype=torch.bfloat16)
    torch.manual_seed(1)
    model = peft.get_peft_model(model, lora_config(), autocast_adapter_dtype=False).train()
    assert {m.lora_A["default"].weight.dtype for m in lora_layers(model).values()} == {torch.bfloat16}
    ids = batch()
    before = logits_and_grads(model, ids)
    peft_fast.patch(model, fused=False)
    after = logits_and_grads(model, ids)
    assert op_calls[0] == 14
    assert after[0].dtype == torch.bfloat16
    assert_same_outputs(before, after, BF16_TOL)


def test_nf4_weight_views_bitsandbytes_storage(base_dir):
    model = peft_llama(base_dir, double_quant=True)
    peft_fast.patch(model, fused=False)
    for name, layer in lora_layers(model).items():
        weight = layer.base_layer.weight
        assert isinstance(weight, bnb.nn.Params4bit), name
        state = weight.quant_state
        nf4 = peft_interop.nf4_view(weight)
        assert nf4.packed.data_ptr() == weight.data_ptr(), name
        assert nf4.absmax.data_ptr() == state.absmax.data_ptr(), name
        assert nf4.nested_absmax.data_ptr() == state.state2.absmax.data_ptr(), name
        assert nf4.nested_offset is state.offset, name
        # The same weight bitsandbytes dequantizes.
        expected = bnb.functional.dequantize_4bit(weight.data, state)
        assert torch.equal(nf4.dequantize(torch.float32), expected.float()), name


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors reach the kernels only interpreted")
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
def test_nf4_layer_runs_the_triton_kernels_on_bitsandbytes_tensors(double_quant, base_dir, monkeypatch, op_calls):
    """The Triton kernels (interpreted) read bitsandbytes' packed bytes and scales as they are."""
    model = peft_llama(base_dir, double_quant)
    peft_fast.patch(model, fused=False)
    monkeypatch.setenv("PEFT_FAST_BACKEND", "triton")
    assert peft_fast.ops.backend_name("cpu") == "triton-interpreter"
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    results = []
    for forward in (peft_interop.PeftFastLinear4bit.forward, peft.tuners.lora.bnb.Linear4bit.forward):
        y = forward(layer, x)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        results.append((y.detach(), x.grad.clone(), layer.lora_A["default"].weight.grad.clone(),
                        layer.lora_B["default"].weight.grad.clone()))  # fmt: skip
        x.grad = None
        layer.zero_grad(set_to_none=True)
    assert op_calls[0] == 1
    for ours, theirs in zip(*results, strict=True):
        assert rel_err(ours, theirs) <= NF4_TOL


# -- PEFT's own machinery keeps working ------------------------------------------------------


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_save_pretrained_is_unchanged_and_loads(quantized, base_dir, tmp_path):
    model = peft_llama(base_dir if quantized else None)
    reference = copy.deepcopy(model)
    peft_fast.patch(model, fused=False)
    model.save_pretrained(tmp_path / "swapped")
    reference.save_pretrained(tmp_path / "reference")
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("swapped", "reference"))
    assert ours.keys() == theirs.keys() and ours
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("swapped", "reference")]
    for config in configs:  # a set in PEFT: its order is not fixed
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]

    base = bnb_llama(base_dir) if quantized else tiny_llama()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "swapped").train()
    ids = batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert rel_err(loaded(input_ids=ids).logits, expected) <= DENSE_TOL


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_merge_and_unload_matches_peft(quantized, base_dir):
    model = peft_llama(base_dir if quantized else None)
    reference = copy.deepcopy(model)
    peft_fast.patch(model, fused=False)
    ids = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Merge lora module to 4-bit linear may get different generations"
        merged, expected = model.merge_and_unload(), reference.merge_and_unload()
    assert not any(isinstance(m, (peft.tuners.tuners_utils.BaseTunerLayer, peft_interop._FusedForward))
                   for m in merged.modules())  # fmt: skip
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, expected(input_ids=ids).logits)


def test_fallbacks_compute_what_peft_does(op_calls):
    """Disabled / merged / several / mixed-batch adapters run PEFT's forward and give its results."""
    model = peft_llama()
    model.add_adapter("other", lora_config(r=4))
    reference = copy.deepcopy(model)
    peft_fast.patch(model, fused=False)
    ids = batch()

    def both(run):
        with torch.no_grad():
            return run(model), run(reference)

    with model.disable_adapter(), reference.disable_adapter():
        ours, theirs = both(lambda m: m(input_ids=ids).logits)
    assert torch.equal(ours, theirs) and op_calls[0] == 0

    for m in (model, reference):
        m.base_model.set_adapter(["default", "other"])
    with pytest.warns(RuntimeWarning, match="2 active adapters"):
        ours, theirs = both(lambda m: m(input_ids=ids).logits)
    assert torch.equal(ours, theirs) and op_calls[0] == 0

    for m in (model, reference):
        m.set_adapter("other")
    ours, theirs = both(lambda m: m(input_ids=ids).logits)
    assert rel_err(ours, theirs) <= DENSE_TOL and op_calls[0] == 14  # the other adapter, fused

    for m in (model, reference):
        m.eval()
    names = ["default", "__base__"]
    ours, theirs = both(lambda m: m(input_ids=ids, adapter_names=names).logits)
    assert torch.equal(ours, theirs) and op_calls[0] == 14

    for m in (model, reference):
        m.merge_adapter()
    ours, theirs = both(lambda m: m(input_ids=ids).logits)
    assert torch.equal(ours, theirs) and op_calls[0] == 14


def test_mixed_dtypes_fall_back_with_a_warning(base_dir, op_calls):
    """fp32 activations and LoRA over a layer computing in bf16: PEFT's mix, so PEFT's forward runs."""
    model = peft_llama(base_dir)
    reference = copy.deepcopy(model)
    for m in (model, reference):
        for layer in lora_layers(m).values():
            layer.base_layer.compute_dtype = torch.bfloat16
    peft_fast.patch(model, fused=False)
    ids = batch()
    with pytest.warns(RuntimeWarning, match="mixed dtypes"):
        ours = model(input_ids=ids).logits
    assert torch.equal(ours, reference(input_ids=ids).logits) and op_calls[0] == 0


def test_training_with_dropout_moves_only_lora(base_dir, op_calls):
    model = peft_llama(base_dir, lora_dropout=0.1, init_lora_weights=True)
    peft_fast.patch(model, fused=False)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    lora = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert op_calls[0] == 8 * 14
    assert losses[-1] < losses[0] - 0.1, losses
    state = model.state_dict()
    assert state.keys() == frozen.keys() | lora.keys()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert all(not torch.equal(state[k], v) for k, v in lora.items() if "lora_B" in k)


def test_trainer_trains_a_swapped_qlora_model(base_dir, tmp_path, op_calls):
    model = peft_llama(base_dir, lora_dropout=0.05, init_lora_weights=True)
    peft_fast.patch(model, fused=False)
    ids = torch.randint(0, VOCAB, (8, 10), generator=torch.Generator().manual_seed(3))
    rows = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    assert op_calls[0] == 3 * 14
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)


def test_swapped_model_deepcopies_and_pickles():
    model = peft_fast.patch(peft_llama(), fused=False)
    ids = batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert layer_classes(other) == layer_classes(model)
            assert torch.equal(other(input_ids=ids).logits, expected)


# -- refusals, unpatch, patching twice ---------------------------------------------------------


def assert_refused(model, match: str) -> None:
    classes = layer_classes(model)
    with pytest.raises(ValueError, match=match):
        peft_fast.patch(model, fused=False)
    assert layer_classes(model) == classes
    assert not any("forward" in m.__dict__ for m in model.modules())


def _dora_llama(base_dir: Path | None = None, **overrides):
    """PEFT DoRA on every linear, its magnitudes moved off their init (m/‖W + s·B·A‖ ≠ 1)."""
    model = peft_llama(base_dir, use_dora=True, **overrides)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_magnitude_vector["default"].weight.mul_(1.25)
    return model


@pytest.fixture
def dora_calls(monkeypatch) -> list[int]:
    calls = [0]
    original = peft_interop.dora_linear

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(peft_interop, "dora_linear", counting)
    return calls


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_dora_swap_keeps_logits_and_gradients(quantized, base_dir, dora_calls):
    model = _dora_llama(base_dir if quantized else None)
    ids = batch()
    before = logits_and_grads(model, ids)
    assert any(".lora_magnitude_vector." in name for name in before[1])
    peft_fast.patch(model, fused=False)
    after = logits_and_grads(model, ids)
    assert dora_calls[0] == 14  # every DoRA layer ran the fused DoRA forward
    assert_same_outputs(before, after, NF4_TOL if quantized else DENSE_TOL)


def test_dora_dropout_swap_keeps_outputs(dora_calls):
    """PEFT's DoRA with dropout: base(x) on x, the DoRA term on PEFT's own dropout(x) (same RNG draw)."""
    model = _dora_llama(lora_dropout=0.25)
    ids = batch()
    torch.manual_seed(3)
    before = logits_and_grads(model, ids)
    peft_fast.patch(model, fused=False)
    torch.manual_seed(3)
    after = logits_and_grads(model, ids)
    assert dora_calls[0] == 14
    assert_same_outputs(before, after, DENSE_TOL)


def test_refuses_fp4(base_dir):
    model = peft.get_peft_model(bnb_llama(base_dir, quant_type="fp4"), lora_config())
    assert_refused(model, "quant_type 'fp4'")


def test_refuses_bitsandbytes_8bit(base_dir):
    quant = transformers.BitsAndBytesConfig(load_in_8bit=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=quant, device_map="cpu", dtype=torch.float32
    )
    assert_refused(peft.get_peft_model(base, lora_config()), r"bitsandbytes 8-bit \(LLM.int8, Linear8bitLt\)")


def test_refuses_lora_bias():
    assert_refused(peft.get_peft_model(tiny_llama(), lora_config(lora_bias=True)), "lora_bias=True")


def test_refuses_other_peft_methods():
    model = peft.get_peft_model(tiny_llama(), peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                             feedforward_modules=["down_proj"]))  # fmt: skip
    assert_refused(model, "PEFT method IA3")


def test_refuses_one_bad_layer_among_good_ones(base_dir):
    """Every layer is checked before any changes: one fp4 layer leaves the NF4 ones untouched too."""
    model = peft_llama(base_dir)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    layer.base_layer.weight.quant_state.quant_type = "fp4"
    assert_refused(model, r"quant_type 'fp4' \(only 'nf4' is supported\) in [\w.]*layers\.1\.mlp\.down_proj\. ")


def test_bad_arguments():
    model = peft_llama()
    with pytest.raises(TypeError, match="without a config"):
        peft_fast.patch(model, peft_fast.LoraConfig(target_modules="all-linear"))
    with pytest.raises(TypeError, match="config is required"):
        peft_fast.patch(tiny_llama())
    with pytest.raises(ValueError, match="no layer of this model runs peft_fast"):
        peft_fast.unpatch(model)


def test_unpatch_restores_peft_and_patching_twice_is_a_no_op(base_dir, op_calls):
    model = peft_llama(base_dir)
    classes = layer_classes(model)
    ids = batch()
    expected = logits_and_grads(model, ids)
    peft_fast.patch(model, fused=False)
    swapped = layer_classes(model)
    assert peft_fast.patch(model, fused=False) is model and layer_classes(model) == swapped
    assert_same_outputs(expected, logits_and_grads(model, ids), NF4_TOL)
    assert op_calls[0] == 14

    assert peft_fast.unpatch(model) is model
    assert layer_classes(model) == classes
    after = logits_and_grads(model, ids)
    assert op_calls[0] == 14  # PEFT's forward again
    assert torch.equal(after[0], expected[0])


def test_layers_left_on_peft_are_named(op_calls):
    """A LoRA Embedding stays on PEFT's forward (one warning); the Linear layers are taken over."""
    model = peft_llama(target_modules=["q_proj", "embed_tokens"])
    ids = batch()
    expected = logits_and_grads(model, ids)
    with pytest.warns(UserWarning, match=r"1 LoRA layer\(s\) stay on PEFT's forward: .*embed_tokens"):
        peft_fast.patch(model, fused=False)
    assert_same_outputs(expected, logits_and_grads(model, ids), DENSE_TOL)
    assert op_calls[0] == 2
