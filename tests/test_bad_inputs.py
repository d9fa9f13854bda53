"""Bad input to the public API: a clear error naming the argument, never a crash deep inside torch,
NaN from finite input, a silently wrong result or a half-changed model / directory.

Every case here failed before the fix it guards (a crash elsewhere, a wrong result, or an error
that did not name the problem); behaviour already pinned by other test files is not repeated.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import bitsandbytes.functional as bnb_functional
import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build

import peft_fast
from peft_fast import (
    AdapterConfig,
    AdaptionPromptConfig,
    IA3Config,
    LoraConfig,
    LoraLinear,
    NF4Linear,
    NF4Weight,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    dequantize_nf4,
    lora_linear,
    quantize_model,
    quantize_nf4,
)
from peft_fast.lora import lora_layers

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


def lora(**overrides) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **overrides})


def module_types(model) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


# -- configs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"r": True}, ValueError, r"r must be a positive integer, got True"),
        ({"lora_alpha": float("nan")}, ValueError, r"lora_alpha must be a finite number, got nan"),
        ({"lora_alpha": float("inf")}, ValueError, r"lora_alpha must be a finite number, got inf"),
        ({"lora_alpha": "8"}, ValueError, r"lora_alpha must be a finite number, got '8'"),
        ({"alpha_pattern": {"q_proj": float("nan")}}, ValueError, r"alpha_pattern\['q_proj'\] must be a finite"),
        ({"rank_pattern": {"q_proj": True}}, ValueError, r"rank_pattern\['q_proj'\] must be a positive integer"),
        ({"rank_pattern": [("q_proj", 4)]}, TypeError, r"rank_pattern must be a dict of module-name pattern -> rank"),
        ({"alpha_pattern": "q_proj=4"}, TypeError, r"alpha_pattern must be a dict of module-name pattern -> alpha"),
        ({"rank_pattern": {3: 4}}, TypeError, r"rank_pattern must be a dict of module-name pattern"),
        ({"lora_dropout": "0.1"}, ValueError, r"lora_dropout must be a number in \[0, 1\), got '0.1'"),
        ({"target_modules": 5}, TypeError, r"target_modules must be a list of module names or a regex"),
        ({"target_modules": ["q_proj", 5]}, TypeError, r"target_modules must be a list of module names"),
        ({"modules_to_save": "lm_head"}, TypeError, r"modules_to_save must be a list .* string 'lm_head'"),
        ({"layers_to_transform": ["0"]}, TypeError, r"layers_to_transform must be a layer index or a list"),
        ({"layers_pattern": "layers"}, ValueError, r"when layers_pattern is given, layers_to_transform must"),
        ({"target_modules": "all-linear", "layers_to_transform": [0]}, ValueError, "layers_to_transform cannot"),
        ({"target_modules": r".*q_proj", "layers_to_transform": [0]}, ValueError, "layers_to_transform cannot"),
        ({"use_rslora": "yes"}, TypeError, r"use_rslora must be True or False"),
        ({"blocksize": 48}, ValueError, r"blocksize must be a power of two in \[32, 4096\], got 48"),
        ({"quantize": "nf4", "blocksize": True}, ValueError, r"blocksize must be a power of two .* got True"),
        ({"quantize": "nf4", "double_quant": "no"}, TypeError, r"double_quant must be True or False, got 'no'"),
        ({"compute_dtype": torch.int32}, ValueError, r"compute_dtype must be None or a floating-point torch.dtype"),
        ({"compute_dtype": "cuda"}, ValueError, r"compute_dtype must be None or a floating-point torch.dtype"),
    ],
)
def test_lora_config_rejects(settings, error, match):
    with pytest.raises(error, match=match):
        lora(**settings)


@pytest.mark.parametrize(
    "settings",
    [
        {"target_modules": "all-linear", "layers_to_transform": [0]},
        {"target_modules": r".*q_proj", "layers_pattern": "layers", "layers_to_transform": [0]},
        {"layers_pattern": "layers"},
    ],
)
def test_lora_config_raises_where_peft_raises(settings):
    with pytest.raises(ValueError):
        peft.LoraConfig(**{"target_modules": TARGETS, **settings})
    with pytest.raises(ValueError, match="layers_"):
        lora(**settings)


def test_compute_dtype_by_name_is_the_dtype():
    assert lora(compute_dtype="bfloat16").compute_dtype is torch.bfloat16
    model = peft_fast.patch(build("llama"), lora(compute_dtype="torch.float16"))
    assert {layer.lora_A["default"].weight.dtype for _, layer in lora_layers(model)} == {torch.float16}


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: AdapterConfig(reduction_factor="16"), TypeError, r"reduction_factor must be a number >= 1"),
        (lambda: AdapterConfig(scaling="a"), ValueError, r"scaling must be a finite number, got 'a'"),
        (lambda: AdapterConfig(dropout="0.1"), ValueError, r"dropout must be a number in \[0, 1\)"),
        (lambda: AdapterConfig(leave_out=0), TypeError, r"leave_out must be a list of layer indices, got 0"),
        (lambda: AdapterConfig(leave_out=["a"]), TypeError, r"leave_out must be a list of layer indices"),
        (lambda: AdapterConfig(placement="parallel", locations="ffn"), TypeError, r"locations must be a list"),
        (lambda: AdapterConfig(ln_before="yes"), TypeError, r"ln_before must be True or False"),
        (lambda: AdapterConfig(blocksize=48), ValueError, r"blocksize must be a power of two"),
        (lambda: AdapterConfig(quantize="nf4", double_quant="no"), TypeError, r"double_quant must be True or False"),
        (lambda: IA3Config(init_ia3_weights="no"), TypeError, r"init_ia3_weights must be True or False"),
        (lambda: IA3Config(target_modules=[1], feedforward_modules=[]), TypeError, r"target_modules must be a list"),
        (lambda: IA3Config(blocksize=100), ValueError, r"blocksize must be a power of two"),
        (lambda: IA3Config(quantize="nf4", double_quant="no"), TypeError, r"double_quant must be True or False"),
        (lambda: PromptTuningConfig(init=None), ValueError, r"init must be 'random' or 'text', got None"),
        (lambda: PrefixTuningConfig(prefix_projection="no"), TypeError, r"prefix_projection must be True or False"),
        (lambda: PromptEncoderConfig(encoder_reparameterization_type=None), ValueError, "must be MLP or LSTM"),
        (lambda: PromptEncoderConfig(encoder_dropout="0.1"), ValueError, r"encoder_dropout must be a number"),
        (lambda: AdaptionPromptConfig(target_modules=None), ValueError, r"target_modules must be the name"),
    ],
)
def test_other_configs_reject(make, error, match):
    with pytest.raises(error, match=match):
        make()


# -- patch and friends ---------------------------------------------------------------------


@pytest.mark.parametrize("config", [lora(), IA3Config(), AdapterConfig()], ids=["lora", "ia3", "adapter"])
@pytest.mark.parametrize("name", ["", "a.b", None, 3])
def test_bad_adapter_name_is_a_clear_error_and_changes_nothing(config, name):
    model = build("llama")
    types = module_types(model)
    with pytest.raises(ValueError, match=r"adapter_name must be a non-empty string without '\.'"):
        peft_fast.patch(model, config, name)
    assert module_types(model) == types


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: peft_fast.patch("model", lora()), TypeError, r"model must be a torch\.nn\.Module"),
        (
            lambda: peft_fast.patch(build("llama"), peft.LoraConfig(target_modules=TARGETS)),
            TypeError,
            r"got peft\.tuners\.lora\.config\.LoraConfig; peft's configs are not accepted",
        ),
        (
            lambda: peft_fast.add_adapter(peft_fast.patch(build("llama"), lora()), IA3Config(), "other"),
            ValueError,
            r"this model has no \(IA\)³ adapter to add to; use peft_fast.patch\(model, config, name\)",
        ),
        (
            lambda: peft_fast.add_adapter(peft_fast.patch(build("llama"), lora()), lora(), "a.b"),
            ValueError,
            r"adapter_name must be",
        ),
        (
            lambda: peft_fast.merge(peft_fast.patch(build("llama"), lora()), torch.int8),
            ValueError,
            r"dtype must be None or a floating-point torch\.dtype",
        ),
        (
            lambda: peft_fast.merge(peft_fast.patch(build("llama"), lora()), "float16"),
            ValueError,
            r"dtype must be None or a floating-point torch\.dtype",
        ),
        (
            lambda: peft_fast.patch(build("llama"), lora(layers_to_transform=[5])),
            ValueError,
            r"matches no module of LlamaForCausalLM \(with layers_to_transform=\[5\]\)",
        ),
        (
            lambda: peft_fast.patch(build("llama"), AdaptionPromptConfig(target_modules="mlp")),
            ValueError,
            r"target_modules='mlp' names modules without q_proj/k_proj/v_proj/o_proj: model\.layers\.1\.mlp",
        ),
    ],
)
def test_patch_entry_points_reject(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _poison_fp64(model):
    model.model.layers[1].mlp.down_proj.double()


def _poison_nan(model):
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")


def _poison_huge(model):
    # Finite weights near the fp32 maximum: the mean of the block scales overflows under double quantization.
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(3e38)


@pytest.mark.parametrize("method", ["lora", "ia3", "quantize_model"])
@pytest.mark.parametrize(
    ("poison", "error", "match"),
    [
        (_poison_fp64, TypeError, r"model\.layers\.1\.mlp\.down_proj\.weight is torch\.float64; cast the model"),
        (_poison_nan, ValueError, r"model\.layers\.1\.mlp\.down_proj\.weight holds NaN or Inf"),
        (_poison_huge, ValueError, r"model\.layers\.1\.mlp\.down_proj\.weight: double quantization overflows"),
    ],
    ids=["fp64-layer", "nan-layer", "double-quant-overflow"],
)
def test_nf4_refusal_comes_before_any_layer_is_quantized(method, poison, error, match):
    model = build("llama")
    poison(model)
    types = module_types(model)
    with pytest.raises(error, match=match):
        if method == "lora":
            peft_fast.patch(model, lora(quantize="nf4"))
        elif method == "ia3":
            peft_fast.patch(model, IA3Config(quantize="nf4"))
        else:
            quantize_model(model, progress=False)
    assert module_types(model) == types  # earlier layers were left quantized before
    assert not any(isinstance(m, NF4Linear) for m in model.modules())


def test_nf4_patch_of_a_meta_model_is_a_clear_error():
    with torch.device("meta"):
        model = build("llama")
    with pytest.raises(ValueError, match=r"q_proj\.weight is on the meta device"):
        peft_fast.patch(model, lora(quantize="nf4"))


# -- the layers and the op -----------------------------------------------------------------


def _layer(nf4: bool, disabled: bool) -> LoraLinear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16)
    base = NF4Linear(quantize_nf4(linear.weight.detach()), linear.bias.detach()) if nf4 else linear
    layer = LoraLinear(base)
    layer.update_layer("default", 4, 8.0)
    layer.disable_adapters = disabled
    return layer


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("disabled", [False, True], ids=["adapter", "disabled"])
@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.randint(0, 3, (3, 64)), TypeError, r"x must be a float tensor .* got torch\.int64"),
        ([[1.0] * 64], TypeError, r"x must be a torch\.Tensor of shape \[\.\.\., 64\], got list"),
        (torch.randn(3, 65), ValueError, r"x has 65 features but the base weight expects 64"),
        (torch.tensor(1.0), ValueError, r"got a 0-d tensor"),
    ],
    ids=["int", "list", "features", "0-d"],
)
def test_lora_linear_forward_rejects(nf4, disabled, x, error, match):
    # Before: an int x with disabled adapters ran an integer matmul on truncated weights, a dense
    # base gave torch's shape error, NF4Linear an IndexError for a 0-d x, lists an AttributeError.
    with pytest.raises(error, match=match):
        _layer(nf4, disabled)(x)


def test_ia3_linear_forward_rejects_an_integer_input():
    model = peft_fast.patch(build("llama"), IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    layer = model.model.layers[0].self_attn.k_proj
    layer.disable_adapters = True
    with pytest.raises(TypeError, match=r"x must be a float tensor"):
        layer(torch.randint(0, 3, (2, 64)))


def test_nf4_linear_rejects_a_0d_input():
    layer = _layer(True, False).base_layer
    with pytest.raises(ValueError, match=r"got a 0-d tensor"):
        layer(torch.tensor(1.0))


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"r": 4, "lora_alpha": float("nan")}, ValueError, r"lora_alpha must be a finite number, got nan"),
        ({"r": True, "lora_alpha": 8}, ValueError, r"r must be a positive integer, got True"),
        ({"r": 4, "lora_alpha": 8, "adapter_name": "a.b"}, ValueError, r"adapter_name must be"),
    ],
)
def test_update_layer_rejects(settings, error, match):
    layer = LoraLinear(torch.nn.Linear(64, 16))
    with pytest.raises(error, match=match):
        layer.update_layer(**{"adapter_name": "default", **settings})


def _op_case() -> dict:
    return {"x": torch.randn(3, 64), "base": quantize_nf4(torch.randn(16, 64)), "lora_a": torch.randn(4, 64),
            "lora_b": torch.randn(16, 4), "bias": torch.randn(16)}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"scale": float("nan")}, ValueError, r"scale must be a finite number, got nan"),
        ({"scale": float("inf")}, ValueError, r"scale must be a finite number, got inf"),
        ({"scale": "1"}, TypeError, r"scale must be a number, got '1'"),
        ({"dropout_p": "0.1"}, ValueError, r"dropout_p must be a number in \[0, 1\), got '0.1'"),
        ({"seed": 1.5, "dropout_p": 0.1}, TypeError, r"seed must be an int or None, got 1\.5"),
        ({"base": torch.randn(2, 16, 64)}, ValueError, r"the base weight must be 2-D .* got shape \(2, 16, 64\)"),
        ({"base": torch.randn(64)}, ValueError, r"the base weight must be 2-D .* got shape \(64,\)"),
        ({"lora_a": torch.randn(0, 64), "lora_b": torch.randn(16, 0)}, ValueError, r"lora_A has rank 0"),
        ({"lora_a": [[0.0] * 64] * 4}, TypeError, r"lora_A must be a torch\.Tensor, got list"),
        ({"lora_a": None}, TypeError, r"lora_A must be a torch\.Tensor, got NoneType"),
        ({"lora_b": None}, TypeError, r"lora_B must be a torch\.Tensor, got NoneType"),
    ],
)
def test_lora_linear_op_rejects(change, error, match):
    with pytest.raises(error, match=match):
        lora_linear(**{**_op_case(), **change})


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_with_no_input_features_equals_nn_linear(monkeypatch, backend):
    monkeypatch.setenv("PEFT_FAST_BACKEND", backend)
    x, base, bias = torch.randn(2, 3, 0), torch.randn(16, 0), torch.randn(16)
    y = lora_linear(x, base, torch.randn(4, 0), torch.randn(16, 4), bias, scale=2.0)
    expected = torch.nn.functional.linear(x, base, bias)
    assert y.shape == (2, 3, 16) and torch.equal(y, expected)  # reshape(-1, 0) raised before


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("disabled", [False, True], ids=["adapter", "disabled"])
def test_empty_3d_batch_through_the_layer_equals_nn_linear(nf4, disabled):
    layer = _layer(nf4, disabled).train()
    plain = torch.nn.Linear(64, 16)
    with torch.no_grad():
        plain.weight.copy_(layer.merged_weight()), plain.bias.copy_(layer.base_layer.bias)
    x = torch.randn(0, 5, 64, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 5, 16) and torch.equal(y, plain(x))
    y.sum().backward()
    assert x.grad.shape == (0, 5, 64)


# -- NF4 -----------------------------------------------------------------------------------


def test_quantize_nf4_rejects_meta_and_non_bool_double_quant():
    with pytest.raises(ValueError, match=r"weight is on the meta device"):
        quantize_nf4(torch.empty(4, 64, device="meta"))
    with pytest.raises(TypeError, match=r"double_quant must be True or False, got 'no'"):
        quantize_nf4(torch.randn(4, 64), 64, "no")
    with pytest.raises(TypeError, match=r"nf4 must be an NF4Weight .* got Tensor"):
        dequantize_nf4(torch.randn(4, 64))
    with pytest.raises(TypeError, match=r"NF4Weight\.packed must be a torch\.Tensor, got list"):
        NF4Weight([1, 2], torch.ones(1), (1, 4), torch.float32)


def test_double_quantization_overflow_is_refused_not_nan():
    # Block scales of 1e37: their fp32 mean overflows. bitsandbytes stores offset=inf and
    # dequantizes every weight to NaN; we crashed with an IndexError. Without DQ it is fine.
    weight = torch.full((300, 64), 1e37)
    _, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert math.isinf(state.offset.item())
    with pytest.raises(ValueError, match=r"double quantization overflows.*double_quant=False"):
        quantize_nf4(weight, 64, True)
    assert torch.equal(dequantize_nf4(quantize_nf4(weight, 64, False)), weight)


def test_subnormal_block_scales_match_bitsandbytes():
    # Scales that are all subnormal: 1/nested_absmax is inf and 0·inf NaN, which crashed the lookup.
    weight = torch.tensor([[1e-40] * 64, [2e-40] * 64, [3e-40] * 64, [-2e-40] * 64] * 80)
    ours = quantize_nf4(weight, 64, True)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(ours.packed.flatten(), packed.flatten())
    assert torch.equal(ours.absmax, state.absmax) and torch.equal(ours.nested_absmax, state.state2.absmax)
    assert torch.equal(dequantize_nf4(ours), bnb_functional.dequantize_4bit(packed, state))


# -- adapter files -------------------------------------------------------------------------


@pytest.fixture
def saved_lora(tmp_path):
    model = peft_fast.patch(build("llama"), lora())
    peft_fast.save_adapter(model, tmp_path / "good")
    return tmp_path / "good"


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(directory, change):
    path = directory / "adapter_model.safetensors"
    save_file({k: change(v) for k, v in load_file(path).items()}, path)


def _truncate(directory):
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (
            lambda d: (d / "adapter_config.json").write_text("{oops"),
            ValueError,
            r"adapter_config\.json is not valid JSON",
        ),
        (lambda d: (d / "adapter_config.json").write_text("[1]"), ValueError, r"must hold a JSON object, got list"),
        (lambda d: _edit_config(d, lora_alpha=float("nan")), ValueError, r"lora_alpha must be a finite number"),
        (lambda d: _edit_config(d, lora_dropout="0.1"), ValueError, r"lora_dropout must be a number"),
        (_truncate, ValueError, r"adapter_model\.safetensors is not a valid safetensors file"),
        (lambda d: _edit_tensors(d, lambda t: (t * 100).int()), ValueError, r"must be floating point; .*torch\.int32"),
        (lambda d: _edit_config(d, rank_pattern=["q_proj"]), TypeError, r"rank_pattern must be a dict of module-name"),
        (lambda d: _edit_config(d, alpha_pattern=7), TypeError, r"alpha_pattern must be a dict of module-name"),
    ],
    ids=[
        "config-not-json",
        "config-a-list",
        "alpha-nan",
        "dropout-str",
        "truncated",
        "int-tensors",
        "rank-pattern-list",
        "alpha-pattern-int",
    ],
)
def test_load_adapter_rejects_a_damaged_directory_and_changes_nothing(saved_lora, damage, error, match):
    damage(saved_lora)
    model = build("llama")
    types = module_types(model)
    with pytest.raises(error, match=match):
        peft_fast.load_adapter(model, saved_lora)
    assert module_types(model) == types


def test_load_adapter_from_a_file_path_names_the_problem(saved_lora):
    with pytest.raises(ValueError, match=r"adapter_config\.json is a file; give the adapter's directory"):
        peft_fast.load_adapter(build("llama"), saved_lora / "adapter_config.json")


@pytest.mark.parametrize("method", ["lora", "ia3", "adapter", "prompt"])
def test_saving_over_an_existing_file_is_a_clear_error(tmp_path, method):
    config = {"lora": lora(), "ia3": IA3Config(), "adapter": AdapterConfig(), "prompt": PromptTuningConfig(4)}[method]
    model = peft_fast.patch(build("llama"), config)
    target = tmp_path / "out"
    target.write_text("keep me")
    with pytest.raises(ValueError, match=r"directory '.*out' is an existing file"):
        peft_fast.save_adapter(model, target)
    assert target.read_text() == "keep me"


def _fail_second_fsync(monkeypatch):
    real_fsync, calls = os.fsync, {"n": 0}

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_fsync(fd)

    monkeypatch.setattr("peft_fast.io.os.fsync", failing_fsync)


def test_failed_lora_save_keeps_config_and_weights_together(tmp_path, monkeypatch):
    # Before: the config (inner context) was renamed before the weights were fsynced, so a failure
    # left the new config (r=8) beside the old weights (r=4): a directory that no longer loads.
    model = peft_fast.patch(build("llama"), lora(r=4))
    peft_fast.add_adapter(model, lora(r=8), "wide")
    peft_fast.save_adapter(model, tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _fail_second_fsync(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        peft_fast.save_adapter(model, tmp_path, "wide")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_failed_prompt_save_changes_no_file(tmp_path, monkeypatch):
    # Before: the weights were renamed into place before the config was written; a failure then
    # left the new weights beside the old config.
    model = peft_fast.patch(build("llama"), PromptTuningConfig(4))
    peft_fast.save_adapter(model, tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model.peft_fast_prompt.encoder.embedding.weight.add_(1.0)
    _fail_second_fsync(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        peft_fast.save_adapter(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


# -- checkpoints ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    build("llama").save_pretrained(path)
    return path


def _copy(checkpoint, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    return target


def _shard(directory):
    build("llama").save_pretrained(directory, max_shard_size="100KB")
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()


def _bad_offsets(directory):
    path = directory / "model.safetensors"
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] * 2, *header[name]["shape"][1:]]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + size :])


@pytest.mark.parametrize(
    ("damage", "target", "error", "match"),
    [
        (None, lambda c: c / "missing", FileNotFoundError, r"no checkpoint at .*missing"),
        (None, lambda c: c / "model.safetensors", ValueError, r"model\.safetensors is a file; quantize_model needs"),
        (lambda c: (c / "config.json").unlink(), None, FileNotFoundError, r"has no config\.json"),
        (lambda c: shutil.rmtree(c) or c.mkdir() or _shard(c), None, FileNotFoundError, r"names shard\(s\) that are"),
        (
            lambda c: (c / "model.safetensors.index.json").write_text("{}"),
            None,
            ValueError,
            r"index\.json has no valid weight_map",
        ),
        (
            lambda c: (c / "model.safetensors.index.json").write_text("{oops"),
            None,
            ValueError,
            r"index\.json is not valid JSON",
        ),
        (
            lambda c: (c / "model.safetensors").write_bytes(b"\x04\0\0\0\0\0\0\0oops"),
            None,
            ValueError,
            r"model\.safetensors: not a safetensors file \(its header is not JSON\)",
        ),
        (_bad_offsets, None, ValueError, r"has data_offsets \[.*\] that do not fit shape"),
        (
            # A header length past the end of the file: the reader once took the short read as the header.
            lambda c: (c / "model.safetensors").write_bytes((1000).to_bytes(8, "little") + b"{}"),
            None,
            ValueError,
            r"model\.safetensors: not a safetensors file \(its header runs past the end of the file",
        ),
    ],
    ids=[
        "missing",
        "a-file",
        "no-config",
        "missing-shard",
        "index-no-map",
        "index-not-json",
        "header",
        "offsets",
        "short-header",
    ],
)
def test_quantize_model_rejects_a_bad_checkpoint(checkpoint, tmp_path, damage, target, error, match):
    path = _copy(checkpoint, tmp_path)
    if damage is not None:
        damage(path)
    with pytest.raises(error, match=match):
        quantize_model(target(path) if target else path, progress=False)


@pytest.mark.parametrize(
    ("arg", "kwargs", "error", "match"),
    [
        (123, {}, TypeError, r"model_or_path must be a torch\.nn\.Module or a checkpoint directory, got int"),
        (None, {}, TypeError, r"model_or_path must be .* got NoneType"),
        ("model", {"double_quant": "no"}, TypeError, r"double_quant must be True or False"),
    ],
)
def test_quantize_model_rejects_bad_arguments(arg, kwargs, error, match):
    model = build("llama") if arg == "model" else arg
    with pytest.raises(error, match=match):
        quantize_model(model, progress=False, **kwargs)
    if arg == "model":
        assert not any(isinstance(m, NF4Linear) for m in model.modules())
