"""Tiny randomly initialised fp32 models (hidden 64) of four families, and helpers to run them.

Shared by the bottleneck-adapter and (IA)³ tests; dropout is off so train mode is deterministic.
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 128
HIDDEN = 64
ARCHS = ["llama", "gpt2", "bert", "t5"]


def build(arch: str, random_bert_biases: bool = False) -> torch.nn.Module:
    """The tiny model of ``arch`` (seeded). BERT's biases start at zero; ask for random ones to make them count."""
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)  # fmt: skip
        return transformers.LlamaForCausalLM(config).eval()
    if arch == "gpt2":
        config = transformers.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                         bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0)  # fmt: skip
        return transformers.GPT2LMHeadModel(config).eval()
    if arch == "t5":
        config = transformers.T5Config(d_model=HIDDEN, d_kv=16, d_ff=128, num_layers=1, num_decoder_layers=1,
                                       num_heads=4, vocab_size=VOCAB, dropout_rate=0.0)  # fmt: skip
        return transformers.T5ForConditionalGeneration(config).eval()
    config = transformers.BertConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    model = transformers.BertForMaskedLM(config).eval()
    if random_bert_biases:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(std=0.1)
    return model


def batch(arch: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(0, VOCAB, (2, 8), generator=generator)}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(0, VOCAB, (2, 6), generator=generator)
    return inputs


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def loss_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs).logits
    labels = inputs.get("decoder_input_ids", inputs["input_ids"])
    return torch.nn.functional.cross_entropy(out.flatten(0, -2), labels.flatten())
