"""HF ``Trainer`` with every non-LoRA method: checkpoints hold the method's adapter files only, and resume.

(IA)³ (with ``modules_to_save``), bottleneck adapters (dropout on, so the RNG must be restored too),
prompt tuning, prefix tuning with its projection, P-tuning and LLaMA-Adapter on the tiny Llama of
``tiny_models``, fp32, the torch backend. Checked: what a checkpoint holds (the method's two files, no
base weights; the prompt encoder's training tensors where PEFT's file keeps only its output), that
resuming from the middle gives the same losses and final adapter as one uninterrupted run, that
``load_best_model_at_end`` loads the best checkpoint's adapter, that PEFT loads what ``save_model``
wrote, and that a model carrying two methods is left to transformers (saved whole).
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from tiny_models import VOCAB, build

import peft_fast
from peft_fast.hf_integration import TRAINING_TENSORS, hooked_method

FULL_WEIGHT_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}
BOTTLENECK_FILES = {"adapter_config.json", "adapter.safetensors"}

CONFIGS = {
    "ia3": lambda: peft_fast.IA3Config(init_ia3_weights=False),
    "ia3-modules_to_save": lambda: peft_fast.IA3Config(init_ia3_weights=False, modules_to_save=["lm_head"]),
    "adapter": lambda: peft_fast.AdapterConfig(placement="houlsby", bottleneck_size=8, dropout=0.1),
    "prompt-tuning": lambda: peft_fast.PromptTuningConfig(num_virtual_tokens=4),
    "prefix-tuning": lambda: peft_fast.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True),
    "p-tuning": lambda: peft_fast.PromptEncoderConfig(num_virtual_tokens=4),
    "llama-adapter": lambda: peft_fast.AdaptionPromptConfig(adapter_len=4, adapter_layers=1),
}
METHODS = list(CONFIGS)
# The prompt encoders whose PEFT file holds their output only: their training tensors go beside it.
REPARAMETERISED = {"prefix-tuning", "p-tuning"}


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


def patched(method: str, init_seed: int = 0, adapter_name: str = "default"):
    """The tiny Llama (always the same base) with ``method``; ``init_seed`` draws the adapter's initial values."""
    model = build("llama")
    torch.manual_seed(init_seed)
    return peft_fast.patch(model, CONFIGS[method](), adapter_name)


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
    losses: list[float] = []
    model.register_forward_hook(lambda module, args, out: losses.append(out.loss.item()) if module.training else None)
    return losses


def trained(model) -> dict[str, torch.Tensor]:
    """Every trainable parameter of the model (the method's, encoders included), cloned."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys() and actual
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)


def adapter_files(method: str) -> set[str]:
    return BOTTLENECK_FILES if method == "adapter" else PEFT_FILES


@pytest.mark.parametrize("method", METHODS)
def test_checkpoints_hold_the_methods_adapter_files_only(method, tmp_path):
    full_size = sum(t.numel() * t.element_size() for t in build("llama").state_dict().values())
    model = patched(method)
    transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=2, save_steps=2),
                         train_dataset=rows()).train()  # fmt: skip
    directory = tmp_path / "checkpoint-2"
    files = {p.name for p in directory.iterdir()}
    assert adapter_files(method) <= files, files
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files, files
    assert not files & FULL_WEIGHT_FILES, files
    assert (TRAINING_TENSORS in files) == (method in REPARAMETERISED), files
    weights = directory / ("adapter.safetensors" if method == "adapter" else "adapter_model.safetensors")
    # (The tiny model's base is small beside its head and the bottleneck adapters: loose bounds.)
    assert weights.stat().st_size < full_size / {"ia3-modules_to_save": 3, "adapter": 10}.get(method, 20)
    saved = load_file(weights)
    own = hooked_method(model).state_dict(model, "default")
    assert saved.keys() == own.keys()
    for key in own:  # the checkpoint holds the trained values of step 2
        assert torch.equal(saved[key], own[key]), key


@pytest.mark.parametrize("method", METHODS)
def test_resume_gives_the_uninterrupted_run(method, tmp_path):
    full = patched(method)
    full_losses = record_losses(full)
    transformers.Trainer(model=full, args=training_args(tmp_path / "full"), train_dataset=rows()).train()
    assert len(full_losses) == 6

    resumed = patched(method, init_seed=123)  # other initial values: the checkpoint must replace them
    start = trained(resumed)
    assert any(not torch.equal(start[k], v) for k, v in trained(patched(method)).items())
    resumed_losses = record_losses(resumed)
    trainer = transformers.Trainer(model=resumed, args=training_args(tmp_path / "resumed"), train_dataset=rows())
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    torch.testing.assert_close(resumed_losses, full_losses[3:], rtol=0, atol=1e-6)
    assert_same(trained(resumed), trained(full))


@pytest.mark.parametrize("method", ["ia3-modules_to_save", "adapter", "p-tuning"])
def test_load_best_model_at_end(method, tmp_path):
    scores = iter([0.1, 0.9, 0.5])  # evaluations at steps 2, 4, 6: the best is step 4, not the last
    model = patched(method)
    snapshots = {}

    class Snapshot(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            snapshots[state.global_step] = trained(model)

    args = training_args(
        tmp_path, eval_strategy="steps", eval_steps=2, save_steps=2, load_best_model_at_end=True,
        metric_for_best_model="score", greater_is_better=True, per_device_eval_batch_size=4,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=rows(), eval_dataset=rows(4, seed=2),
        compute_metrics=lambda prediction: {"score": next(scores)}, callbacks=[Snapshot()],
    )  # fmt: skip
    trainer.train()
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-4"
    assert any(not torch.equal(snapshots[4][k], v) for k, v in snapshots[6].items())
    assert_same(trained(model), snapshots[4])


def test_ia3_save_model_loads_in_peft_with_its_head(tmp_path):
    model = patched("ia3-modules_to_save")
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path / "run", max_steps=3, save_strategy="no"),
                                   train_dataset=rows())  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    saved = {p.name for p in (tmp_path / "saved").iterdir()}
    assert PEFT_FILES <= saved and not saved & FULL_WEIGHT_FILES, saved
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "saved" / "adapter_model.safetensors")
    theirs = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "saved").eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual, base = model.eval()(ids).logits, theirs(ids).logits, build("llama")(ids).logits
    assert (expected - base).abs().max() > 1e-3  # training moved the adapter and the head
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_p_tuning_resume_needs_its_training_tensors(tmp_path):
    full = patched("p-tuning")
    transformers.Trainer(model=full, args=training_args(tmp_path / "full", max_steps=2, save_steps=2),
                         train_dataset=rows()).train()  # fmt: skip
    checkpoint = tmp_path / "full" / "checkpoint-2"
    # PEFT loads the checkpoint's adapter (the encoder's output) and computes what we compute.
    theirs = peft.PeftModel.from_pretrained(build("llama"), checkpoint).eval()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, full.eval()(ids).logits, rtol=1e-5, atol=1e-5)

    (checkpoint / TRAINING_TENSORS).unlink()
    trainer = transformers.Trainer(model=patched("p-tuning", 5), args=training_args(tmp_path / "b", max_steps=3),
                                   train_dataset=rows())  # fmt: skip
    with pytest.raises(ValueError, match=f"lacks {TRAINING_TENSORS}"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_several_ia3_adapters_save_in_peft_layout_and_resume(tmp_path):
    def two_adapters(seed: int):
        model = patched("ia3", seed)
        torch.manual_seed(seed + 1)
        second = peft_fast.IA3Config(target_modules=["q_proj"], feedforward_modules=[], init_ia3_weights=False)
        peft_fast.add_adapter(model, second, "other")
        peft_fast.set_adapter(model, ["default", "other"])  # both train
        return model

    full = two_adapters(0)
    transformers.Trainer(model=full, args=training_args(tmp_path / "full", max_steps=4, save_steps=2),
                         train_dataset=rows()).train()  # fmt: skip
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert PEFT_FILES <= {p.name for p in checkpoint.iterdir()}
    assert {p.name for p in (checkpoint / "other").iterdir()} == PEFT_FILES  # PEFT's <dir>/<name>/

    resumed = two_adapters(7)
    transformers.Trainer(model=resumed, args=training_args(tmp_path / "resumed", max_steps=4, save_steps=2),
                         train_dataset=rows()).train(resume_from_checkpoint=str(checkpoint))  # fmt: skip
    assert_same(trained(resumed), trained(full))

    final = tmp_path / "full" / "checkpoint-4"
    theirs = peft.PeftModel.from_pretrained(build("llama"), final)
    theirs.load_adapter(final / "other", adapter_name="other")
    theirs.base_model.set_adapter(["default", "other"])
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(ids).logits, full.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_model_with_two_methods_is_saved_whole(tmp_path):
    model = peft_fast.patch(build("llama"), peft_fast.LoraConfig(r=2, target_modules=["q_proj"]))
    assert "save_pretrained" in model.__dict__
    peft_fast.patch(model, peft_fast.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    assert hooked_method(model) is None and "save_pretrained" not in model.__dict__
    copy.deepcopy(model).save_pretrained(tmp_path)
    assert "model.safetensors" in {p.name for p in tmp_path.iterdir()}
