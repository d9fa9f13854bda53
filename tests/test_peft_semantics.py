"""Where peft_fast used to differ from PEFT 0.21 on the same config, checked against PEFT itself.

- modules_to_save trains a copy: with adapters disabled the model uses the original module;
  no LoRA layer goes inside a saved module (RoBERTa's classifier.dense / out_proj with
  "all-linear"); the adapter file is PEFT's, both ways.
- task_type SEQ_CLS makes the classifier head trainable and saved, as PEFT's
  PeftModelForSequenceClassification does; PEFT's file loads here and ours there.
- layers_to_transform uses PEFT's layer-index rule: T5's ``block.N`` (not its inner ``layer.N``),
  and a ``layers_pattern`` at the very start of a name (a bare LlamaModel's ``layers.N``).
- add_adapter may target layers the first adapter does not wrap (PEFT's "LoRA Different").
- load_adapter into an existing adapter name loads the weights into it.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from tiny_models import VOCAB

import peft_fast
from peft_fast.lora import lora_layers


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))


def _roberta_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.RobertaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=40,
                                        num_labels=3, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0)  # fmt: skip
    return transformers.RobertaForSequenceClassification(config).eval()


def _bert_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=VOCAB, max_position_embeddings=40, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return transformers.BertForSequenceClassification(config).eval()


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_lora_names(peft_model: torch.nn.Module) -> list[str]:
    return sorted(
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    )


def _train(model: torch.nn.Module, ids: torch.Tensor, steps: int = 3) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=torch.tensor([0, 2])).loss.backward()
        optimizer.step()
    model.eval()


# -- modules_to_save -----------------------------------------------------------------------------


def test_modules_to_save_is_a_copy_and_holds_no_lora_layer(tmp_path):
    base = _roberta_classifier()
    ids = _ids()
    before = _logits(base, ids)
    settings = dict(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["classifier"])
    ours = peft_fast.patch(copy.deepcopy(base), peft_fast.LoraConfig(**settings))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**settings))
    # The same targets as PEFT: the classifier's dense / out_proj are saved, not adapted.
    assert sorted(n for n, _ in lora_layers(ours)) == _peft_lora_names(theirs)
    assert not any(n.startswith("classifier.") for n, _ in lora_layers(ours))
    assert all(p.requires_grad for p in ours.classifier.parameters())

    _train(ours, ids)
    trained = _logits(ours, ids)
    assert not torch.allclose(trained, before, atol=1e-4)
    with peft_fast.disable_adapters(ours):
        # The original classifier, not the trained one (the trained one changed the output above).
        torch.testing.assert_close(_logits(ours, ids), before, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_logits(ours, ids), trained, rtol=0, atol=0)

    # Our file is PEFT's: PEFT loads it and computes the same; and it loads back here.
    peft_fast.save_adapter(ours, tmp_path / "a")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(_logits(loaded, ids), trained, rtol=1e-5, atol=1e-5)
    with loaded.disable_adapter():
        torch.testing.assert_close(_logits(loaded, ids), before, rtol=1e-6, atol=1e-6)
    again = peft_fast.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(_logits(again, ids), trained, rtol=1e-5, atol=1e-5)


def test_peft_modules_to_save_file_loads_here(tmp_path):
    base = _roberta_classifier()
    ids = _ids()
    settings = dict(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["classifier"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**settings, init_lora_weights=False))
    with torch.no_grad():
        for param in theirs.base_model.model.classifier.modules_to_save["default"].parameters():
            param.add_(0.1)
    expected = _logits(theirs, ids)
    theirs.save_pretrained(tmp_path / "peft")
    ours = peft_fast.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours, ids), expected, rtol=1e-5, atol=1e-5)


# -- task_type ------------------------------------------------------------------------------------


def test_seq_cls_task_type_trains_and_saves_the_head_as_peft(tmp_path):
    base = _bert_classifier()
    ids = _ids()
    settings = dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    ours = peft_fast.patch(copy.deepcopy(base), peft_fast.LoraConfig(**settings))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**settings))
    ours_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= ours_trainable
    peft_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == peft_trainable

    _train(ours, ids)
    trained = _logits(ours, ids)
    peft_fast.save_adapter(ours, tmp_path / "ours")
    # PEFT loads our file (it raised KeyError: base_model.model.classifier.weight when the head was missing).
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(_logits(loaded, ids), trained, rtol=1e-5, atol=1e-5)

    # And PEFT's file for the same config loads here, head included.
    _train(theirs, ids)
    theirs.save_pretrained(tmp_path / "peft")
    mine = peft_fast.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(_logits(mine, ids), _logits(theirs, ids), rtol=1e-5, atol=1e-5)


# -- layers_to_transform / layers_pattern -----------------------------------------------------------


def _t5(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_decoder_layers=layers,
                                   num_heads=4, vocab_size=VOCAB, dropout_rate=0.0)  # fmt: skip
    return transformers.T5ForConditionalGeneration(config).eval()


def _bare_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB)  # fmt: skip
    return transformers.LlamaModel(config).eval()


@pytest.mark.parametrize(
    ("build", "settings"),
    [
        (_t5, dict(target_modules=["q", "wi"], layers_to_transform=[1])),
        (_t5, dict(target_modules=["q", "v"], layers_to_transform=[0], layers_pattern="block")),
        (
            _bare_llama,
            dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2], layers_pattern="layers"),
        ),
        (_bare_llama, dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern=["layers"])),
    ],
    ids=["t5-block-index", "t5-block-pattern", "bare-llama-pattern", "bare-llama-pattern-list"],
)
def test_layer_index_rule_is_peft(build, settings):
    base = build()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, **settings))
    ours = peft_fast.patch(copy.deepcopy(base), peft_fast.LoraConfig(r=2, lora_alpha=4, **settings))
    expected = _peft_lora_names(theirs)
    assert expected, "PEFT adapted nothing: the case does not test the rule"
    assert sorted(n for n, _ in lora_layers(ours)) == expected


# -- add_adapter on new layers, load into an existing name -------------------------------------------


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB)  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def test_add_adapter_on_layers_the_first_does_not_wrap_matches_peft(tmp_path):
    base = _llama()
    ids = _ids()
    first = dict(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    second = dict(r=4, lora_alpha=4, target_modules=["k_proj", "down_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**first))
    theirs.add_adapter("other", peft.LoraConfig(**second))
    theirs.save_pretrained(tmp_path)  # default at the top, "other" in other/

    ours = peft_fast.load_adapter(copy.deepcopy(base), tmp_path)
    peft_fast.load_adapter(ours, tmp_path / "other", "other")  # on new layers (peft_fast activates a loaded adapter)
    assert sorted(n for n, _ in lora_layers(ours)) == _peft_lora_names(theirs)

    for active in ("other", "default"):
        theirs.set_adapter(active)
        peft_fast.set_adapter(ours, active)
        torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=1e-5, atol=1e-5)
    # add_adapter itself (not via a file) wraps the new layers, and the new adapter starts inactive.
    again = peft_fast.patch(copy.deepcopy(base), peft_fast.LoraConfig(**first))
    before = _logits(again, ids)
    peft_fast.add_adapter(again, peft_fast.LoraConfig(**second), "other")
    assert sorted(n for n, _ in lora_layers(again)) == _peft_lora_names(theirs)
    torch.testing.assert_close(_logits(again, ids), before, rtol=0, atol=0)


def test_load_adapter_into_an_existing_name_loads_the_weights(tmp_path):
    base = _llama()
    ids = _ids()
    settings = peft_fast.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    saved = peft_fast.patch(copy.deepcopy(base), settings)
    peft_fast.save_adapter(saved, tmp_path)
    expected = _logits(saved, ids)

    model = peft_fast.patch(copy.deepcopy(base), settings)  # other random weights, same shapes
    assert not torch.allclose(_logits(model, ids), expected)
    peft_fast.load_adapter(model, tmp_path, "default", is_trainable=True)
    torch.testing.assert_close(_logits(model, ids), expected, rtol=0, atol=0)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)
    # A file of another rank for that name is refused, naming the difference.
    other = peft_fast.patch(copy.deepcopy(base), settings.replace(r=4))
    peft_fast.save_adapter(other, tmp_path / "r4")
    with pytest.raises(ValueError, match=r"does not match adapter 'default': r: file 4, model 2"):
        peft_fast.load_adapter(model, tmp_path / "r4", "default")


# -- LoRA on nn.Embedding -----------------------------------------------------------------------------


def test_lora_on_an_embedding_is_peft_both_ways(tmp_path):
    base = _llama()
    ids = _ids()
    settings = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**settings))
    expected = _logits(theirs, ids)
    theirs.save_pretrained(tmp_path / "peft")  # with the base embedding, as PEFT's save_embedding_layers="auto"

    ours = peft_fast.load_adapter(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    assert type(ours.model.embed_tokens).__name__ == "LoraEmbedding"
    torch.testing.assert_close(_logits(ours, ids), expected, rtol=1e-6, atol=1e-6)
    with peft_fast.disable_adapters(ours):
        torch.testing.assert_close(_logits(ours, ids), _logits(base, ids), rtol=0, atol=0)
    merged = peft_fast.merge(copy.deepcopy(ours))
    assert type(merged.model.embed_tokens) is torch.nn.Embedding
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-5, atol=1e-5)

    # Gradients reach the embedding's A and B; PEFT loads what we save.
    ours.train()
    ours(input_ids=ids, labels=ids).loss.backward()
    layer = ours.model.embed_tokens
    assert layer.lora_embedding_A["default"].grad.abs().sum() > 0 and layer.lora_embedding_B["default"].grad is not None
    peft_fast.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(_logits(back, ids), expected, rtol=1e-6, atol=1e-6)
