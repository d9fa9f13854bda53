"""``peft_fast.patch`` against Hugging Face PEFT 0.21 (and bitsandbytes for NF4), architecture by architecture.

Every test builds a tiny randomly initialised fp32 model (hidden 64, 1-2 layers, vocab 128; every
Linear's in_features a multiple of 64 so NF4 blocks align with rows, which bitsandbytes' CPU
dequantization needs) and compares, on the same batch:

1. logits of ``patch`` (dense base) with PEFT's LoRA model carrying the same A / B;
2. logits of ``patch(quantize="nf4")`` with PEFT on a transformers + bitsandbytes 4-bit model;
3. the adapter weights after one SGD step;
4. adapter files both ways (PEFT -> peft_fast, peft_fast -> PEFT) and their contents;
5. ``merge`` and ``unpatch`` against the patched / original model;
6. trainable parameter counts, with bias="all" / "lora_only" and modules_to_save.

The PEFT models use ``init_lora_weights=False`` so B is non-zero and every comparison sees the
LoRA path; each test also checks that the adapter moves the logits.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes as bnb
import peft
import pytest
import torch
import transformers
from safetensors import safe_open

import peft_fast
from peft_fast.lora import lora_layers

VOCAB = 128
ADAPTER = "default"
DENSE_TOL = 1e-5  # fp32, relative to the largest |value|
NF4_TOL = 1e-4
# One SGD step's update (new - old adapter weight), relative to its largest element. Gradients that
# nearly cancel (OPT's k_proj) differ in fp32 rounding by ~1e-3 between PEFT's autograd and our
# kernels (Triton interpreter); a 1% gradient error is still caught.
UPDATE_TOL = 5e-3


@dataclass(frozen=True)
class Arch:
    model_class: str  # transformers class built from the config
    config_class: str
    config: dict
    targets: tuple[str, ...]  # the attention + MLP Linear names (explicit target_modules)
    attention: tuple[str, ...]  # a subset, so that some layers carry no adapter
    auto_class: str = "AutoModelForCausalLM"  # how transformers + bitsandbytes load the checkpoint
    seq2seq: bool = False
    bias_modules: tuple[str, ...] = ()  # a module with a bias, for modules_to_save


_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
_LLAMA_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NEOX_NAMES = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

ARCHS: dict[str, Arch] = {
    "llama": Arch("LlamaForCausalLM", "LlamaConfig", {**_DECODER, "num_key_value_heads": 2},
                  _LLAMA_NAMES, ("q_proj", "v_proj")),
    "mistral": Arch("MistralForCausalLM", "MistralConfig", {**_DECODER, "num_key_value_heads": 2},
                    _LLAMA_NAMES, ("q_proj", "v_proj")),
    "qwen2": Arch("Qwen2ForCausalLM", "Qwen2Config", {**_DECODER, "num_key_value_heads": 2},  # q/k/v biases
                  _LLAMA_NAMES, ("q_proj", "v_proj")),
    "gemma": Arch("GemmaForCausalLM", "GemmaConfig", {**_DECODER, "num_key_value_heads": 2, "head_dim": 16},
                  _LLAMA_NAMES, ("q_proj", "v_proj")),
    "phi3": Arch("Phi3ForCausalLM", "Phi3Config",  # fused qkv_proj and gate_up_proj
                 {**_DECODER, "num_key_value_heads": 4, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
                 ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), ("qkv_proj",)),
    "gpt2": Arch("GPT2LMHeadModel", "GPT2Config",  # Conv1D, weight stored [in, out]
                 dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
                 ("c_attn", "c_proj", "c_fc"), ("c_attn",), bias_modules=("ln_f",)),
    "gpt_neox": Arch("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(_DECODER), _NEOX_NAMES, ("query_key_value",)),
    "falcon": Arch("FalconForCausalLM", "FalconConfig",  # fused query_key_value (multi-query)
                   dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB),
                   _NEOX_NAMES, ("query_key_value",)),
    "opt": Arch("OPTForCausalLM", "OPTConfig",
                {**_DECODER, "ffn_dim": 128, "word_embed_proj_dim": 64, "max_position_embeddings": 64,
                 "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0},
                ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), ("q_proj", "v_proj"),
                bias_modules=("final_layer_norm",)),
    "bert": Arch("BertForMaskedLM", "BertConfig",
                 {**_DECODER, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
                  "attention_probs_dropout_prob": 0.0},
                 ("query", "key", "value", "dense"), ("query", "value"), auto_class="AutoModelForMaskedLM"),
    "t5": Arch("T5ForConditionalGeneration", "T5Config",
               dict(d_model=64, d_kv=16, d_ff=128, num_layers=1, num_decoder_layers=1, num_heads=4,
                    vocab_size=VOCAB, dropout_rate=0.0),
               ("q", "k", "v", "o", "wi", "wo"), ("q", "v"), auto_class="AutoModelForSeq2SeqLM", seq2seq=True),
}  # fmt: skip
ARCH_NAMES = list(ARCHS)
# Every config keeps dropout at 0: the NF4 comparison runs in train mode (see _nf4_pair).


# -- helpers ---------------------------------------------------------------------------------


def build(arch: str) -> torch.nn.Module:
    """The tiny fp32 model of ``arch``, with weights fixed by the seed.

    Biases (zero at initialisation in most architectures) are made random so that every
    comparison also sees them, and so that a bias left out of a file or a step shows.
    """
    spec = ARCHS[arch]
    config = getattr(transformers, spec.config_class)(**spec.config)
    torch.manual_seed(0)
    model = getattr(transformers, spec.model_class)(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(std=0.1)
    return model


def make_batch(arch: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs, labels for a cross-entropy over the logits)."""
    generator = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 8), generator=generator)}
    if ARCHS[arch].seq2seq:
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 6), generator=generator)
    out_len = inputs.get("decoder_input_ids", inputs["input_ids"]).shape[1]
    return inputs, torch.randint(0, VOCAB, (2, out_len), generator=generator)


def logits_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


def loss_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    logits = logits_of(model, inputs)
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), labels.flatten())


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return ((actual.detach().float() - expected.detach().float()).abs().max() / expected.detach().abs().max()).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def assert_adapter_matters(with_adapter: torch.Tensor, without: torch.Tensor) -> None:
    """The LoRA delta is far above every tolerance used here, so the comparisons can fail."""
    assert rel_err(with_adapter, without) > 1e-2, "the adapter does not change the logits"


def peft_config(**kwargs) -> peft.LoraConfig:
    return peft.LoraConfig(init_lora_weights=False, **kwargs)  # B != 0: the LoRA path is visible


def ours_config(**kwargs) -> peft_fast.LoraConfig:
    return peft_fast.LoraConfig(**kwargs)


def peft_layer_names(peft_model) -> set[str]:
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix)
        for name, module in peft_model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }


def copy_lora_from_peft(peft_model, ours: torch.nn.Module) -> None:
    """Give our adapter PEFT's A and B, module by module; both must wrap the same modules."""
    ours_names = {name for name, _ in lora_layers(ours)}
    assert ours_names == peft_layer_names(peft_model)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            theirs = inner.get_submodule(name)
            layer.lora_A[ADAPTER].weight.copy_(theirs.lora_A[ADAPTER].weight)
            layer.lora_B[ADAPTER].weight.copy_(theirs.lora_B[ADAPTER].weight)


def lora_weights(model: torch.nn.Module, peft_model: bool) -> dict[str, torch.Tensor]:
    """{module name + .A / .B: tensor} for ours or a PEFT model, under the same keys."""
    if peft_model:
        inner = model.base_model.model
        names = peft_layer_names(model)
        layers = {name: inner.get_submodule(name) for name in names}
    else:
        layers = dict(lora_layers(model))
    out = {}
    for name, layer in layers.items():
        out[f"{name}.A"] = layer.lora_A[ADAPTER].weight.detach().clone()
        out[f"{name}.B"] = layer.lora_B[ADAPTER].weight.detach().clone()
    return out


def sgd_step(model: torch.nn.Module, inputs, labels) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-2)
    loss_of(model, inputs, labels).backward()
    optimizer.step()
    optimizer.zero_grad()


def assert_step_matches(peft_model, ours, inputs, labels, tol: float, update_tol: float) -> None:
    """One SGD step (lr 1e-2) on both gives the same adapter weights and the same updates."""
    before = lora_weights(peft_model, peft_model=True)
    assert lora_weights(ours, peft_model=False).keys() == before.keys()
    sgd_step(peft_model, inputs, labels)
    sgd_step(ours, inputs, labels)
    theirs, mine = lora_weights(peft_model, peft_model=True), lora_weights(ours, peft_model=False)
    moved = 0
    for key, start in before.items():
        assert_close(mine[key], theirs[key], tol, f"{key} after the step")
        update = theirs[key] - start
        if update.abs().max() > 0:
            moved += 1
            assert_close(mine[key] - start, update, update_tol, f"{key} update")
    assert moved == len(before), "some adapter weights got no gradient"


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(directory / "adapter_model.safetensors", framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def adapter_config(directory: Path) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())


# -- 1. dense logits -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_dense_logits_match_peft(arch):
    base = build(arch)
    inputs, _ = make_batch(arch)
    kwargs = dict(r=8, lora_alpha=16, target_modules="all-linear")
    with torch.no_grad():
        base_logits = logits_of(base, inputs)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(**kwargs))
        ours = peft_fast.patch(copy.deepcopy(base), ours_config(**kwargs))
        copy_lora_from_peft(theirs, ours)  # also: both wrap exactly the same modules
        expected, actual = logits_of(theirs, inputs), logits_of(ours, inputs)

    assert_adapter_matters(expected, base_logits)
    assert_close(actual, expected, DENSE_TOL, f"{arch} logits")
    assert peft_fast.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


# -- 2. NF4 logits against transformers + bitsandbytes ----------------------------------------


def _nf4_pair(arch: str, double_quant: bool, tmp_path: Path, **lora_kwargs):
    """(PEFT on a bitsandbytes 4-bit model, our QLoRA model, their base logits) with equal A / B.

    Both are in train mode: bitsandbytes' CPU Linear4bit computes in bf16 in eval mode without
    autograd on AVX512-BF16 CPUs, and in fp32 (dequantize, then matmul) otherwise.
    """
    base = build(arch)
    base.save_pretrained(tmp_path / "base")
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    auto = getattr(transformers, ARCHS[arch].auto_class)
    quantized = auto.from_pretrained(
        tmp_path / "base", quantization_config=bnb_config, device_map="cpu", dtype=torch.float32
    )
    bnb_names = {name for name, module in quantized.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    if not bnb_names:  # Falcon: its layers are FalconLinear, and transformers converts only exact nn.Linear
        linear_types = sorted({type(m).__name__ for m in quantized.modules() if isinstance(m, torch.nn.Linear)})
        pytest.skip(
            f"transformers + bitsandbytes quantize no layer of {arch}: they convert only modules whose type is "
            f"exactly nn.Linear or Conv1D, and its linear layers are {linear_types}. No 4-bit reference to compare"
        )
    kwargs = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", **lora_kwargs)
    theirs = peft.get_peft_model(quantized, peft_config(**kwargs)).train()
    ours = peft_fast.patch(copy.deepcopy(base), ours_config(quantize="nf4", double_quant=double_quant, **kwargs))
    ours.train()
    our_names = {name.removesuffix(".base_layer") for name, module in ours.named_modules()
                 if isinstance(module, peft_fast.NF4Linear)}  # fmt: skip
    assert our_names == bnb_names, "peft_fast and transformers + bitsandbytes quantize different layers"
    copy_lora_from_peft(theirs, ours)
    with theirs.disable_adapter():
        base_logits = logits_of(theirs, make_batch(arch)[0]).detach()
    return theirs, ours, base_logits


NF4_CASES = [pytest.param("llama", False, id="llama-no_dq")] + [
    pytest.param(arch, True, id=f"{arch}-dq") for arch in ARCH_NAMES
]


@pytest.mark.parametrize(("arch", "double_quant"), NF4_CASES)
def test_nf4_logits_match_peft_bitsandbytes(arch, double_quant, tmp_path):
    theirs, ours, their_base_logits = _nf4_pair(arch, double_quant, tmp_path)
    inputs, _ = make_batch(arch)
    with peft_fast.disable_adapters(ours):
        our_base_logits = logits_of(ours, inputs)
    expected, actual = logits_of(theirs, inputs), logits_of(ours, inputs)  # grad enabled: fp32 in bnb

    assert_close(our_base_logits, their_base_logits, NF4_TOL, f"{arch} NF4 base logits")
    assert_adapter_matters(expected, their_base_logits)
    assert_close(actual, expected, NF4_TOL, f"{arch} NF4 + LoRA logits")
    assert peft_fast.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


# -- 3. one optimizer step ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_one_sgd_step_matches_peft(arch):
    base = build(arch)
    inputs, labels = make_batch(arch)
    kwargs = dict(r=8, lora_alpha=16, target_modules="all-linear")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(**kwargs))
    ours = peft_fast.patch(copy.deepcopy(base), ours_config(**kwargs))
    copy_lora_from_peft(theirs, ours)
    assert_step_matches(theirs, ours, inputs, labels, tol=DENSE_TOL, update_tol=UPDATE_TOL)


@pytest.mark.parametrize(("arch", "double_quant"), NF4_CASES)
def test_one_sgd_step_matches_peft_nf4(arch, double_quant, tmp_path):
    theirs, ours, _ = _nf4_pair(arch, double_quant, tmp_path)
    inputs, labels = make_batch(arch)
    assert_step_matches(theirs, ours, inputs, labels, tol=NF4_TOL, update_tol=UPDATE_TOL)


# -- 4. adapter files, both ways ----------------------------------------------------------------


def _round_trip_kwargs(arch: str) -> dict:
    return dict(r=4, lora_alpha=8, target_modules=list(ARCHS[arch].targets))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_adapter_saved_by_peft_loads_into_peft_fast(arch, tmp_path):
    base = build(arch)
    inputs, _ = make_batch(arch)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(**_round_trip_kwargs(arch)))
    theirs.save_pretrained(tmp_path)

    ours = peft_fast.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        expected, actual, base_logits = logits_of(theirs, inputs), logits_of(ours, inputs), logits_of(base, inputs)
    assert_adapter_matters(expected, base_logits)
    assert_close(actual, expected, DENSE_TOL, f"{arch} logits after load_adapter")
    their_weights = lora_weights(theirs, peft_model=True)
    for key, value in lora_weights(ours, peft_model=False).items():
        assert torch.equal(value, their_weights[key]), key
    assert not any(p.requires_grad for p in ours.parameters())  # loaded for inference by default


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_adapter_saved_by_peft_fast_loads_into_peft(arch, tmp_path):
    base = build(arch)
    inputs, _ = make_batch(arch)
    ours = peft_fast.patch(copy.deepcopy(base), ours_config(init_lora_weights=False, **_round_trip_kwargs(arch)))
    peft_fast.save_adapter(ours, tmp_path)

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        expected, actual, base_logits = logits_of(ours, inputs), logits_of(theirs, inputs), logits_of(base, inputs)
    assert_adapter_matters(expected, base_logits)
    assert_close(actual, expected, DENSE_TOL, f"{arch} logits after PeftModel.from_pretrained")


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_adapter_files_match_peft(arch, tmp_path):
    base = build(arch)
    kwargs = _round_trip_kwargs(arch)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(**kwargs))
    ours = peft_fast.patch(copy.deepcopy(base), ours_config(**kwargs))
    copy_lora_from_peft(theirs, ours)
    theirs.save_pretrained(tmp_path / "peft")
    peft_fast.save_adapter(ours, tmp_path / "ours")

    their_tensors, our_tensors = adapter_tensors(tmp_path / "peft"), adapter_tensors(tmp_path / "ours")
    assert sorted(our_tensors) == sorted(their_tensors)
    for key, value in their_tensors.items():
        assert our_tensors[key].shape == value.shape, key
        assert our_tensors[key].dtype == value.dtype, key
        assert torch.equal(our_tensors[key], value), key

    their_config, our_config = adapter_config(tmp_path / "peft"), adapter_config(tmp_path / "ours")
    assert set(our_config) >= set(their_config), f"missing keys {set(their_config) - set(our_config)}"
    for key in ("r", "lora_alpha", "peft_type", "bias", "lora_dropout", "use_rslora", "use_dora"):
        assert our_config[key] == their_config[key], key
    assert sorted(our_config["target_modules"]) == sorted(their_config["target_modules"])


# -- 5. merge and unpatch -----------------------------------------------------------------------


def _assert_plain_hf_model(merged: torch.nn.Module, original: torch.nn.Module, inputs, expected) -> None:
    """No peft_fast class is left, and the state dict is the original architecture's, loadable as is."""
    leftovers = sorted({type(m).__qualname__ for m in merged.modules() if type(m).__module__.startswith("peft_fast")})
    assert not leftovers, f"merged model still holds {leftovers}"
    merged_state, original_state = merged.state_dict(), original.state_dict()
    assert merged_state.keys() == original_state.keys()
    for key, value in original_state.items():
        assert merged_state[key].shape == value.shape, key
        assert merged_state[key].dtype == value.dtype, key
    fresh = type(original)(original.config).eval()
    fresh.load_state_dict(merged_state, strict=True)
    with torch.no_grad():
        assert_close(logits_of(fresh, inputs), expected, DENSE_TOL, "merged state dict in a fresh model")


@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["dense", "nf4"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_merge_matches_patched_model(arch, quantize):
    base = build(arch)
    inputs, _ = make_batch(arch)
    kwargs = dict(r=8, lora_alpha=16, target_modules=list(ARCHS[arch].attention))  # some layers carry no adapter
    model = peft_fast.patch(copy.deepcopy(base), ours_config(init_lora_weights=False, quantize=quantize, **kwargs))
    with torch.no_grad():
        with peft_fast.disable_adapters(model):
            without = logits_of(model, inputs)
        patched = logits_of(model, inputs)
        assert_adapter_matters(patched, without)
        merged = peft_fast.merge(model)
        actual = logits_of(merged, inputs)

    assert merged is model
    assert_close(actual, patched, DENSE_TOL if quantize is None else NF4_TOL, f"{arch} merged logits")
    _assert_plain_hf_model(merged, base, inputs, actual)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_unpatch_restores_original_model(arch):
    base = build(arch)
    inputs, _ = make_batch(arch)
    original_classes = {name: type(module) for name, module in base.named_modules()}
    model = peft_fast.patch(copy.deepcopy(base), ours_config(init_lora_weights=False, target_modules="all-linear"))
    with torch.no_grad():
        assert_adapter_matters(logits_of(model, inputs), logits_of(base, inputs))
        peft_fast.unpatch(model)
        assert {name: type(module) for name, module in model.named_modules()} == original_classes
        assert torch.equal(logits_of(model, inputs), logits_of(base, inputs))
    restored, original = model.state_dict(), base.state_dict()
    assert restored.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(restored[key], value), key


# -- 6. trainable parameters, biases and modules_to_save -----------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(target_modules="all-linear"), id="all-linear"),
        pytest.param(dict(r=4, target_modules=["q_proj", "v_proj"]), id="q_v-r4"),
        pytest.param(dict(r=4, target_modules=r".*\.mlp\.(gate|up)_proj"), id="regex"),
        pytest.param(dict(r=8, target_modules="all-linear", rank_pattern={"down_proj": 2}), id="rank_pattern"),
        pytest.param(dict(r=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]), id="one-layer"),
        pytest.param(dict(target_modules=["q_proj"], bias="all", modules_to_save=["norm"]), id="bias-all-mts"),
    ],
)
def test_trainable_parameter_count_matches_peft_llama(kwargs):
    base = build("llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = peft_fast.patch(copy.deepcopy(base), ours_config(**kwargs))
    assert {name for name, _ in lora_layers(ours)} == peft_layer_names(theirs)
    trainable, total = peft_fast.trainable_parameters(ours)
    assert trainable == theirs.get_nb_trainable_parameters()[0]
    assert 0 < trainable < total


BIAS_CASES = [
    pytest.param(arch, bias, modules, id=f"{arch}-{bias}-{'+'.join(modules) or 'no_mts'}")
    for arch in ("opt", "gpt2")
    for bias, modules in [("all", ()), ("lora_only", ()), ("none", ARCHS[arch].bias_modules),
                          ("all", ARCHS[arch].bias_modules)]
]  # fmt: skip
# PEFT's bias="all" also saves the biases inside its modules_to_save wrappers; nothing reads them back.
_PEFT_WRAPPER_KEYS = (".modules_to_save.", ".original_module.")


@pytest.mark.parametrize(("arch", "bias", "modules_to_save"), BIAS_CASES)
def test_bias_and_modules_to_save_match_peft(arch, bias, modules_to_save, tmp_path):
    base = build(arch)
    inputs, labels = make_batch(arch)
    targets = [*ARCHS[arch].attention, "fc1" if arch == "opt" else "c_fc"]
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, bias=bias, modules_to_save=list(modules_to_save) or None)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(**kwargs))
    ours = peft_fast.patch(copy.deepcopy(base), ours_config(**kwargs))
    copy_lora_from_peft(theirs, ours)
    assert peft_fast.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]

    # One step moves biases and modules_to_save as well; the saved files then hold the same values.
    sgd_step(theirs, inputs, labels)
    sgd_step(ours, inputs, labels)
    theirs.save_pretrained(tmp_path / "peft")
    peft_fast.save_adapter(ours, tmp_path / "ours")
    their_tensors, our_tensors = adapter_tensors(tmp_path / "peft"), adapter_tensors(tmp_path / "ours")
    extra = set(their_tensors) - set(our_tensors)
    assert set(our_tensors) <= set(their_tensors)
    assert all(any(w in key for w in _PEFT_WRAPPER_KEYS) for key in extra), sorted(extra)
    saved_biases = [key for key in our_tensors if key.endswith(".bias")]
    assert bool(saved_biases) == (bias != "none" or bool(modules_to_save))
    for key, value in our_tensors.items():
        assert_close(value, their_tensors[key], DENSE_TOL, key)
    if bias != "none":  # the step changed the biases: the files must carry the new values
        base_state = base.state_dict()
        original = {
            key: base_state[key.removeprefix("base_model.model.").replace(".base_layer.", ".")] for key in saved_biases
        }
        assert any(not torch.equal(our_tensors[key], value) for key, value in original.items())

    with torch.no_grad():
        their_logits, our_logits = logits_of(theirs, inputs), logits_of(ours, inputs)
        assert_close(our_logits, their_logits, DENSE_TOL, "logits after the step")
        loaded = peft_fast.load_adapter(copy.deepcopy(base), tmp_path / "peft")
        assert_close(logits_of(loaded, inputs), their_logits, DENSE_TOL, "PEFT's adapter loaded by peft_fast")
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        assert_close(logits_of(reloaded, inputs), our_logits, DENSE_TOL, "our adapter loaded by PEFT")


def test_modules_to_save_on_tied_lm_head_round_trips(tmp_path):
    """A tied head in modules_to_save is untied, as PEFT trains a copy; the round trip works."""
    base = build("llama")
    base.config.tie_word_embeddings = True
    base.tie_weights()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    inputs, _ = make_batch("llama")
    kwargs = dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    ours = peft_fast.patch(copy.deepcopy(base), ours_config(**kwargs))
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    assert ours.lm_head.weight.requires_grad and not ours.model.embed_tokens.weight.requires_grad
    with torch.no_grad():
        ours.lm_head.weight.add_(0.01)  # a trained head: the embeddings must not move with it
    assert torch.equal(ours.model.embed_tokens.weight, base.model.embed_tokens.weight)
    peft_fast.save_adapter(ours, tmp_path)
    loaded = peft_fast.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert_close(logits_of(loaded, inputs), logits_of(ours, inputs), DENSE_TOL, "reloaded logits")
