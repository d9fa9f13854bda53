"""nanoGPT-style model-FLOPs arithmetic for a decoder LM: FLOPs per token and step, MFU, the floor time.

A sanity check beside the cost report: whatever the kernels do, a training step cannot beat its
model FLOPs at the bf16 rate (790 TFLOP/s on an H200, :data:`tools.hopper.cost_model.H200`).

nanoGPT's ``estimate_mfu`` counts, per token of a sequence of T tokens,
``6·N + 12·L·H·Q·T``: N the parameters in matmuls, 2 FLOPs per parameter forward, 4 backward
(the input gradient and the weight gradient, 2 each); and the attention products (Q·Kᵀ and P·V,
2·T·H·Q FLOPs each per layer forward, twice that backward) with no causal discount. Here:

* **full fine-tuning**: ``6·N + 12·L·d·T`` with d = H·Q the query width (under grouped-query
  attention the products still run over every query head);
* **LoRA over a frozen base**: the base weights get no gradient, so their backward is the input
  gradient only, 2 FLOPs per parameter, not 4: ``4·N_base + 6·N_lora + 12·L·d·T`` (the attention
  term is unchanged: it has no weights and needs both its input gradients);
* **gradient checkpointing** (each decoder layer, as Hugging Face's) recomputes every layer's
  forward in the backward: ``+ 2·(N_layers + N_lora) + 4·L·d·T`` per token. Those are hardware
  FLOPs, not model FLOPs: MFU counts the model's (as nanoGPT and PaLM do), the floor time the
  hardware's.

N counts every linear layer, the output head included (untied or tied alike: the head is a
matmul), and no embedding lookup. The first layer's input gradient, which a frozen embedding
does not need, is counted like the others (0.4 % of Llama-3-8B's).

Usage: ``python -m tools.hopper.mfu [--seq 2048] [--batch 1] [--rank 16] [--tokens-per-s X]``
prints the numbers for Llama-3-8B.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from tools.hopper.cost_model import H200


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a Llama-style decoder LM (gated MLP, grouped-query attention)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    def layer_matmul_params(self) -> int:
        """Weights of one decoder layer's linear layers: q, k, v, o and the gated MLP's gate, up, down."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        attention = self.hidden * (q + 2 * kv) + q * self.hidden
        return attention + 3 * self.hidden * self.intermediate

    def matmul_params(self) -> int:
        """N: every linear layer's weights, the output head included (no embedding lookup)."""
        return self.layers * self.layer_matmul_params() + self.hidden * self.vocab

    def lora_params(self, rank: int) -> int:
        """LoRA factors A [r, in] and B [out, r] on every linear layer of every decoder layer ("all-linear")."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        shapes = [(self.hidden, q), (self.hidden, kv), (self.hidden, kv), (q, self.hidden)]
        shapes += [(self.hidden, self.intermediate)] * 2 + [(self.intermediate, self.hidden)]
        return self.layers * sum(rank * (fan_in + fan_out) for fan_in, fan_out in shapes)

    def attention_flops_per_token(self, seq: int) -> int:
        """12·L·d·T: Q·Kᵀ and P·V forward (4·L·d·T) and backward (8·L·d·T), d the query width."""
        return 12 * self.layers * self.heads * self.head_dim * seq


LLAMA_3_8B = DecoderShape(
    "Llama-3-8B", layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256
)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step of ``tokens`` tokens."""

    tokens: int
    model_per_token: float  # the model FLOPs MFU is counted against
    recompute_per_token: float  # added by gradient checkpointing (hardware FLOPs only)

    @property
    def model(self) -> float:
        return self.model_per_token * self.tokens

    @property
    def with_checkpointing(self) -> float:
        return (self.model_per_token + self.recompute_per_token) * self.tokens

    def floor_s(self, checkpointing: bool, rate: float = H200.bf16_flops_per_s) -> float:
        """The step's lower bound: its hardware FLOPs at the bf16 rate."""
        return (self.with_checkpointing if checkpointing else self.model) / rate


def full_finetune_flops(shape: DecoderShape, seq: int, batch: int = 1) -> StepFlops:
    """nanoGPT's count: 6·N + 12·L·d·T per token (every weight trains)."""
    per_token = 6 * shape.matmul_params() + shape.attention_flops_per_token(seq)
    recompute = 2 * shape.layers * shape.layer_matmul_params() + shape.attention_flops_per_token(seq) // 3
    return StepFlops(seq * batch, per_token, recompute)


def lora_flops(shape: DecoderShape, seq: int, rank: int, batch: int = 1) -> StepFlops:
    """LoRA over a frozen base: 4·N_base + 6·N_lora + 12·L·d·T per token (see the module docstring)."""
    n_lora = shape.lora_params(rank)
    per_token = 4 * shape.matmul_params() + 6 * n_lora + shape.attention_flops_per_token(seq)
    recompute = 2 * (shape.layers * shape.layer_matmul_params() + n_lora) + shape.attention_flops_per_token(seq) // 3
    return StepFlops(seq * batch, per_token, recompute)


def mfu(tokens_per_s: float, model_flops_per_token: float, rate: float = H200.bf16_flops_per_s) -> float:
    """Model FLOPs utilisation: achieved model FLOPs per second over the bf16 rate."""
    return tokens_per_s * model_flops_per_token / rate


def _describe(label: str, flops: StepFlops, tokens_per_s: float | None) -> list[str]:
    lines = [
        f"{label}: {flops.model_per_token / 1e9:,.2f} GFLOP per token (model), "
        f"+{flops.recompute_per_token / 1e9:,.2f} recomputed with gradient checkpointing",
        f"  per step of {flops.tokens:,} tokens: {flops.model / 1e12:,.1f} TFLOP without checkpointing "
        f"(floor {flops.floor_s(False) * 1e3:,.1f} ms), {flops.with_checkpointing / 1e12:,.1f} TFLOP with "
        f"(floor {flops.floor_s(True) * 1e3:,.1f} ms)",
    ]
    if tokens_per_s:
        lines.append(f"  at {tokens_per_s:,.0f} tokens/s: MFU {mfu(tokens_per_s, flops.model_per_token):.1%}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank on every linear layer (default 16)")
    parser.add_argument("--tokens-per-s", type=float, help="a measured throughput, to turn into MFU")
    args = parser.parse_args(argv)
    shape = LLAMA_3_8B
    print(
        f"{shape.name}: N = {shape.matmul_params() / 1e9:.3f} B matmul parameters "
        f"({shape.layers} layers × {shape.layer_matmul_params() / 1e6:.1f} M + head "
        f"{shape.hidden * shape.vocab / 1e6:.1f} M), "
        f"LoRA r={args.rank}: {shape.lora_params(args.rank) / 1e6:.1f} M; T = {args.seq}; "
        f"bf16 {H200.bf16_flops_per_s / 1e12:.0f} TFLOP/s"
    )
    lora = lora_flops(shape, args.seq, args.rank, args.batch)
    full = full_finetune_flops(shape, args.seq, args.batch)
    for line in _describe(f"LoRA r={args.rank}, frozen base (4·N + 6·N_lora + 12·L·d·T)", lora, args.tokens_per_s):
        print(line)
    for line in _describe("full fine-tuning (nanoGPT: 6·N + 12·L·d·T)", full, args.tokens_per_s):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
