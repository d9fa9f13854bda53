"""LoraConfig(trainable_token_indices=...) against PEFT 0.21 on tiny Llama (tied and untied head) and GPT-2.

Only the listed rows of the input embedding (and of a head tied to it) train, as ``trainable_tokens_delta``;
outputs, gradients, files both ways, merge, disable and unpatch match PEFT; NF4 keeps the embedding dense.
PEFT's own custom-model case (``embconv1d1-trainable_tokens``) runs in tests/test_peft_custom_models.py.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import peft_fast
from peft_fast.lora.tokens import TrainableTokensWrapper

VOCAB, HIDDEN = 128, 64
PREFIX = "base_model.model."
TOL = dict(rtol=1e-5, atol=1e-5)
DELTA = ".token_adapter.trainable_tokens_delta."


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


def llama(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      tie_word_embeddings=tied)  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


# (id, model builder, LoRA targets, trainable_token_indices)
CASES = [
    ("llama-tied-list", lambda: llama(True), ["q_proj", "v_proj"], [3, 17, 5, 100]),
    ("llama-untied-dict", lambda: llama(False), ["q_proj"], {"embed_tokens": [3, 17], "lm_head": [5, 17, 9]}),
    ("llama-untied-list", lambda: llama(False), ["o_proj"], [1, 2, 64]),
    ("gpt2-tied-dict", gpt2, ["c_attn"], {"wte": [0, 7, 8]}),
    ("llama-tied-duplicates", lambda: llama(True), ["q_proj"], [3, 17, 3]),
]
PARAMS = [pytest.param(builder, targets, indices, id=case) for case, builder, targets, indices in CASES]


def inputs() -> dict[str, torch.Tensor]:
    # Every listed token appears, and many others.
    ids = torch.tensor([[3, 17, 5, 100, 1, 2, 64, 0], [7, 8, 9, 3, 40, 17, 3, 11]])
    return {"input_ids": ids}


def configs(targets, indices, **kwargs):
    kw = dict(r=4, lora_alpha=8, target_modules=targets, trainable_token_indices=indices, init_lora_weights=False)
    kw.update(kwargs)
    return peft.LoraConfig(**copy.deepcopy(kw)), peft_fast.LoraConfig(**copy.deepcopy(kw))


def logits(model, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(), **extra).logits


def ours_name(name: str) -> str:
    return name.removeprefix(PREFIX)


def adapter_params(model) -> dict[str, torch.nn.Parameter]:
    return {ours_name(n): p for n, p in model.named_parameters() if ".lora_" in n or DELTA in n}


def pair(builder, targets, indices, perturb: bool = True, **kwargs):
    """(base, PEFT model, peft_fast model) over copies of one model, the same adapter (rows moved off the base)."""
    base = builder()
    peft_config, config = configs(targets, indices, **kwargs)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config)
    if perturb:
        torch.manual_seed(1)
        with torch.no_grad():
            for name, param in theirs.named_parameters():
                if DELTA in name:
                    param.add_(torch.randn_like(param))
    ours = peft_fast.patch(copy.deepcopy(base), config)
    theirs_adapter, ours_adapter = adapter_params(theirs), adapter_params(ours)
    assert theirs_adapter.keys() == ours_adapter.keys()
    with torch.no_grad():
        for name, param in theirs_adapter.items():
            ours_adapter[name].copy_(param)
    return base, theirs, ours


@pytest.mark.parametrize(("builder", "targets", "indices"), PARAMS)
def test_outputs_and_trainable_parameters_match_peft(builder, targets, indices):
    base, theirs, ours = pair(builder, targets, indices)
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(base), atol=1e-3)
    torch.testing.assert_close(logits(ours), expected, **TOL)
    theirs_trainable = {ours_name(n) for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == theirs_trainable
    assert peft_fast.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    embedding = ours.get_input_embeddings()
    assert isinstance(embedding, TrainableTokensWrapper)
    head_listed = isinstance(indices, dict) and "lm_head" in indices
    wrapped_head = isinstance(ours.get_output_embeddings(), TrainableTokensWrapper)
    assert wrapped_head == (ours.config.tie_word_embeddings or head_listed)


@pytest.mark.parametrize(("builder", "targets", "indices"), PARAMS)
def test_gradients_match_peft_and_only_listed_rows_move(builder, targets, indices):
    _, theirs, ours = pair(builder, targets, indices)
    batch = inputs()
    for model in (theirs, ours):
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
    theirs_grads = {n: p.grad for n, p in adapter_params(theirs).items()}
    for name, param in adapter_params(ours).items():
        # Relative to the tensor's norm (fp32: 1e-5): an element-wise rtol fails on entries that
        # cancel to ~1e-3 of the tensor's scale, where summation order alone moves the last bits.
        expected = theirs_grads[name]
        error = (param.grad - expected).norm() / expected.norm().clamp_min(1e-30)
        assert error < 1e-5, (name, error.item())
    assert any(DELTA in n and p.grad.abs().sum() > 0 for n, p in adapter_params(ours).items())

    embedding = ours.get_input_embeddings()
    frozen = embedding.base_layer.weight.detach().clone()
    before = embedding.weight.detach().clone()
    torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=0.1).step()
    after = embedding.weight.detach()
    listed = sorted(set(indices if isinstance(indices, list) else indices[next(iter(indices))]))
    moved = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert moved == listed
    assert torch.equal(embedding.base_layer.weight, frozen)  # the base weight itself never changes


@pytest.mark.parametrize(("builder", "targets", "indices"), PARAMS)
def test_files_both_ways(builder, targets, indices, tmp_path):
    base, theirs, ours = pair(builder, targets, indices)
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    peft_fast.save_adapter(ours, tmp_path / "ours")
    their_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert our_file.keys() == their_file.keys()
    for key, value in their_file.items():
        torch.testing.assert_close(our_file[key], value, **TOL)

    loaded = peft_fast.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded), expected, **TOL)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(reloaded), logits(ours), **TOL)
    # Trainable after loading, as is_trainable asks: the rows again.
    trainable = peft_fast.load_adapter(copy.deepcopy(base), tmp_path / "ours", is_trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if DELTA in n)
    # Reloading into the same adapter (a resume): the saved rows come back.
    with torch.no_grad():
        for name, param in trainable.named_parameters():
            if DELTA in name:
                param.zero_()
    peft_fast.load_adapter(trainable, tmp_path / "ours", "default", is_trainable=True)
    torch.testing.assert_close(logits(trainable), logits(ours), **TOL)


@pytest.mark.parametrize(("builder", "targets", "indices"), PARAMS)
def test_merge_matches_peft(builder, targets, indices):
    base, theirs, ours = pair(builder, targets, indices)
    unmerged = logits(ours)
    their_merged = theirs.merge_and_unload()
    merged = peft_fast.merge(ours)
    assert not any(isinstance(m, TrainableTokensWrapper) for m in merged.modules())
    torch.testing.assert_close(logits(merged), unmerged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(merged), logits(their_merged), rtol=1e-4, atol=1e-4)
    ours_state, their_state = merged.state_dict(), their_merged.state_dict()
    assert ours_state.keys() == their_state.keys() == base.state_dict().keys()
    for key, value in their_state.items():
        torch.testing.assert_close(ours_state[key], value, rtol=1e-4, atol=1e-4, msg=key)
    if base.config.tie_word_embeddings:
        assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight


@pytest.mark.parametrize(("builder", "targets", "indices"), PARAMS)
def test_disable_and_unpatch(builder, targets, indices):
    base, theirs, ours = pair(builder, targets, indices, init_lora_weights=True)  # LoRA the identity at init
    base_out = logits(base)
    assert not torch.allclose(logits(ours), base_out, atol=1e-3)
    with peft_fast.disable_adapters(ours):
        torch.testing.assert_close(logits(ours), base_out, **TOL)
    with theirs.disable_adapter():
        torch.testing.assert_close(logits(theirs), base_out, **TOL)
    assert not torch.allclose(logits(ours), base_out, atol=1e-3)
    peft_fast.unpatch(ours)
    assert {n: type(m) for n, m in ours.named_modules()} == {n: type(m) for n, m in base.named_modules()}
    assert ours.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in base.state_dict().items())
    assert torch.equal(logits(ours), base_out)


def test_nf4_keeps_the_embedding_dense_and_trains_only_its_rows(tmp_path):
    base = llama(True)
    config = peft_fast.LoraConfig(r=4, target_modules="all-linear", trainable_token_indices=[3, 17], quantize="nf4")
    ours = peft_fast.patch(copy.deepcopy(base), config)
    assert type(ours.model.embed_tokens.base_layer) is torch.nn.Embedding
    assert isinstance(ours.model.layers[0].self_attn.q_proj.base_layer, peft_fast.NF4Linear)
    with peft_fast.disable_adapters(ours):
        nf4_base = logits(ours)
    torch.testing.assert_close(logits(ours), nf4_base)  # identity at init (LoRA B = 0, rows = originals)
    batch = inputs()
    ours.train()
    before = ours.model.embed_tokens.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        optimizer.zero_grad()
        ours(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
    ours.eval()
    moved = (ours.model.embed_tokens.weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert moved == [3, 17]
    with peft_fast.disable_adapters(ours):
        torch.testing.assert_close(logits(ours), nf4_base)
    peft_fast.save_adapter(ours, tmp_path)
    loaded = peft_fast.load_adapter(copy.deepcopy(base), tmp_path)
    loaded = peft_fast.patch(copy.deepcopy(base), config)
    peft_fast.load_adapter(loaded, tmp_path, "default")
    torch.testing.assert_close(logits(loaded), logits(ours), rtol=1e-5, atol=1e-5)
    merged = peft_fast.merge(ours)
    torch.testing.assert_close(logits(merged), logits(loaded), rtol=1e-4, atol=1e-4)


def test_two_adapters_switch_rows():
    model = peft_fast.patch(llama(True), peft_fast.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3]))
    peft_fast.add_adapter(model, peft_fast.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[17]), "b")
    layer = model.model.embed_tokens.token_adapter
    with torch.no_grad():
        layer.trainable_tokens_delta["b"].add_(1.0)
    first = logits(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad and DELTA in n] == [
        "model.embed_tokens.token_adapter.trainable_tokens_delta.default"
    ]
    peft_fast.set_adapter(model, "b")
    assert not torch.allclose(logits(model), first)
    shift = model.model.embed_tokens.weight[17] - layer.base_layer.weight[17]
    torch.testing.assert_close(shift, torch.ones_like(shift))
    assert [n for n, p in model.named_parameters() if p.requires_grad and DELTA in n] == [
        "model.embed_tokens.token_adapter.trainable_tokens_delta.b"
    ]


BAD = [
    ({"embed_tokens": [0, VOCAB]}, ValueError, r"out of range; model\.embed_tokens has 128 rows"),
    ([VOCAB + 5], ValueError, "out of range"),
    ({"k_proj": [0]}, ValueError, r"k_proj \(Linear\), which is not an embedding layer"),
    ({"input_layernorm": [0]}, ValueError, r"not an embedding layer"),
    ({"nothing_like_it": [0]}, ValueError, r"matches no module"),
    ([], ValueError, "non-empty list"),
    ([-1], ValueError, "non-negative integer"),
    ([0.5], ValueError, "non-negative integer"),
    ([True], ValueError, "non-negative integer"),
    ({"": [1]}, TypeError, "map module names"),
    ("embed_tokens", ValueError, "non-empty list"),
]


@pytest.mark.parametrize(("indices", "error", "match"), BAD)
def test_bad_input_is_refused_and_the_model_left_alone(indices, error, match):
    model = llama(True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        peft_fast.patch(model, peft_fast.LoraConfig(target_modules=["q_proj"], trainable_token_indices=indices))
    assert not hasattr(model, "peft_fast_state")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert type(model.model.embed_tokens) is torch.nn.Embedding


def test_conflicts_with_lora_and_modules_to_save_are_refused():
    with pytest.raises(ValueError, match="LoRA target and in trainable_token_indices"):
        peft_fast.patch(
            llama(False), peft_fast.LoraConfig(target_modules=["embed_tokens"], trainable_token_indices=[1])
        )
    with pytest.raises(ValueError, match="in modules_to_save"):
        peft_fast.patch(llama(False), peft_fast.LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                           trainable_token_indices={"embed_tokens": [1]}))  # fmt: skip
    both = {"embed_tokens": [1], "lm_head": [2]}
    with pytest.raises(ValueError, match=r"other indices than model\.embed_tokens"):
        peft_fast.patch(llama(True), peft_fast.LoraConfig(target_modules=["q_proj"], trainable_token_indices=both))


def test_config_round_trips_through_adapter_config_json():
    config = peft_fast.LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": (1, 2)})
    assert config.trainable_token_indices == {"embed_tokens": [1, 2]}
    document = config.to_peft_dict()
    assert document["trainable_token_indices"] == {"embed_tokens": [1, 2]}
    assert peft_fast.LoraConfig.from_peft_dict(document) == config
