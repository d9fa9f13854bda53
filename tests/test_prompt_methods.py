"""Prompt tuning, prefix tuning, P-tuning and LLaMA-Adapter against Hugging Face PEFT 0.21.

Tiny random fp32 models (Llama with grouped-query attention, GPT-2). PEFT gets the very same
learned parameters as ours, then we compare logits, greedy generation, files both ways, training
steps, left padding, an NF4 base, and the errors for bad input.

Generation is compared with greedy argmax decoding over PEFT's *forward*: PEFT 0.21's own
``generate`` mishandles prompt methods under transformers 5.24 (it looks for the renamed
``past_key_values`` input; see peft_fast/prompt_methods/), which one test records.
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
import transformers

import peft_fast.prompt_methods as pm
from peft_fast.prompt_methods import (
    AdaptionPromptConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    load_prompt_adapter,
    patch_prompt,
    save_prompt_adapter,
    unpatch_prompt,
)

warnings.filterwarnings("ignore", message=".*[Pp]osition ids.*")
VOCAB = 128
TOL = 1e-5

METHODS = {
    "prompt": (
        lambda: PromptTuningConfig(4),
        lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    ),
    "prefix": (
        lambda: PrefixTuningConfig(4),
        lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    ),
    "prefix_mlp": (
        lambda: PrefixTuningConfig(4, prefix_projection=True, encoder_hidden_size=24),
        lambda: peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=24
        ),
    ),
    "ptuning_mlp": (
        lambda: PromptEncoderConfig(4, encoder_hidden_size=32),
        lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32),
    ),
    "ptuning_lstm": (
        lambda: PromptEncoderConfig(4, "LSTM", encoder_hidden_size=16),
        lambda: peft.PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"
        ),
    ),
    "adaption": (
        lambda: AdaptionPromptConfig(adapter_len=3, adapter_layers=1),
        lambda: peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=1),
    ),
}
CASES = [(arch, method) for arch in ("llama", "gpt2") for method in METHODS if (arch, method) != ("gpt2", "adaption")]


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
        )
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


def ours_and_peft(arch: str, method: str):
    """(base, ours, PEFT) with identical learned parameters; LLaMA-Adapter's gate made non-zero."""
    ours_config, peft_config = METHODS[method]
    base = build(arch)
    ours = patch_prompt(copy.deepcopy(base), ours_config())
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config()).eval()
    with torch.no_grad():
        if method == "adaption":
            state = {}
            for name in ours.peft_fast_prompt.attention_names:
                attention = ours.get_submodule(name)
                attention.adaption_gate.fill_(0.8)
                state[f"base_model.model.{name}.adaption_prompt"] = attention.adaption_prompt.clone()
                state[f"base_model.model.{name}.adaption_gate"] = attention.adaption_gate.clone()
            result = peft.set_peft_model_state_dict(theirs, state)
            assert not result.unexpected_keys
        else:
            theirs.prompt_encoder["default"].load_state_dict(ours.peft_fast_prompt.encoder.state_dict())
    return base, ours, theirs


def greedy(model, ids: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """Argmax decoding by full recomputation (no cache): the reference semantics of ``generate``."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


# -- parity with PEFT ----------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_logits_and_generation_match_peft(arch, method):
    base, ours, theirs = ours_and_peft(arch, method)
    ids, mask = batch()
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        want = theirs(input_ids=ids, attention_mask=mask).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    assert got.shape == want.shape
    assert close(got, want)
    assert not close(got[:, -ids.shape[1] :], plain, 1e-3), "the adapter must change the outputs"
    generated = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, greedy(theirs, ids))
    if method == "adaption":  # not a prompt-learning method in PEFT: its generate is sound
        assert torch.equal(
            generated, theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        )


def test_peft_generate_is_what_differs_for_prefix():
    """Records why generation is compared with PEFT's forward: PEFT's own generate drops the prefix."""
    base, ours, theirs = ours_and_peft("llama", "prefix")
    ids, mask = batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    peft_generated = theirs.generate(**kwargs)
    assert torch.equal(peft_generated, base.generate(**kwargs))  # the prefix is ignored by PEFT here
    assert torch.equal(ours.generate(**kwargs), greedy(theirs, ids))


def test_adaption_prompt_starts_as_the_base_model():
    base = build("llama")
    ours = patch_prompt(copy.deepcopy(base), AdaptionPromptConfig(adapter_len=5, adapter_layers=2))
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(
            ours(input_ids=ids, attention_mask=mask).logits, base(input_ids=ids, attention_mask=mask).logits
        )


def test_adaption_attention_matches_unfused_formula():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 16, dtype=torch.float64), torch.randn(1, 2, 3, 16, dtype=torch.float64), None
    v = torch.randn(1, 2, 3, 16, dtype=torch.float64)
    gate = torch.tensor([0.3], dtype=torch.float64)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    want = gate * torch.softmax(q @ kk.transpose(-1, -2) / 4.0, dim=-1) @ vv
    assert torch.allclose(pm.adaption_prompt_attention(q, k, v, gate), want, atol=1e-12)


# -- files both ways ---------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "method"), [c for c in CASES if c[0] == "llama"] + [("gpt2", "prefix_mlp")])
def test_round_trips_with_peft(arch, method, tmp_path):
    base, ours, theirs = ours_and_peft(arch, method)
    ids, mask = batch()
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits
    # ours -> PEFT
    save_prompt_adapter(ours, tmp_path / "ours")
    theirs_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        assert close(loaded(input_ids=ids, attention_mask=mask).logits, want)
    # PEFT -> ours
    theirs.save_pretrained(tmp_path / "peft")
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(theirs_config) == set(peft_config)
    assert {k: theirs_config[k] for k in peft_config if k != "base_model_name_or_path"} == {
        k: peft_config[k] for k in peft_config if k != "base_model_name_or_path"
    }
    mine = load_prompt_adapter(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        assert close(mine(input_ids=ids, attention_mask=mask).logits, want)
    assert not any(p.requires_grad for p in mine.parameters())
    # unpatch gives the base model back
    unpatch_prompt(mine)
    with torch.no_grad():
        assert torch.equal(
            mine(input_ids=ids, attention_mask=mask).logits, base(input_ids=ids, attention_mask=mask).logits
        )


def test_load_refuses_a_mismatched_adapter(tmp_path):
    ours = patch_prompt(build("llama"), PrefixTuningConfig(4))
    save_prompt_adapter(ours, tmp_path)
    with pytest.raises(ValueError, match="does not fit"):
        load_prompt_adapter(build("gpt2"), tmp_path)


# -- training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_lowers_loss_and_touches_only_the_method(method, checkpointing):
    base = build("llama")
    model = patch_prompt(copy.deepcopy(base), METHODS[method][0]())
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("adaption" in n or n.startswith("peft_fast_prompt.") for n in trainable)
    ids, mask = batch()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], before) for n, before in trainable.items())
    for name, param in base.named_parameters():
        assert torch.equal(after[name], param), f"base parameter {name} changed"


def test_hf_trainer_runs_prompt_tuning(tmp_path):
    from torch.utils.data import Dataset

    class Rows(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            ids = torch.randint(3, VOCAB, (6,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    model = patch_prompt(build("llama"), PromptTuningConfig(4))
    before = model.peft_fast_prompt.encoder.embedding.weight.detach().clone()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    transformers.Trainer(model=model, args=args, train_dataset=Rows()).train()
    assert not torch.equal(model.peft_fast_prompt.encoder.embedding.weight, before)


# -- padding, NF4, errors ----------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "method"), [("llama", m) for m in METHODS] + [("gpt2", "prompt"), ("gpt2", "prefix")])
def test_left_padding_matches_each_sequence_alone(arch, method):
    _, model, _ = ours_and_peft(arch, method)
    long_ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    short_ids = torch.randint(3, VOCAB, (1, 3), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([long_ids, torch.cat([torch.zeros(1, 3, dtype=torch.long), short_ids], dim=1)])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        together = model(input_ids=padded, attention_mask=mask).logits
        for row, ids in enumerate((long_ids, short_ids)):
            alone = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            assert close(together[row, -ids.shape[1] :], alone[0, -ids.shape[1] :], 1e-4)
    generated = model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=3, do_sample=False)
    for row, ids in enumerate((long_ids, short_ids)):
        alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        assert torch.equal(generated[row, -3:], alone[0, -3:])


@pytest.mark.parametrize("method", ["prompt", "prefix", "adaption"])
def test_nf4_base(method):
    import peft_fast
    from peft_fast.layers import NF4Linear

    model = peft_fast.quantize_model(build("llama"), progress=False)
    assert any(isinstance(m, NF4Linear) for m in model.modules())
    model = patch_prompt(model, METHODS[method][0]())
    if method == "adaption":
        with torch.no_grad():
            model.model.layers[-1].self_attn.adaption_gate.fill_(0.5)
    ids, mask = batch()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    assert torch.equal(
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False), greedy(model, ids, 3)
    )


class _Tokenizer:
    """Stands in for a tokenizer: one id per character (no network, no files)."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": [3 + ord(c) % (VOCAB - 3) for c in text]}


def test_text_init_uses_the_token_embeddings():
    model = build("llama")
    patch_prompt(model, PromptTuningConfig(5, init="text", init_text="ab", tokenizer=_Tokenizer()))
    ids = _Tokenizer()("ababa")["input_ids"]
    want = model.get_input_embeddings().weight[ids]
    assert torch.equal(model.peft_fast_prompt.encoder.embedding.weight, want)


def test_bad_input_gives_clear_errors():
    for bad in (0, -2):
        with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
            PromptTuningConfig(bad)
        with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
            PrefixTuningConfig(bad)
        with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
            PromptEncoderConfig(bad)
    with pytest.raises(ValueError, match="adapter_len"):
        AdaptionPromptConfig(adapter_len=0)
    with pytest.raises(ValueError, match="longer than num_virtual_tokens"):
        patch_prompt(build("llama"), PromptTuningConfig(2, init="text", init_text="abc", tokenizer=_Tokenizer()))
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(
            hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB
        )
    )
    with pytest.raises(ValueError, match="no supported cache"):
        patch_prompt(bert, PrefixTuningConfig(4))
    with pytest.raises(ValueError, match="Llama-family"):
        patch_prompt(build("gpt2"), AdaptionPromptConfig())
    with pytest.raises(ValueError, match="adapter_layers=3"):
        patch_prompt(build("llama"), AdaptionPromptConfig(adapter_layers=3))
    model = patch_prompt(build("llama"), PromptTuningConfig(2))
    with pytest.raises(ValueError, match="already has a prompt adapter"):
        patch_prompt(model, PrefixTuningConfig(2))


@pytest.mark.parametrize("method", ["prompt", "prefix", "adaption"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    _, model, _ = ours_and_peft("llama", method)
    ids, mask = batch()
    model.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0
        assert close(grads[1][name], grad), name
