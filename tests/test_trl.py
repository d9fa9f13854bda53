"""TRL's ``SFTTrainer`` with its default ``SFTConfig`` on LoRA and QLoRA patched models.

The defaults are kept on purpose (TRL turns on bf16 and gradient checkpointing); only what a CPU
test needs is set: ``use_cpu``, a few steps, small batches, no reporting. The tokenizer is built
here (a WordLevel ``tokenizers`` model wrapped in ``PreTrainedTokenizerFast``), so nothing is
downloaded. Tiny Llama, the torch backend.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
import transformers
import trl
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers

import peft_fast
from peft_fast.lora import adapter_state_dict

TEXTS = [
    f"the {animal} {verb} and is {mood} today"
    for animal in ("cat", "dog", "bird", "fish")
    for verb in ("runs", "sleeps", "eats")
    for mood in ("happy", "sad", "calm")
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
QUANTIZE = [pytest.param(None, id="lora"), pytest.param("nf4", id="qlora")]


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    words = sorted({word for text in TEXTS for word in text.split()} | {"<user>", "<assistant>", "what", "?"})
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(words)}}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", chat_template=CHAT_TEMPLATE
    )


def patched(vocab_size: int, quantize=None, init_seed: int = 0) -> transformers.LlamaForCausalLM:
    """Always the same base; ``init_seed`` draws the LoRA A init."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    torch.manual_seed(init_seed)
    lora = peft_fast.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear", quantize=quantize)
    return peft_fast.patch(model, lora)


def sft_config(output_dir: Path, **overrides) -> trl.SFTConfig:
    """TRL's defaults, plus only what a CPU test needs."""
    settings = dict(output_dir=str(output_dir), use_cpu=True, max_steps=2, per_device_train_batch_size=4,
                    save_steps=1, report_to=[], disable_tqdm=True)  # fmt: skip
    return trl.SFTConfig(**{**settings, **overrides})


def record_losses(model) -> list[float]:
    losses: list[float] = []
    model.register_forward_hook(lambda module, args, out: losses.append(out.loss.item()) if module.training else None)
    return losses


def frozen_state(model) -> dict[str, torch.Tensor]:
    """Everything but the adapter: parameters and buffers (the NF4 data of a QLoRA model)."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {name: t.detach().clone() for name, t in tensors.items() if ".lora_" not in name}


def test_sft_config_defaults_are_bf16_and_gradient_checkpointing(tmp_path):
    """What the tests below rely on: if TRL changes its defaults, this says so first."""
    config = sft_config(tmp_path)
    assert config.bf16 is True and config.fp16 is False
    assert config.gradient_checkpointing is True


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_sft_trainer_default_config_trains_the_adapter(quantize, tmp_path):
    """Default SFTConfig: bf16 autocast + gradient checkpointing.

    Needs bf16 autocast support in peft_fast.ops: without it the backward fails with "expected m1 and
    m2 to have the same dtype" (bf16 activations, fp32 LoRA weights). Kept on the default config on
    purpose; do not switch it to fp32.
    """
    tok = tokenizer()
    model = patched(len(tok), quantize)
    frozen = frozen_state(model)
    lora_b = {k: v.clone() for k, v in adapter_state_dict(model, "default").items() if ".lora_B." in k}
    assert all(not v.any() for v in lora_b.values())  # PEFT's init: B = 0
    losses = record_losses(model)
    data = datasets.Dataset.from_dict({"text": TEXTS})
    trainer = trl.SFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=data, processing_class=tok)
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    assert any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after = adapter_state_dict(model, "default")
    assert all(after[k].any() for k in lora_b), "a LoRA B stayed zero: no gradient reached it"
    for name, tensor in frozen_state(model).items():
        assert torch.equal(tensor, frozen[name]), name
    for step in (1, 2):
        files = {p.name for p in (tmp_path / f"checkpoint-{step}").iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files, files
        assert "model.safetensors" not in files and "pytorch_model.bin" not in files, files
    saved = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    assert saved.keys() == after.keys() and all(torch.equal(saved[k], after[k]) for k in saved)

    trainer.save_model(str(tmp_path / "final"))
    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files


def test_sft_trainer_conversational_resumes_bit_exactly(tmp_path):
    """Chat-template data, default config: resume from a checkpoint gives the same losses and adapter."""
    tok = tokenizer()
    conversations = [
        [{"role": "user", "content": f"what {text.split()[1]} ?"}, {"role": "assistant", "content": text}]
        for text in TEXTS
    ]
    data = datasets.Dataset.from_dict({"messages": conversations})
    full = patched(len(tok))
    full_losses = record_losses(full)
    trl.SFTTrainer(model=full, args=sft_config(tmp_path / "full", max_steps=4, save_steps=2), train_dataset=data,
                   processing_class=tok).train()  # fmt: skip
    assert len(full_losses) == 4

    resumed = patched(len(tok), init_seed=9)  # a different LoRA init: the checkpoint must replace it
    resumed_losses = record_losses(resumed)
    args = sft_config(tmp_path / "resumed", max_steps=4, save_steps=2)
    trainer = trl.SFTTrainer(model=resumed, args=args, train_dataset=data, processing_class=tok)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed_losses == full_losses[2:]
    ours, theirs = adapter_state_dict(resumed, "default"), adapter_state_dict(full, "default")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
