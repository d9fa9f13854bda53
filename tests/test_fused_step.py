"""The fused training step on tiny models of every family in the model table.

Per family: the pieces the table names are fused (and nothing else), a patched model's loss and
LoRA gradients equal those of the same model patched with ``fused=False`` (float64 tightly, bf16
autocast within the usual tolerance), on the torch backend and the Triton interpreter; gradient
checkpointing, activation offload and the tiled MLP give the same numbers; training with labels
returns no logits while eval does; ``unfuse`` / ``unpatch`` / ``merge`` give Hugging Face's classes back.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import transformers
from torch.overrides import TorchFunctionMode

import peft_fast
from peft_fast import fused as fused_step
from peft_fast.fused.attention import rope_is_fused
from peft_fast.fused.classes import is_fused

VOCAB = 128
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]
CONFIGS = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "gemma": transformers.GemmaConfig,
    "gemma2": transformers.Gemma2Config,
    "gemma3_text": transformers.Gemma3TextConfig,
    "phi3": transformers.Phi3Config,
}
# Norms per layer (input, post-attention; Gemma 2 / 3 also pre / post feed-forward; Qwen3 / Gemma 3 q / k).
NORMS_PER_LAYER = {"gemma2": 4, "gemma3_text": 6, "qwen3": 4}
LAYERS = 2


def build(family: str, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """A seeded tiny model of ``family`` (hidden 64, 2 layers, GQA, dropout off)."""
    torch.manual_seed(0)
    kwargs = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, max_position_embeddings=256)  # fmt: skip
    if family == "gemma2":
        kwargs["final_logit_softcapping"] = 5.0  # small enough to matter on tiny logits
    if family == "gemma3_text":
        kwargs["final_logit_softcapping"] = 5.0
    kwargs.update(overrides)
    config = CONFIGS[family](**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # norm weights away from their init, so a wrong weight path shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    return model.train()


def batch(seq: int = 12, padded: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, seq), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0  # left padding in the second row
    labels = ids.clone()
    labels[1, :3] = -100
    labels[0, 5] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def patched(model, fused=True, dropout=0.0, **kwargs):
    config = peft_fast.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                  init_lora_weights=False)  # fmt: skip
    torch.manual_seed(1)
    return peft_fast.patch(model, config, fused=fused, **kwargs)


def step(model, inputs, autocast: torch.dtype | None = None):
    """Loss and the LoRA gradients of one forward + backward (dropout masks from a fixed seed)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    context = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with context:
        out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return out, out.loss.detach(), grads


class KeepFloat64(TorchFunctionMode):
    """Hugging Face's modules and loss cast to fp32 even an fp64 tensor (``.float()``, ``.to(torch.float32)``);
    inside this mode those casts leave fp64 alone, so its formulas run in fp64, as our ops compute fp64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.float) and args[0].dtype == torch.float64:
            target = kwargs.get("dtype", args[1] if len(args) > 1 else None)
            if func is torch.Tensor.float or target == torch.float32:
                return args[0]
        return func(*args, **kwargs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_same_step(actual, expected, tol: float) -> None:
    (_, loss_a, grads_a), (_, loss_b, grads_b) = actual, expected
    assert rel_err(loss_a, loss_b) <= tol, (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_b:
        assert rel_err(grads_a[name], grads_b[name]) <= tol, name


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", request.param)
    return request.param


# -- what is fused ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_fuses_what_the_table_names(family):
    model = patched(build(family))
    state = fused_step.fused_state(model)
    norms = NORMS_PER_LAYER.get(family, 2) * LAYERS + 1
    expected = {"rms_norm": norms, "residual_add": LAYERS, "rope": LAYERS, "glu": LAYERS, "tiled_mlp": LAYERS,
                "linear_cross_entropy": 1, "keep_last_layer": 1}  # fmt: skip
    assert state.pieces == expected, state.pieces
    assert all(rope_is_fused(layer.self_attn) for layer in model.model.layers)
    assert is_fused(model, "linear_cross_entropy") and type(model).__name__ == CONFIGS[family].__name__.replace(
        "Config", "ForCausalLM"
    ).replace("TextForCausalLM", "ForCausalLM")
    assert state.summary().startswith("peft_fast: fused step for ")


def test_unknown_families_are_left_as_they_are():
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32)
    model = patched(transformers.GPT2LMHeadModel(config))
    assert fused_step.fused_state(model) is None
    assert not any(is_fused(m) for m in model.modules())


def test_pieces_opt_out_and_bad_values():
    assert fused_step.fused_state(patched(build("llama"), fused=False)) is None
    state = fused_step.fused_state(patched(build("llama"), fused={"rope": False, "linear_cross_entropy": False}))
    assert state.pieces.keys() == {"rms_norm", "residual_add", "glu", "tiled_mlp", "keep_last_layer"}
    state = fused_step.fused_state(patched(build("llama"), fused=["rms_norm"]))
    assert state.pieces == {"rms_norm": 5}
    with pytest.raises(ValueError, match="unknown fused piece"):
        patched(build("llama"), fused=["rmsnorm"])
    for bad in ("all", 1, {"rope": "no"}):
        with pytest.raises(TypeError):
            patched(build("llama"), fused=bad)
    model = build("llama")
    with pytest.raises(TypeError, match="offload_activations"):
        patched(model, offload_activations="yes")
    assert not peft_fast.host.has_method(model)  # refused before the model was touched


def test_the_summary_is_printed_once(capsys, monkeypatch):
    monkeypatch.setattr(fused_step, "_PRINTED", set())
    patched(build("qwen2"))
    first = capsys.readouterr().err
    patched(build("qwen2"))
    assert "fused step for Qwen2" in first and "fused step" not in capsys.readouterr().err


# -- the same numbers -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_lora_gradients_match_unfused_in_float64(family, backend):
    if backend == "triton":
        pytest.skip("the kernels take fp32 / fp16 / bf16; float64 runs the torch references")
    # Gemma 2's eager attention takes its softmax in fp32, where an fp64 mask's minimum is -inf: a fully
    # padded query row is NaN in Hugging Face's own model, so its fp64 case runs without padding.
    inputs = batch(padded=family != "gemma2")
    fused = patched(build(family, torch.float64))
    plain = patched(build(family, torch.float64), fused=False)
    with KeepFloat64():
        assert_same_step(step(fused, inputs), step(plain, inputs), 1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_lora_gradients_match_unfused_in_fp32(family, backend):
    inputs = batch()
    fused = patched(build(family), dropout=0.1)
    plain = patched(build(family), fused=False, dropout=0.1)
    assert_same_step(step(fused, inputs), step(plain, inputs), 2e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "qwen3"])
def test_bf16_autocast_is_as_accurate_as_unfused(family, backend):
    """Under bf16 autocast both stacks round differently (ours once per fused op, Hugging Face's once per
    elementary op), so each is held to the fp32 step: ours must be no further from it than its own bf16
    error allows, i.e. within 1.5x of the unfused model's error (+1e-2)."""
    inputs = batch()
    truth = step(patched(build(family), fused=False), inputs)
    ours = step(patched(build(family)), inputs, torch.bfloat16)
    theirs = step(patched(build(family), fused=False), inputs, torch.bfloat16)
    assert rel_err(ours[1], truth[1]) <= 1.5 * rel_err(theirs[1], truth[1]) + 1e-3
    for name in truth[2]:
        error, reference = rel_err(ours[2][name], truth[2][name]), rel_err(theirs[2][name], truth[2][name])
        assert error <= 1.5 * reference + 1e-2, (name, error, reference)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_variants_match_unfused(rope):
    inputs = batch(seq=24)  # past the original context of the scaled variants
    overrides = {"rope_parameters": {"rope_theta": 10000.0, **rope}}
    fused = patched(build("llama", torch.float64, **overrides))
    plain = patched(build("llama", torch.float64, **overrides), fused=False)
    with KeepFloat64():
        assert_same_step(step(fused, inputs), step(plain, inputs), 1e-10)


def test_hidden_states_and_eval_logits_match(backend):
    inputs = batch()
    fused, plain = patched(build("gemma2")), patched(build("gemma2"), fused=False)
    for model in (fused, plain):
        model.eval()
    with torch.no_grad():
        a = fused(**inputs, output_hidden_states=True)
        b = plain(**inputs, output_hidden_states=True)
    assert a.logits is not None and rel_err(a.logits, b.logits) < 2e-5 and rel_err(a.loss, b.loss) < 2e-5
    assert len(a.hidden_states) == len(b.hidden_states) == LAYERS + 1
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        assert rel_err(x, y) < 2e-5


def test_training_with_labels_returns_no_logits_and_without_labels_does():
    model = patched(build("llama"))
    inputs = batch()
    out = model(**inputs)
    assert out.logits is None and out.loss.requires_grad
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    assert model(**no_labels).logits.shape == (2, 12, VOCAB)
    assert model(**inputs, return_dict=False)[0] is not None  # a tuple: (loss,) without logits
    model.eval()
    assert model(**inputs).logits is not None


def test_num_items_in_batch_reduces_as_transformers_does():
    inputs = batch()
    fused, plain = patched(build("llama")), patched(build("llama"), fused=False)
    for items in (7, torch.tensor(7)):
        a = fused(**inputs, num_items_in_batch=items).loss
        b = plain(**inputs, num_items_in_batch=items).loss
        assert rel_err(a, b) < 1e-6


def test_gradient_checkpointing_matches(backend):
    inputs = batch()
    fused, plain = patched(build("mistral")), patched(build("mistral"), fused=False)
    for model in (fused, plain):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    runs = {}
    for name, model in (("fused", fused), ("plain", plain)):
        calls: list[int] = []
        hooks = [layer.mlp.register_forward_pre_hook(lambda *a, i=i, seen=calls: seen.append(i)) for i, layer in
                 enumerate(model.model.layers)]  # fmt: skip
        runs[name] = step(model, inputs)
        for hook in hooks:
            hook.remove()
        # Every layer is recomputed in backward but, fused, the last (keep_last_layer).
        assert calls == ([0, 1, 0] if name == "fused" else [0, 1, 1, 0]), (name, calls)
    assert_same_step(runs["fused"], runs["plain"], 2e-5)


def test_the_last_layer_is_checkpointed_from_keep_last_layer_max_tokens_on(monkeypatch):
    """Long inputs: the kept layer's activations would outweigh the one layer's recompute they save."""
    from peft_fast.fused import offload

    inputs = batch()
    tokens = inputs["input_ids"].numel()
    model = patched(build("llama"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for limit, expected in ((tokens + 1, [0, 1, 0]), (tokens, [0, 1, 1, 0])):
        monkeypatch.setattr(offload, "KEEP_LAST_LAYER_MAX_TOKENS", limit)
        calls: list[int] = []
        hooks = [layer.mlp.register_forward_pre_hook(lambda *a, i=i, seen=calls: seen.append(i)) for i, layer in
                 enumerate(model.model.layers)]  # fmt: skip
        step(model, inputs)
        for hook in hooks:
            hook.remove()
        assert calls == expected, (limit, calls)


def test_activation_offload_matches_and_keeps_layer_inputs_on_the_host(monkeypatch):
    from peft_fast.fused import offload

    inputs = batch()
    plain = patched(build("llama"), fused=False)
    offloaded = patched(build("llama"), fused=False, offload_activations=True)
    copies = []
    real = offload._HostCopy

    class Spy(real):
        def __init__(self, tensor, previous):
            copies.append(tensor.shape)
            super().__init__(tensor, previous)
            assert self.host.device.type == "cpu" and self.host.data_ptr() != tensor.data_ptr()

    monkeypatch.setattr(offload, "_HostCopy", Spy)
    for model in (plain, offloaded):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same_step(step(offloaded, inputs), step(plain, inputs), 1e-6)
    assert copies == [torch.Size((2, 12, 64))] * LAYERS  # each layer's input, once
    assert fused_step.fused_state(offloaded).offload_activations


def test_activation_offload_with_dropout_replays_the_same_masks():
    inputs = batch()
    runs = []
    for offload_on in (False, True):
        model = patched(build("qwen2"), dropout=0.2, offload_activations=offload_on)
        model.gradient_checkpointing_enable()
        torch.manual_seed(5)
        runs.append(step(model, inputs))
    assert_same_step(runs[1], runs[0], 1e-6)


def test_tiled_mlp_matches_the_untiled_mlp(monkeypatch):
    monkeypatch.setattr(fused_step, "TILED_MLP_MIN_TOKENS", 16)
    monkeypatch.setattr(fused_step, "TILED_MLP_CHUNK_TOKENS", 7)  # 24 tokens: chunks of 7, 7, 7, 3
    from peft_fast.fused import mlp

    calls = []
    real = mlp.tiled_mlp
    monkeypatch.setattr(mlp, "tiled_mlp", lambda *a: calls.append(a[2]) or real(*a))
    inputs = batch()
    tiled = patched(build("llama"))
    plain = patched(build("llama"), fused={"tiled_mlp": False})
    assert_same_step(step(tiled, inputs), step(plain, inputs), 2e-5)  # fp32: the chunks' sums reassociate
    assert calls == [7] * LAYERS


def test_tiled_mlp_replays_the_dropout_of_its_forward(monkeypatch):
    """With LoRA dropout each chunk draws its own masks; the backward's recompute must draw the same ones,
    so the gradients equal those of the same chunked forward run under plain autograd."""
    monkeypatch.setattr(fused_step, "TILED_MLP_MIN_TOKENS", 16)
    monkeypatch.setattr(fused_step, "TILED_MLP_CHUNK_TOKENS", 7)
    from peft_fast.fused import mlp

    inputs = batch()
    tiled = step(patched(build("llama"), dropout=0.3), inputs)

    def chunked_autograd(forward, x, chunk_tokens):
        flat = x.reshape(-1, x.shape[-1])
        return torch.cat([forward(part) for part in flat.split(chunk_tokens)]).reshape(*x.shape[:-1], -1)

    monkeypatch.setattr(mlp, "tiled_mlp", chunked_autograd)
    assert_same_step(tiled, step(patched(build("llama"), dropout=0.3), inputs), 1e-6)


# -- classes back ------------------------------------------------------------------------------------


def test_unpatch_and_merge_give_the_original_classes_back():
    model = build("gemma2")
    classes = {name: type(m) for name, m in model.named_modules()}
    patched(model, offload_activations=True)
    assert sum(is_fused(m) for m in model.modules()) > 10
    peft_fast.unpatch(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert fused_step.fused_state(model) is None
    merged = peft_fast.merge(patched(build("phi3")))
    assert not any(is_fused(m) for m in merged.modules()) and fused_step.fused_state(merged) is None


def test_a_fused_model_pickles_and_deep_copies():
    model = patched(build("qwen3"))
    inputs = batch()
    expected = step(model, inputs)[1]
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone) is type(model) and is_fused(clone.model.layers[0])
        assert torch.equal(step(clone, inputs)[1], expected)


def test_patch_of_a_peft_model_fuses_its_base():
    import peft

    base = build("llama")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_fast.patch(model)
    assert fused_step.fused_state(model.get_base_model()) is not None
    out = model(**batch())
    assert out.logits is None and torch.isfinite(out.loss)
    peft_fast.unpatch(model)
    assert fused_step.fused_state(model.get_base_model()) is None
