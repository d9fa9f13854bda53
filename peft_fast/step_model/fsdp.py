"""Per-GPU memory of a QLoRA step sharded with FSDP2 (``peft_fast.shard``): a model, from the traced step.

The one-process step model (:func:`peft_fast.step_model.run`) gives the step's peak and what was
alive before it (weights, NF4 states, inputs). Under FSDP2 with ``peft_fast.shard`` (one unit per
decoder layer, then the root), per rank:

- every decoder layer's parameters — NF4 codes and both levels of scales, LoRA A/B, norm weights —
  are 1/ranks resident (dim-0 shards); the LoRA gradients and the AdamW moments too;
- the layer being computed is all-gathered in full, and FSDP2 prefetches the next one: two layers'
  unsharded parameters at the peak;
- the root unit (embeddings, the final norm, the LM head) is gathered at the start of the forward
  and kept until the backward ends (FSDP2 does not reshard the root after its forward);
- activations, their gradients and the kernels' workspace are one rank's batch, as in one process:
  the traced peak minus what was alive before the step (that difference also holds the LoRA
  gradients that existed at the peak, counted unsharded here: a slight over-estimate).

With ``offload`` (``CPUOffloadPolicy``) the shards, gradients and AdamW moments live in host
memory: the GPU holds the activations, the root and the two gathered layers. Every figure is a
prediction of this model, from shapes and the fake-tensor trace; no GPU ran it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from peft_fast.step_model.stacks import build_stack, llama3_8b_config
from peft_fast.step_model.trace import fake_cuda

__all__ = [
    "ANCHORS",
    "ModelParts",
    "ShardedPeak",
    "fsdp_memory",
    "fsdp_table",
    "llama3_70b_config",
    "model_parts",
    "sharded_peak",
]

# Published per-GPU peaks of 70B-class QLoRA runs, for the table beside ours (their settings differ).
ANCHORS = (
    {"what": "Answer.AI fsdp_qlora, Llama-2-70B, 2 x RTX 4090, CPU offload, ctx 2048, bs 2",
     "per_gpu_gib": 14.92},
    {"what": "PEFT FSDP + QLoRA guide, Llama-2-70B, 2 GPUs, with CPU offload", "per_gpu_gb": 19.6},
    {"what": "PEFT FSDP + QLoRA guide, Llama-2-70B, 2 GPUs, without offload", "per_gpu_gb": 35.6},
    {"what": "torchtune / torchao NF4Tensor, Llama-3.1-405B QLoRA, 8 x A100", "per_gpu_gb": 44.8},
)  # fmt: skip


def llama3_70b_config(layers: int = 80):
    """Llama-3-70B's dimensions: Llama-3-8B's config (rope scaling, vocabulary, bf16, SDPA) at 70B's widths."""
    config = llama3_8b_config(layers)
    config.hidden_size, config.intermediate_size = 8192, 28672
    config.num_attention_heads, config.num_key_value_heads = 64, 8
    return config


@dataclass(frozen=True)
class ModelParts:
    """Bytes of the peft_fast QLoRA model's parameters, by FSDP unit (counted from a one-layer fake model)."""

    layers: int
    layer_nf4: int  # one decoder layer's NF4 codes and scales
    layer_lora: int  # its LoRA A/B parameters (trained)
    layer_other: int  # its other parameters (norm weights)
    root: int  # embeddings, final norm, LM head
    lora_itemsize: int  # bytes per LoRA parameter (AdamW keeps two moments of that dtype)

    @property
    def layer_total(self) -> int:
        return self.layer_nf4 + self.layer_lora + self.layer_other

    @property
    def lora_total(self) -> int:
        return self.layers * self.layer_lora


def model_parts(config) -> ModelParts:
    """Count the parts of ``config``'s peft_fast QLoRA model (r = 16, all linear layers, NF4 with double quant)."""
    from peft_fast.distributed import transformer_blocks

    one = type(config).from_dict({**config.to_dict(), "num_hidden_layers": 1})
    one.torch_dtype = config.torch_dtype
    with fake_cuda():
        model = build_stack(one, "peft_fast", checkpointing=False)
        (block,) = transformer_blocks(model)
        in_block = {id(t) for t in [*block.parameters(), *block.buffers()]}
        nf4 = sum(b.untyped_storage().nbytes() for n, b in block.named_buffers() if ".weight_" in n)
        lora = [p for p in block.parameters() if p.requires_grad]
        other = sum(p.untyped_storage().nbytes() for p in block.parameters() if not p.requires_grad)
        root = sum(t.untyped_storage().nbytes() for t in model.parameters() if id(t) not in in_block)
        parts = ModelParts(
            layers=config.num_hidden_layers,
            layer_nf4=nf4,
            layer_lora=sum(p.untyped_storage().nbytes() for p in lora),
            layer_other=other,
            root=root,
            lora_itemsize=lora[0].element_size(),
        )
        del model, block
    return parts


@dataclass(frozen=True)
class ShardedPeak:
    """One rank's predicted peak under FSDP2, and its parts (bytes)."""

    ranks: int
    offload: bool
    peak_bytes: float
    activations: float  # one rank's step: traced peak minus what was alive before it
    layer_shards: float  # NF4 + LoRA + norms of every layer, 1/ranks (0 with offload: host memory)
    gathered_layers: float  # the layer computed and the one prefetched, unsharded
    root: float  # embeddings, final norm, LM head: gathered for the whole step
    lora_grads: float  # 1/ranks (0 with offload)
    adam_moments: float  # two per LoRA parameter, 1/ranks (0 with offload)
    inputs: float  # the batch's ids and labels

    def to_dict(self) -> dict:
        return asdict(self)


def sharded_peak(peak_bytes: float, static_bytes: float, parts: ModelParts, ranks: int, offload: bool) -> ShardedPeak:
    """One rank's peak under FSDP2 from a one-process step's ``peak_bytes`` / ``static_bytes`` (see the module doc)."""
    if ranks < 1:
        raise ValueError(f"ranks must be positive, got {ranks}")
    weights = parts.layers * parts.layer_total + parts.root
    inputs = max(0.0, static_bytes - weights)  # the ids and labels (and anything else alive before the step)
    activations = peak_bytes - static_bytes
    on_gpu = 0.0 if offload else 1.0
    shards = on_gpu * parts.layers * parts.layer_total / ranks
    gathered = min(2, parts.layers) * parts.layer_total
    grads = on_gpu * parts.lora_total / ranks
    adam = on_gpu * 2 * parts.lora_total / ranks
    total = activations + shards + gathered + parts.root + grads + adam + inputs
    return ShardedPeak(ranks, offload, total, activations, shards, gathered, parts.root, grads, adam, inputs)


def fsdp_memory(config=None, seq: int = 2048, batch: int = 2, ranks: tuple[int, ...] = (2, 8)) -> dict:
    """The predicted per-GPU peak of ``config`` (default Llama-3-70B) under FSDP2, for each rank count, ± offload.

    One one-process step is traced (checkpointing on, extrapolated from 2 and 3 layers) for one
    rank's batch; :func:`sharded_peak` turns it into each setting's per-rank peak.
    """
    from peft_fast.step_model.runner import run

    config = config or llama3_70b_config()
    parts = model_parts(config)
    step = run(config, stack="peft_fast", seq=seq, batch=batch, checkpointing=True, extrapolate=True)
    one_process = {"peak_bytes": step.peak_bytes, "static_bytes": step.static_bytes, "peak_at": step.peak_at,
                   "depth": step.depth}  # fmt: skip
    rows = [sharded_peak(step.peak_bytes, step.static_bytes, parts, n, off).to_dict()
            for n in ranks for off in (False, True)]  # fmt: skip
    return {"model": step.model, "seq": seq, "batch_per_rank": batch, "parts": asdict(parts),
            "one_process": one_process, "rows": rows, "anchors": list(ANCHORS)}  # fmt: skip


def fsdp_table(result: dict) -> str:
    """Markdown: one row per (ranks, offload), GB (1e9 bytes) and GiB."""
    lines = [f"| {result['model']}, S = {result['seq']}, batch {result['batch_per_rank']} per GPU | per-GPU peak GB "
             "(GiB) | activations | layer shards | 2 gathered layers | root | LoRA grads + AdamW |",
             "|" + " --- |" * 7]  # fmt: skip
    gb = lambda x: f"{x / 1e9:.2f}"
    for r in result["rows"]:
        lines.append(
            f"| {r['ranks']} GPUs{', CPU offload' if r['offload'] else ''} | {gb(r['peak_bytes'])} "
            f"({r['peak_bytes'] / 2**30:.2f}) | {gb(r['activations'])} | {gb(r['layer_shards'])} | "
            f"{gb(r['gathered_layers'])} | {gb(r['root'])} | {gb(r['lora_grads'] + r['adam_moments'])} |"
        )
    one = result["one_process"]
    lines.append(f"| one process (no FSDP) | {gb(one['peak_bytes'])} ({one['peak_bytes'] / 2**30:.2f}) | | | | | |")
    return "\n".join(lines)
