"""Hugging Face ``Trainer`` with a patched model: checkpoints and ``save_model`` hold the PEFT adapter.

Tiny Llama (hidden 64, vocab 1024), fp32, the torch backend. Checked: checkpoint contents and
sizes (adapter files beside optimizer / scheduler / RNG state, never the base weights), resuming
bit-for-bit (the same losses and final adapter as an uninterrupted run, with LoRA dropout on),
``load_best_model_at_end``, ``save_model`` output loaded by ``peft.PeftModel.from_pretrained``
(on a dense base, and on a bitsandbytes 4-bit base for QLoRA) with the same logits, and the model
hooks ``patch`` installs and ``unpatch`` / ``merge`` remove.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import peft_fast
from peft_fast.lora import adapter_state_dict, lora_layers

VOCAB = 1024
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
FULL_WEIGHT_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
QUANTIZE = [pytest.param(None, id="lora"), pytest.param("nf4", id="qlora")]


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def patched(quantize=None, init_seed: int = 0, adapter_name: str = "default", **overrides):
    """A fresh tiny Llama (always the same base) patched with LoRA; ``init_seed`` draws the LoRA A init."""
    model = tiny_llama()
    torch.manual_seed(init_seed)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "quantize": quantize}
    return peft_fast.patch(model, peft_fast.LoraConfig(**{**settings, **overrides}), adapter_name)


def rows(count: int = 16, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (count, 10), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row} for row in ids]


def training_args(output_dir: Path, **overrides) -> transformers.TrainingArguments:
    settings = dict(
        output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
        save_steps=3, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    return transformers.TrainingArguments(**{**settings, **overrides})


def record_losses(model) -> list[float]:
    """Every training forward's loss, exactly (a forward hook; eval forwards are left out)."""
    losses: list[float] = []
    model.register_forward_hook(lambda module, args, out: losses.append(out.loss.item()) if module.training else None)
    return losses


def adapter_of(model, name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter_state_dict(model, name).items()}


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def assert_adapters_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_checkpoints_hold_the_adapter_and_training_state_only(quantize, tmp_path):
    full_size = model_bytes(tiny_llama())
    model = patched(quantize)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=4, save_steps=2),
                                   train_dataset=rows())  # fmt: skip
    trainer.train()
    checkpoints = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    for name in checkpoints:
        directory = tmp_path / name
        files = {p.name for p in directory.iterdir()}
        assert ADAPTER_FILES <= files, files
        assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files, files
        assert not files & FULL_WEIGHT_FILES, files
        assert all(p.is_file() for p in directory.iterdir())  # no adapter subdirectories: one adapter
        tensors = load_file(directory / "adapter_model.safetensors")
        assert tensors and all(".lora_A." in key or ".lora_B." in key for key in tensors), sorted(tensors)[:4]
        adapter_size = (directory / "adapter_model.safetensors").stat().st_size
        total_size = sum(p.stat().st_size for p in directory.iterdir())
        assert adapter_size < full_size / 40, (adapter_size, full_size)
        assert total_size < full_size / 8, (total_size, full_size)
    final = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    assert_adapters_equal(final, adapter_of(model))


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_resume_from_checkpoint_is_bit_exact(quantize, tmp_path):
    dropout = {"lora_dropout": 0.1}  # resuming must restore the RNG too
    full = patched(quantize, **dropout)
    full_losses = record_losses(full)
    transformers.Trainer(model=full, args=training_args(tmp_path / "full"), train_dataset=rows()).train()
    assert len(full_losses) == 6

    resumed = patched(quantize, init_seed=123, **dropout)  # a different LoRA init: the checkpoint must replace it
    assert not torch.equal(next(iter(adapter_of(resumed).values())), next(iter(adapter_of(full).values())))
    resumed_losses = record_losses(resumed)
    trainer = transformers.Trainer(model=resumed, args=training_args(tmp_path / "resumed"), train_dataset=rows())
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed_losses == full_losses[3:]  # exact float equality
    assert trainer.state.global_step == 6
    assert_adapters_equal(adapter_of(resumed), adapter_of(full))
    assert_adapters_equal(
        load_file(tmp_path / "resumed" / "checkpoint-6" / "adapter_model.safetensors"),
        load_file(tmp_path / "full" / "checkpoint-6" / "adapter_model.safetensors"),
    )


def test_resume_with_a_named_adapter_and_resume_true(tmp_path):
    """A non-default adapter is saved in ``<checkpoint>/<name>/`` (PEFT's layout) and resumes from there."""
    full = patched(adapter_name="mine")
    transformers.Trainer(model=full, args=training_args(tmp_path / "full", max_steps=2, save_steps=1),
                         train_dataset=rows()).train()  # fmt: skip
    checkpoint = tmp_path / "full" / "checkpoint-1"
    assert ADAPTER_FILES <= {p.name for p in (checkpoint / "mine").iterdir()}
    assert not ADAPTER_FILES & {p.name for p in checkpoint.iterdir()}

    resumed = patched(adapter_name="mine", init_seed=5)
    output = tmp_path / "resumed"
    output.mkdir()
    os.symlink(checkpoint, output / "checkpoint-1")  # resume_from_checkpoint=True finds the last one
    transformers.Trainer(model=resumed, args=training_args(output, max_steps=2, save_steps=1),
                         train_dataset=rows()).train(resume_from_checkpoint=True)  # fmt: skip
    assert_adapters_equal(adapter_of(resumed, "mine"), adapter_of(full, "mine"))


def test_resume_refuses_a_checkpoint_of_other_adapters(tmp_path):
    full = patched()
    transformers.Trainer(model=full, args=training_args(tmp_path / "a", max_steps=1, save_steps=1),
                         train_dataset=rows()).train()  # fmt: skip
    other = patched(adapter_name="mine")
    trainer = transformers.Trainer(model=other, args=training_args(tmp_path / "b", max_steps=2), train_dataset=rows())
    with pytest.raises(ValueError, match=r"holds adapter\(s\) \['default'\] but the model has \['mine'\]"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    mismatched = patched(r=8)
    trainer = transformers.Trainer(model=mismatched, args=training_args(tmp_path / "c", max_steps=2),
                                   train_dataset=rows())  # fmt: skip
    with pytest.raises(ValueError, match="r: file 4, model 8"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    scores = iter([0.1, 0.9, 0.5])  # evaluations at steps 2, 4, 6: the best is step 4, not the last
    model = patched("nf4")
    args = training_args(
        tmp_path, eval_strategy="steps", eval_steps=2, save_steps=2, load_best_model_at_end=True,
        metric_for_best_model="score", greater_is_better=True, per_device_eval_batch_size=4,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=rows(), eval_dataset=rows(4, seed=2),
        compute_metrics=lambda prediction: {"score": next(scores)},
    )  # fmt: skip
    trainer.train()
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-4"
    best = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    last = load_file(tmp_path / "checkpoint-6" / "adapter_model.safetensors")
    assert not all(torch.equal(best[k], last[k]) for k in best)
    assert_adapters_equal(adapter_of(model), best)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)


def _train_and_save(quantize, tmp_path: Path):
    model = patched(quantize)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path / "run", max_steps=3, save_strategy="no"),
                                   train_dataset=rows())  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    files = {p.name for p in (tmp_path / "saved").iterdir()}
    assert ADAPTER_FILES <= files and not files & FULL_WEIGHT_FILES, files
    assert not {p.name for p in (tmp_path / "run").iterdir()}  # save_strategy="no": no checkpoints
    return model


def test_save_model_loads_with_peft_and_gives_the_same_logits(tmp_path):
    model = _train_and_save(None, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = model.eval()(ids).logits, theirs.eval()(ids).logits
        base = tiny_llama()(ids).logits
    assert (expected - base).abs().max() > 1e-3  # training moved the adapter
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_save_model_qlora_loads_with_peft_on_a_bitsandbytes_base(tmp_path):
    model = _train_and_save("nf4", tmp_path)
    tiny_llama().save_pretrained(tmp_path / "base")
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    base = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=bnb_config, device_map="cpu", dtype=torch.float32
    )
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "saved")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    # Train mode (no dropout here): bitsandbytes' CPU Linear4bit computes in bf16 in eval mode.
    with torch.no_grad():
        expected, actual = model.train()(ids).logits, theirs.train()(ids).logits
        with peft_fast.disable_adapters(model):
            base_logits = model(ids).logits
    assert (expected - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_save_pretrained_writes_the_adapters_and_unpatch_merge_restore_it(tmp_path):
    model = patched("nf4")
    model.save_pretrained(tmp_path / "one")
    assert {p.name for p in (tmp_path / "one").iterdir()} == ADAPTER_FILES
    peft_fast.add_adapter(model, peft_fast.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], quantize="nf4"),
                          "second")  # fmt: skip
    model.save_pretrained(tmp_path / "two")
    assert {p.name for p in (tmp_path / "two").iterdir()} == ADAPTER_FILES | {"second"}
    assert {p.name for p in (tmp_path / "two" / "second").iterdir()} == ADAPTER_FILES
    model.save_pretrained(tmp_path / "sel", selected_adapters=["second"])
    assert {p.name for p in (tmp_path / "sel").iterdir()} == {"second"}
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(ValueError, match="unknown adapter"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])
    # Under DeepSpeed / FSDP Trainer passes the gathered state dict: its values are what is saved.
    gathered = {name: torch.full_like(t, 0.25) for name, t in model.state_dict().items()}
    model.save_pretrained(tmp_path / "gathered", state_dict=gathered, selected_adapters=["default"])
    written = load_file(tmp_path / "gathered" / "adapter_model.safetensors")
    assert written.keys() == adapter_of(model).keys() and all(bool((t == 0.25).all()) for t in written.values())

    hooks = ("save_pretrained", "load_adapter", "set_adapter", "active_adapters")
    assert all(name in model.__dict__ for name in hooks)
    peft_fast.unpatch(model)
    assert not any(name in model.__dict__ for name in hooks)
    model.save_pretrained(tmp_path / "plain")  # transformers' own save again
    assert "model.safetensors" in {p.name for p in (tmp_path / "plain").iterdir()}

    merged = peft_fast.merge(patched("nf4"))
    assert not any(name in merged.__dict__ for name in hooks)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, merged(ids).logits)


def test_hooks_follow_copies_and_pickles(tmp_path):
    model = patched()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.save_pretrained.__self__ is clone
        layer = next(layer for _, layer in lora_layers(clone))
        with torch.no_grad():
            layer.lora_B["default"].weight.fill_(0.5)  # the clone's own weights are what it saves
        clone.save_pretrained(tmp_path / "clone")
        assert_adapters_equal(load_file(tmp_path / "clone" / "adapter_model.safetensors"), adapter_of(clone))
        original = next(layer for _, layer in lora_layers(model))
        assert not torch.equal(layer.lora_B["default"].weight, original.lora_B["default"].weight)


def test_model_load_adapter_set_adapter_and_active_adapters(tmp_path):
    source = patched(init_seed=7, init_lora_weights=False)
    source.save_pretrained(tmp_path / "a")
    model = patched()
    assert model.active_adapters() == ["default"]
    model.load_adapter(str(tmp_path / "a"))  # the existing adapter, in place
    assert_adapters_equal(adapter_of(model), adapter_of(source))
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)

    model.load_adapter(tmp_path / "a", "other")  # a new adapter: added inactive and frozen, as PEFT does
    assert model.active_adapters() == ["default"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    model.set_adapter("other")
    assert model.active_adapters() == ["other"]
    assert all(p.requires_grad for n, p in model.named_parameters() if ".other." in n)

    with pytest.raises(ValueError, match="lora_alpha: file 8, model 16"):
        patched(lora_alpha=16).load_adapter(tmp_path / "a")
    with pytest.raises(TypeError, match="unsupported: \\['token'\\]"):
        model.load_adapter(tmp_path / "a", token="hf_x")


def test_plain_models_keep_transformers_checkpoints(tmp_path):
    peft_fast.hf_integration.install_trainer_hooks()
    plain = tiny_llama()
    transformers.Trainer(model=plain, args=training_args(tmp_path, max_steps=2, save_steps=1),
                         train_dataset=rows()).train()  # fmt: skip
    assert "model.safetensors" in {p.name for p in (tmp_path / "checkpoint-1").iterdir()}
    resumed = tiny_llama()
    transformers.Trainer(model=resumed, args=training_args(tmp_path, max_steps=2, save_steps=1),
                         train_dataset=rows()).train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))  # fmt: skip
    for (name, a), b in zip(plain.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_patch_does_not_import_trainer_and_hooks_it_on_import():
    """``patch`` before ``import transformers.trainer``: the Trainer hooks arrive with the import."""
    code = (
        "import sys, torch, transformers, peft_fast\n"
        "m = transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=32, intermediate_size=64,"
        " num_hidden_layers=1, num_attention_heads=2, vocab_size=64))\n"
        "peft_fast.patch(m, peft_fast.LoraConfig(r=2, target_modules=['q_proj']))\n"
        "assert 'transformers.trainer' not in sys.modules\n"
        "from transformers import Trainer\n"
        "assert hasattr(Trainer._load_from_checkpoint, '__peft_fast_original__')\n"
        "assert hasattr(Trainer._load_best_model, '__peft_fast_original__')\n"
        "import transformers.trainer as t; assert t.__loader__.__class__.__name__ == 'SourceFileLoader'\n"
        "assert not any(type(f).__name__ == '_TrainerImportHook' for f in sys.meta_path)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_classifier_head_in_modules_to_save_is_trained_saved_and_loaded_by_peft(tmp_path):
    """README's classifier note: a new head goes in modules_to_save; save_model then carries it."""

    def bert_classifier():
        torch.manual_seed(0)
        config = transformers.BertConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
            max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return transformers.BertForSequenceClassification(config)

    model = bert_classifier()
    head = model.classifier.weight.detach().clone()
    lora = peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["classifier"])
    peft_fast.patch(model, lora)
    labels = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(4))
    data = [{"input_ids": row["input_ids"], "labels": label} for row, label in zip(rows(), labels, strict=True)]
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path / "run", max_steps=3, save_strategy="no"),
                                   train_dataset=data)  # fmt: skip
    trainer.train()
    assert not torch.equal(model.classifier.weight, head)  # the head trained
    trainer.save_model(str(tmp_path / "saved"))
    assert "base_model.model.classifier.weight" in load_file(tmp_path / "saved" / "adapter_model.safetensors")
    theirs = peft.PeftModel.from_pretrained(bert_classifier(), tmp_path / "saved")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = model.eval()(ids).logits, theirs.eval()(ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
