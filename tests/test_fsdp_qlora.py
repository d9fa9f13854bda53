"""FSDP2 shards a QLoRA model's NF4 base (peft_fast.shard, ``--fsdp``, ``--fsdp-offload``).

The multi-process checks run tests/fsdp_worker.py under torchrun (gloo, CPU) with 2 and 4 ranks
on a tiny Llama and a tiny Qwen2: per-rank NF4 bytes (the local shards' storages, counted), the
loss and LoRA gradients against a one-process run on the same global batch, every all-gathered
NF4 array byte for byte against the unsharded layer, and the same step with CPU offload. The
rest runs in this process: bad input, the shardable layer's state dict, a one-rank group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import peft_fast
from peft_fast import distributed
from peft_fast.distributed import ShardingError, check_shardable, nf4_resident_bytes
from peft_fast.layers import NF4Linear
from peft_fast.nf4 import quantize_nf4

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def tiny_qlora(blocksize: int = 64, out_rows: int | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96)  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    peft_fast.patch(model, peft_fast.LoraConfig(r=4, target_modules="all-linear", quantize="nf4",
                                                blocksize=blocksize))  # fmt: skip
    return model


# -- several ranks (torchrun, gloo) -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("family", "world"), [("llama", 2), ("llama", 4), ("qwen2", 2), ("qwen2", 4)])
def test_sharded_qlora_step_matches_one_process(tmp_path, family, world):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PEFT_FAST_BACKEND": "torch", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", free_port(),
         str(ROOT / "tests" / "fsdp_worker.py"), "--family", family, "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for seen in ranks:
        # Per-rank memory: the local shards hold 1/world of the one-process NF4 bytes (FSDP pads each
        # array to a multiple of world: a few bytes); during a forward, plus the block being computed.
        share = seen["total_nf4_bytes"] / world
        assert seen["nf4_parameters_sharded"]
        assert seen["resident_after_shard"] <= share + seen["layer_nf4_bytes"]
        assert seen["resident_after_step"] <= share + seen["layer_nf4_bytes"]  # freed after backward
        assert seen["resident_max_in_forward"] <= share + seen["block_nf4_bytes"]
        assert seen["resident_after_step"] < seen["total_nf4_bytes"] / (world - 0.5)  # not replicated
        # Same numbers: the loss and every LoRA gradient, as one process on the global batch (fp32).
        assert seen["loss_sharded"] == pytest.approx(seen["loss_reference"], rel=1e-5)
        assert seen["grad_names_equal"] and len(seen["grad_rel_errors"]) == 28  # 7 linears x 2 layers x (A, B)
        assert max(seen["grad_rel_errors"].values()) < 1e-5
        # The NF4 bytes each LoRA layer computed with (all-gathered) are the unsharded layer's, exactly.
        assert seen["gathered"]["checked"] >= 14 * 3 and not seen["gathered"]["mismatched"]
        # Offload: the same loss and gradients; the shards live in host memory, none on a GPU.
        assert seen["loss_offload"] == pytest.approx(seen["loss_sharded"], rel=1e-6)
        assert seen["offload_grad_max_rel_diff"] < 1e-6
        assert seen["offload_shard_devices"] == ["DTensor:cpu"] and seen["offload_resident_cuda"] == 0
    assert len({r["loss_sharded"] for r in ranks}) == 1  # every rank agrees


@pytest.mark.slow
def test_patched_peft_model_over_bitsandbytes_shards_too(tmp_path):
    """patch(peft_model) over bitsandbytes' Linear4bit: FSDP2 shards its packed weight (its quant_state,
    1/32 of the codes' bytes, stays on every rank); the same loss and LoRA gradients as one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PEFT_FAST_BACKEND": "torch", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
         str(ROOT / "tests" / "fsdp_worker.py"), "--family", "llama", "--peft-bnb", "uint8", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["weight_type"] == "DTensor" and seen["local_rows"] * 2 == seen["full_rows"]
        assert seen["loss_sharded"] == pytest.approx(seen["loss_reference"], rel=1e-5)
        assert seen["grad_names_equal"] and seen["grad_max_rel_error"] < 1e-5


# -- bad input: a clear error before anything is sharded --------------------------------------


def test_world_size_above_a_layers_rows_is_refused_before_sharding():
    model = tiny_qlora()
    # k_proj and v_proj have 32 rows (2 key-value heads of 16) in both layers.
    with pytest.raises(ShardingError, match=r"world size 33 is above the 32 output rows of NF4 layer "
                                            r"'model\.layers\.0\.self_attn\.k_proj\.base_layer' \(and 3 more "
                                            r"layers\): .* use at most 32 ranks$"):  # fmt: skip
        check_shardable(model, 33)
    check_shardable(model, 32)  # one row per rank is enough
    with pytest.raises(ShardingError, match="world size must be positive"):
        check_shardable(model, 0)


def test_mixed_nf4_block_sizes_are_refused_before_sharding():
    model = tiny_qlora()
    layer = model.model.layers[1].mlp.down_proj.base_layer
    layer._set_weight(quantize_nf4(layer.dequantized_weight(torch.float32), blocksize=128, double_quant=True))
    with pytest.raises(ShardingError, match=r"mix formats \(block size 64, double quant: .* \(\+12 more\); block "
                                            r"size 128, double quant: model\.layers\.1\.mlp\.down_proj"):  # fmt: skip
        check_shardable(model, 2)


def test_wrap_refuses_with_the_reason_and_leaves_the_model_as_it_was():
    from peft_fast.train import UsageError

    model = tiny_qlora()
    with pytest.raises(UsageError, match=r"^--fsdp: world size 33 is above the 32 output rows"):
        distributed.wrap(model, world=33, fsdp=True)
    assert not any(m.is_shardable for m in model.modules() if isinstance(m, NF4Linear))


def test_shard_needs_a_process_group():
    assert not torch.distributed.is_initialized()
    with pytest.raises(ShardingError, match="init_process_group first"):
        peft_fast.shard(tiny_qlora())


def test_fsdp_offload_needs_fsdp(capsys):
    from peft_fast.cli import main

    assert main(["train", "--model", "x", "--data", "y", "--fsdp-offload"]) == 2
    assert "--fsdp-offload keeps FSDP's shards in host memory: it needs --fsdp" in capsys.readouterr().err


# -- the shardable layer -------------------------------------------------------------------------


def test_shardable_nf4_keeps_its_bytes_state_dict_and_outputs():
    torch.manual_seed(0)
    weight = torch.randn(48, 128)
    plain = NF4Linear(quantize_nf4(weight, 64, True))
    shardable = NF4Linear(quantize_nf4(weight, 64, True))
    shardable.make_shardable()
    assert shardable.is_shardable and not plain.is_shardable
    frozen = dict(shardable.named_parameters())
    assert sorted(frozen) == ["weight_absmax", "weight_nested_absmax", "weight_packed"]
    assert not any(p.requires_grad for p in frozen.values())
    assert not list(plain.parameters())  # buffers unless asked: no change for one process
    a, b = plain.state_dict(), shardable.state_dict()
    assert a.keys() == b.keys()  # bitsandbytes' keys alone, not the parameters' own names
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(5, 128)
    assert torch.equal(plain(x), shardable(x))
    # Loading a bitsandbytes state dict into a shardable layer keeps it shardable, with nothing missing.
    again = NF4Linear(quantize_nf4(torch.randn(48, 128), 64, True))
    again.make_shardable()
    missing, unexpected = again.load_state_dict(a, strict=True)
    assert not missing and not unexpected and again.is_shardable
    assert torch.equal(again(x), plain(x))


def test_resident_bytes_count_storages_once():
    model = tiny_qlora()
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    expected = sum(m.nf4.nbytes for m in layers)
    assert nf4_resident_bytes(model) == expected
    assert nf4_resident_bytes(model, "cuda") == 0


@pytest.fixture
def one_rank_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)  # fmt: skip
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("offload", [False, True])
def test_one_rank_shard_trains_as_one_process(one_rank_group, offload):
    import copy

    model = tiny_qlora()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 10))
    reference(ids, labels=ids).loss.backward()
    peft_fast.shard(model, offload=offload)
    assert all(m.is_shardable for m in model.modules() if isinstance(m, NF4Linear))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert loss.item() == pytest.approx(reference(ids, labels=ids).loss.item(), rel=1e-6)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    for name, param in reference.named_parameters():
        if param.requires_grad:
            assert torch.allclose(grads[name], param.grad, rtol=1e-5, atol=1e-7), name


@pytest.fixture
def one_rank_nccl_group(tmp_path):
    """FSDP2 on CUDA tensors needs NCCL (gloo has no CUDA reduce-scatter)."""
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)  # fmt: skip
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.cuda
def test_offload_leaves_no_nf4_bytes_on_the_gpu(one_rank_nccl_group):
    model = tiny_qlora().cuda()
    on_gpu = nf4_resident_bytes(model, "cuda")
    assert on_gpu > 0
    peft_fast.shard(model, offload=True)
    ids = torch.randint(0, 96, (2, 10), device="cuda")
    model(ids, labels=ids).loss.backward()
    torch.cuda.synchronize()
    assert nf4_resident_bytes(model, "cuda") == 0  # between steps: shards in host memory, gathered copies freed


# -- the step model's per-GPU memory under FSDP2 -----------------------------------------------


def test_sharded_peak_arithmetic():
    from peft_fast.step_model.fsdp import ModelParts, sharded_peak

    parts = ModelParts(layers=10, layer_nf4=1000, layer_lora=40, layer_other=10, root=500, lora_itemsize=4)
    static = 10 * 1050 + 500 + 7  # the weights and 7 bytes of inputs
    one = sharded_peak(static + 3000, static, parts, ranks=1, offload=False)
    assert one.activations == 3000 and one.inputs == 7
    two = sharded_peak(static + 3000, static, parts, ranks=2, offload=False)
    assert two.layer_shards == 10 * 1050 / 2 and two.gathered_layers == 2 * 1050 and two.root == 500
    assert two.lora_grads == 400 / 2 and two.adam_moments == 2 * 400 / 2
    assert two.peak_bytes == 3000 + 5250 + 2100 + 500 + 200 + 400 + 7
    off = sharded_peak(static + 3000, static, parts, ranks=2, offload=True)
    assert off.layer_shards == off.lora_grads == off.adam_moments == 0
    assert off.peak_bytes == 3000 + 2100 + 500 + 7
    eight = sharded_peak(static + 3000, static, parts, ranks=8, offload=False)
    assert eight.peak_bytes < two.peak_bytes
    with pytest.raises(ValueError, match="ranks must be positive"):
        sharded_peak(1, 1, parts, ranks=0, offload=False)


def test_model_parts_count_what_a_patched_model_holds():
    """The memory model's per-layer NF4 bytes are what a real patched model's layer holds (and FSDP shards)."""
    from peft_fast.step_model.fsdp import model_parts

    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96)  # fmt: skip
    config.torch_dtype = torch.bfloat16
    parts = model_parts(config)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    peft_fast.patch(model, peft_fast.LoraConfig(**{"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
                                                quantize="nf4"))  # fmt: skip
    blocks = distributed.transformer_blocks(model)
    assert parts.layers == 3 and all(nf4_resident_bytes(b) == parts.layer_nf4 for b in blocks)
    lora = [p for p in blocks[0].parameters() if p.requires_grad]
    assert parts.layer_lora == sum(p.numel() * p.element_size() for p in lora)
    assert parts.root == 2 * 96 * 128 * 2 + 128 * 2  # embeddings + LM head + final norm, bf16
