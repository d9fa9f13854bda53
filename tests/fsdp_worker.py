"""One rank of the FSDP2 QLoRA checks (tests/test_fsdp_qlora.py runs it under torchrun, gloo, CPU).

Every rank builds the same tiny QLoRA model, keeps an unsharded copy and computes the one-process
reference on the whole global batch (every rank's micro-batch, equal token counts, so the mean of
the ranks' mean losses is the global mean). Then it shards the model with ``peft_fast.shard`` and
runs one step on its own micro-batch, and again with ``offload=True``. It writes what it saw to
``<out>/rank<R>.json``: losses, the LoRA gradients' relative errors against the reference, the
NF4 bytes it holds (the local shards' storages, counted), whether every all-gathered NF4 array
equalled the unsharded layer's byte for byte, and where the offloaded shards live.

    python -m torch.distributed.run --nproc-per-node W tests/fsdp_worker.py --family llama --out DIR
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

import peft_fast
from peft_fast.distributed import nf4_resident_bytes
from peft_fast.layers import NF4_FIELDS, NF4Linear

VOCAB, SEQ, PER_RANK = 96, 12, 2


def tiny_model(family: str) -> torch.nn.Module:
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    raise SystemExit(f"unknown family {family!r}")


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) gradients of the trainable parameters, by name; collective under FSDP."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad and param.grad is not None:
            grad = param.grad
            out[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().clone()
    return out


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--peft-bnb", dest="peft_bnb", help="instead: a PEFT model over bitsandbytes 4-bit "
                        "(quant_storage uint8 or float32), patched, then sharded")  # fmt: skip
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.peft_bnb:
        return peft_bnb_model(args, rank, world)

    model = tiny_model(args.family)
    peft_fast.patch(model, peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", quantize="nf4",
                                                init_lora_weights=False))  # fmt: skip
    model.train()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (PER_RANK * world, SEQ), generator=generator)
    mine = ids[rank * PER_RANK : (rank + 1) * PER_RANK]

    # The one-process reference on the whole global batch, from an unsharded copy.
    reference = copy.deepcopy(model)
    offload_copy = copy.deepcopy(model)
    loss_ref = reference(ids, labels=ids).loss
    loss_ref.backward()
    grads_ref = lora_grads(reference)
    total_nf4 = nf4_resident_bytes(reference)
    layer_nf4 = max(
        sum(getattr(m, f"weight_{n}").nbytes for n in NF4_FIELDS if getattr(m, f"weight_{n}") is not None)
        for m in reference.modules()
        if isinstance(m, NF4Linear)
    )
    block_nf4 = max(
        nf4_resident_bytes(block) for block in peft_fast.distributed.transformer_blocks(reference)
    )  # fmt: skip

    # Every all-gathered NF4 array is checked, byte for byte, against the unsharded layer's.
    originals = {name: {n: getattr(m, f"weight_{n}") for n in NF4_FIELDS}
                 for name, m in reference.named_modules() if isinstance(m, NF4Linear)}  # fmt: skip
    gathered = {"checked": 0, "mismatched": []}
    in_forward = []

    def check_gathered(name: str, layer: NF4Linear):
        def hook(module, inputs):  # on the LoRA layer around the NF4 base: it reads the base's arrays itself
            for field, expected in originals[name].items():
                actual = getattr(layer, f"weight_{field}")
                if expected is None:
                    continue
                gathered["checked"] += 1
                if type(actual).__name__ == "DTensor" or not torch.equal(actual, expected):
                    gathered["mismatched"].append(f"{name}.{field}")
            in_forward.append(nf4_resident_bytes(model))

        return hook

    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, NF4Linear):
            module.register_forward_pre_hook(check_gathered(f"{name}.base_layer", base))

    result: dict = {"rank": rank, "world": world, "family": args.family, "total_nf4_bytes": total_nf4,
                    "layer_nf4_bytes": layer_nf4, "block_nf4_bytes": block_nf4}  # fmt: skip
    peft_fast.shard(model)
    result["resident_after_shard"] = nf4_resident_bytes(model)
    result["nf4_parameters_sharded"] = all(
        type(m.weight_packed).__name__ == "DTensor" for m in model.modules() if isinstance(m, NF4Linear)
    )
    loss = model(mine, labels=mine).loss
    loss.backward()
    result["resident_after_step"] = nf4_resident_bytes(model)
    result["resident_max_in_forward"] = max(in_forward)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    grads = lora_grads(model)
    result.update(
        loss_reference=loss_ref.item(),
        loss_sharded=mean_loss.item(),
        grad_names_equal=sorted(grads) == sorted(grads_ref),
        grad_rel_errors={n: float((grads[n] - g).norm() / g.norm()) for n, g in grads_ref.items() if n in grads},
        gathered=gathered,
    )

    # The same step with the shards in host memory (FSDP2's CPUOffloadPolicy).
    peft_fast.shard(offload_copy, offload=True)
    loss_off = offload_copy(mine, labels=mine).loss
    loss_off.backward()
    mean_off = loss_off.detach().clone()
    dist.all_reduce(mean_off)
    mean_off /= world
    grads_off = lora_grads(offload_copy)
    result.update(
        loss_offload=mean_off.item(),
        offload_grad_max_rel_diff=max(float((grads_off[n] - g).norm() / g.norm()) for n, g in grads.items()),
        offload_shard_devices=sorted(
            {
                f"{type(m.weight_packed).__name__}:{_local(m.weight_packed).device.type}"
                for m in offload_copy.modules()
                if isinstance(m, NF4Linear)
            }
        ),
        unsharded_after_step=sorted(
            n
            for n, m in model.named_modules()
            if isinstance(m, NF4Linear) and type(m.weight_packed).__name__ != "DTensor"
        ),
        offload_resident_cuda=nf4_resident_bytes(offload_copy, "cuda"),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def peft_bnb_model(args, rank: int, world: int) -> None:
    """``patch(peft_model)`` over bitsandbytes' Linear4bit, sharded: FSDP2 shards bitsandbytes' packed weight."""
    import peft

    path = args.out / "base"
    if rank == 0:
        tiny_model(args.family).save_pretrained(path)
    dist.barrier()
    storage = {"uint8": torch.uint8, "float32": torch.float32}[args.peft_bnb]
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                                            bnb_4bit_quant_storage=storage)  # fmt: skip
    base = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32,
                                                             device_map="cpu")  # fmt: skip
    torch.manual_seed(2)  # the same LoRA initialisation on every rank (rank 0 alone built and saved the base)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_fast.patch(model)
    model.train()
    ids = torch.randint(0, VOCAB, (PER_RANK * world, SEQ), generator=torch.Generator().manual_seed(1))
    mine = ids[rank * PER_RANK : (rank + 1) * PER_RANK]
    model(input_ids=ids, labels=ids)  # the first call may repack bitsandbytes' weight: the reference is the second
    loss_ref = model(input_ids=ids, labels=ids).loss
    loss_ref.backward()
    grads_ref = lora_grads(model)
    model.zero_grad(set_to_none=True)
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    full_rows = weight.shape[0]
    peft_fast.shard(model)
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    loss = model(input_ids=mine, labels=mine).loss
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    grads = lora_grads(model)
    result = {
        "loss_reference": loss_ref.item(),
        "loss_sharded": (mean / world).item(),
        "grad_max_rel_error": max(float((grads[n] - g).norm() / g.norm()) for n, g in grads_ref.items()),
        "grad_names_equal": sorted(grads) == sorted(grads_ref),
        "weight_type": type(weight).__name__,
        "local_rows": weight.to_local().shape[0] if hasattr(weight, "to_local") else None,
        "full_rows": full_rows,
    }
    (args.out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("PEFT_FAST_BACKEND", "torch")
    main()
