"""The step model's self-checks: hand-computed costs, real vs fake op streams, extrapolation, memory, offload.

Tiny configs only (hidden 64, 2–4 layers, vocab 128): the whole file runs in well under a minute
on the project's 2-core machine.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from torch import nn

import peft_fast
from peft_fast import step_model
from peft_fast.step_model import costs, custom_op_costs
from peft_fast.step_model.stacks import move_to
from peft_fast.step_model.trace import fake_cuda, trace_step


def tiny_config(layers: int = 2) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=1024,
    )  # fmt: skip


def _device_records(trace):
    return [r for r in trace.records if r.device]


def test_linear_forward_backward_flops_and_bytes():
    m, k, n = 64, 96, 48
    with fake_cuda() as session:
        layer = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        move_to(layer, "cuda")
        x = torch.empty(m, k, dtype=torch.bfloat16, device="cuda", requires_grad=True)

        def step(recorder):
            y = layer(x)
            recorder.phase = "backward"
            y.backward(torch.empty_like(y))

        trace = trace_step(step, layer, session)
    mms = [r for r in _device_records(trace) if r.name == "aten.mm"]
    assert len(mms) == 3  # Y = X·Wᵀ, dX = dY·W, dW = dYᵀ·X
    assert sum(r.flops for r in mms) == 3 * 2 * m * n * k
    forward = next(r for r in mms if r.phase == "forward")
    assert forward.bytes == 2 * (m * k + n * k + m * n)
    assert forward.roofline_s == pytest.approx(max(2 * m * n * k / 790e12, forward.bytes / 4.3e12))


def test_sdpa_is_flash_on_fake_cuda_and_priced_by_formula():
    b, h, h_kv, s, d = 1, 8, 2, 256, 64
    with fake_cuda() as session:
        q = torch.empty(b, h, s, d, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        kv = [torch.empty(b, h_kv, s, d, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in range(2)]

        def step(recorder):
            out = nn.functional.scaled_dot_product_attention(q, *kv, is_causal=True, enable_gqa=True)
            recorder.phase = "backward"
            out.backward(torch.empty_like(out))

        trace = trace_step(step, nn.Module(), session)
    records = _device_records(trace)
    forward = next(r for r in records if r.name == "aten._scaled_dot_product_flash_attention")
    backward = next(r for r in records if r.name == "aten._scaled_dot_product_flash_attention_backward")
    flops = 4 * b * h * s * s * d / 2
    assert forward.flops == flops and forward.kernels == 1
    assert backward.flops == 2.5 * flops and backward.kernels == 5  # dot(dO,O), main, dQ convert, 2 GQA sums
    expected = 2 * (q.numel() + 2 * kv[0].numel() + q.numel()) + b * h * s * 4  # q, k, v, out, lse
    assert 0 <= forward.bytes - expected <= 32  # + the Philox seed and offset
    assert not trace.notes  # no math-path SDPA


def test_peak_of_a_hand_computed_sequence_is_exact():
    kept = []
    with fake_cuda() as session:

        def step(recorder):
            a = torch.empty(1000, dtype=torch.uint8, device="cuda")
            b = torch.empty(500, dtype=torch.float32, device="cuda")  # 2000 B: live 3000
            del a
            c = torch.empty(250, dtype=torch.float32, device="cuda")  # 1000 B: live 3000 again
            d = b + c[:1]  # 2000 B: live 5000 (the peak)
            del b, c, d
            e = torch.empty(100, dtype=torch.uint8, device="cuda")  # 100 B: live 100
            kept.append(e)

        trace = trace_step(step, nn.Module(), session)
    memory = trace.memory
    assert memory.peak_bytes - memory.peak_static == 5000
    assert memory.peak_at.startswith("aten.add")
    memory.sweep()
    assert memory.dynamic_bytes == 100


@pytest.mark.parametrize("stack", ["none", "peft_fast"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_real_and_fake_tensors_give_the_same_op_stream(stack, checkpointing):
    """CPU, no autocast: the stream of ops that launch kernels, their FLOPs and bytes, and the dynamic peak."""
    common = {"config": tiny_config(), "stack": stack, "seq": 32, "checkpointing": checkpointing, "device": "cpu",
              "keep_records": True}  # fmt: skip
    torch.manual_seed(0)
    real = step_model.run(fake=False, **common)
    fake = step_model.run(fake=True, **common)
    stream = lambda result: [(r.name, r.flops, r.bytes) for r in result.records if r.device]
    real_stream, fake_stream = stream(real), stream(fake)
    if stack == "peft_fast":
        # Known difference: autograd's CopySlices behind peft_fast's in-place RoPE on a view makes two more
        # small ops per call on real tensors (a zero fill and a copy); fake tensors replay views instead.
        extra = [op for op in real_stream if op[0] == "aten.new_zeros"]
        assert len(real_stream) - len(fake_stream) == 2 * len(extra)
        return
    assert real_stream == fake_stream
    # Real CPU runs see every CPU tensor of the process as "device" memory: compare what the step adds.
    assert real.peak_bytes - real.static_bytes == fake.peak_bytes - fake.static_bytes
    assert real.saved_bytes == fake.saved_bytes


@pytest.mark.parametrize(("stack", "offload"), [("peft_fast", False), ("peft_fast", True), ("peft_bnb", False)])
def test_extrapolation_equals_a_direct_run(stack, offload):
    """Also with offload and the kept last layer: the fit's two depths both have a checkpointed layer."""
    common = {"config": tiny_config(), "stack": stack, "seq": 64, "layers": 5, "offload": offload}
    direct = step_model.run(**common)
    extrapolated = step_model.run(extrapolate=True, **common)
    for name in ("ops", "kernels", "flops", "bytes"):
        assert getattr(extrapolated, name) == getattr(direct, name), name
    for name in ("roofline_ms", "ms"):
        assert getattr(extrapolated, name) == pytest.approx(getattr(direct, name), rel=1e-9), name
    for name in ("static_bytes", "grad_bytes", "saved_bytes"):
        assert getattr(extrapolated, name) == getattr(direct, name), name
    # The peak is a maximum: exact when it happens at the same point at every depth, within 2% here.
    assert extrapolated.peak_bytes == pytest.approx(direct.peak_bytes, rel=0.02)


def test_every_device_op_has_a_cost_and_the_custom_ops_are_one_op():
    result = step_model.run(tiny_config(), stack="peft_bnb", seq=32, keep_records=True)
    device = [r for r in result.records if r.device]
    assert device and all(r.seconds > 0 and r.kernels >= 1 for r in device)
    assert "bitsandbytes.gemm_4bit" in result.by_kind and "aten.native_dropout" in result.by_kind
    fast = step_model.run(tiny_config(), stack="peft_fast", seq=32)
    # 7 linears a layer; layer 1 runs forward and recompute, the last layer (keep_last_layer) forward only
    assert fast.by_kind["peft_fast.lora_linear"].calls == 7 * (2 + 1)


def test_lora_rules_launch_what_the_hopper_report_records():
    """Kernel counts of the lora_linear rules at the report's shapes equal its recorded launches."""
    report = costs.HopperReport.default()
    if report is None:
        pytest.skip("no committed Hopper report in this checkout")
    for kind in ("qlora_forward", "qlora_backward", "qlora_decode"):
        for entry in report.entries[kind]:
            call = costs._meta_lora_call(entry, kind == "qlora_backward")
            kernels, _ = custom_op_costs.RULES[call.name](call)
            assert len(kernels) == len(entry["launches"]), (kind, entry["M"], entry["N"], entry["K"])


def test_bitsandbytes_path_choice_on_sm90():
    assert custom_op_costs.bnb_uses_fused_kernel(1, 4096, 4096, torch.bfloat16, 64)
    assert not custom_op_costs.bnb_uses_fused_kernel(2048, 4096, 4096, torch.bfloat16, 64)


@pytest.mark.skipif(
    "offload_activations" not in inspect.signature(peft_fast.patch).parameters, reason="patch has no offload"
)
def test_offload_lowers_the_device_peak():
    # Offload's backward holds the fetched input and its gradient together (two S×H tensors more than
    # non-reentrant checkpointing at the peak), so it wins once the layers' inputs outweigh that: 4 here.
    common = {"config": tiny_config(4), "stack": "peft_fast", "seq": 2048, "checkpointing": True}
    kept = step_model.run(**common)
    offloaded = step_model.run(offload=True, **common)
    assert offloaded.saved_bytes < kept.saved_bytes
    assert offloaded.peak_bytes < kept.peak_bytes


def test_longest_context_fit_is_affine():
    fit = step_model.longest_context(
        "peft_bnb", (2e7,), config=tiny_config(), fit_seqs=(256, 1024), check_seq=512, verify=True
    )
    assert abs(fit["fit"]["check_error"]) < 0.02
    entry = fit["budgets"]["0.02 GB"]
    assert entry["fits"] and entry["traced_peak_bytes"] <= 2e7 and entry["seq"] > 1024


def test_bench_rows_carry_the_harness_fields():
    from peft_fast.benchmark.step_suite import _row

    row = _row(step_model.run(tiny_config(), stack="peft_fast", seq=32))
    assert row["op"] == "step_model" and row["impl"] == "peft_fast qlora" and row["backend"] == "H200 roofline model"
    for field in ("M", "seq", "batch", "grad_ckpt", "dtype", "ms", "tflops", "gb_per_s", "peak_mem_bytes", "kernels"):
        assert row[field] is not None, field
