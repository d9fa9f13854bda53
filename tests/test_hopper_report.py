"""The static Hopper cost toolkit (tools/hopper/): report, ratchet, compile sweep, MFU arithmetic.

Unit tests on handmade inputs (SASS text, cost numbers, reports) run in-process; the tests that
compile for sm_90 or capture the GPU's autotune configs run ``python -m tools.hopper...`` in a
subprocess with TRITON_INTERPRET unset, because this test session imports the kernels under the
interpreter (see conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.hopper import cost_model, evaluate, launch_capture, mfu, peft_bnb, ratchet, sass, trip_count, ttir
from tools.hopper.cost_model import KernelCost, predict_launch
from tools.hopper.ops import REGISTRY, all_ops
from tools.hopper.sm90 import KernelSpec
from tools.hopper.sweep import classify, contraction_check_applies

ROOT = Path(__file__).resolve().parents[1]

# -- SASS parsing --------------------------------------------------------------------------------


def _line(addr: int, text: str) -> str:
    return f"        /*{addr:04x}*/                   {text} ;                /* 0x000000000000794d */"


# A kernel with a prologue, a K-loop (HGMMA, a drained wgmma wait, a spill), an epilogue loop with
# one HMMA, EXIT and the padding self-branch + NOPs.
_PROGRAM = [
    "MOV R1, c[0x0][0x28]",  # 0x00
    "S2R R0, SR_CTAID.X",  # 0x10
    "LDGSTS.E.BYPASS.128 [R3], desc[UR14][R24.64]",  # 0x20
    # K-loop: 0x30 .. 0x90
    "LDS R4, [R2]",  # 0x30
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24",  # 0x40
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0",  # 0x50
    "WARPGROUP.DEPBAR.LE gsb0, 0x0",  # 0x60
    "STL [R1], R5",  # 0x70
    "IADD3 R6, R6, 0x1, RZ",  # 0x80
    "@P0 BRA 0x30",  # 0x90
    # epilogue loop: 0xa0 .. 0xc0
    "HMMA.16816.F32.BF16 R8, R12, R16, R8",  # 0xa0
    "ISETP.GE.AND P1, PT, R6, R7, PT",  # 0xb0
    "@!P1 BRA 0xa0",  # 0xc0
    "STG.E desc[UR4][R2.64], R8",  # 0xd0
    "EXIT",  # 0xe0
    "BRA 0xf0",  # 0xf0: the padding self-branch
    "NOP",  # 0x100
]
SYNTHETIC_SASS = "\n".join(
    ["\tcode for sm_90", "\t\tFunction : kernel", *(_line(16 * i, t) for i, t in enumerate(_PROGRAM))]
)


def test_sass_parser_finds_the_kloop_wait_depth_and_spills():
    summary = sass.summarize(SYNTHETIC_SASS, num_warps=8)
    assert summary.n_loops == 2  # the padding BRA-to-itself is not a loop
    assert summary.kloop_range == (0x30, 0x90)  # the HGMMA loop beats the single-HMMA loop
    assert summary.kloop_instr == 7
    assert summary.body_instr == 15  # no NOP, no self-branch
    assert summary.wgmma_wait == 0
    assert summary.kloop_spill_ops == 1 and summary.spill_ops == 1
    assert summary.hgmma and summary.hmma and summary.cp_async and not summary.tma
    # two HGMMA 64x128x16 per warpgroup, 8 warps = 2 warpgroups
    assert summary.kloop_mma_flops == 2 * (2 * 64 * 128 * 16) * 2
    assert summary.other_mma_flops == 2 * 16 * 8 * 16 * 8  # the HMMA, once per warp
    assert summary.has_loop


def test_sass_parser_loop_free_and_no_mma_kernels():
    program = ["LDG.E R2, desc[UR4][R4.64]", "FMUL R2, R2, R3", "STG.E desc[UR4][R6.64], R2", "EXIT", "BRA 0x40"]
    body = "\n".join(_line(16 * i, t) for i, t in enumerate(program))
    summary = sass.summarize(body, num_warps=4)
    assert not summary.has_loop and summary.kloop_instr == summary.body_instr == 4
    assert summary.wgmma_wait is None and summary.kloop_mma_flops == 0 and not summary.hgmma


def test_sass_wait_depth_is_the_smallest_in_the_loop():
    program = ["HGMMA.64x64x16.F32.BF16 R0, gdesc[UR4], R0, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x1",
               "WARPGROUP.DEPBAR.LE gsb0, 0x2", "@P0 BRA 0x0", "EXIT"]  # fmt: skip
    summary = sass.summarize("\n".join(_line(16 * i, t) for i, t in enumerate(program)), num_warps=4)
    assert summary.wgmma_wait == 1 and summary.kloop_instr == 4


def test_res_usage_parser():
    text = " Function matmul_kernel:\n  REG:122 STACK:56 SHARED:1024 LOCAL:0 CONSTANT[0]:592 TEXTURE:0"
    assert sass.parse_res_usage(text) == {"REG": 122, "STACK": 56, "SHARED": 1024, "LOCAL": 0}
    with pytest.raises(ValueError):
        sass.parse_res_usage("nothing here")


# -- cost model ----------------------------------------------------------------------------------


def _cost(**overrides) -> KernelCost:
    base = dict(num_warps=8, regs=128, smem=96 * 1024, kloop_instr=100, other_instr=0, kloop_mma_flops=2 * 128**2 * 64,
                other_mma_flops=0, trips=64, wgmma_wait=1)  # fmt: skip
    return KernelCost(**(base | overrides))


def test_occupancy_limits():
    assert cost_model.ctas_per_sm(8, 128, 96 * 1024) == 2  # smem: 2 × 97 KB of 228 KB; regs: 2 × 32 K
    assert cost_model.ctas_per_sm(8, 129, 0) == 1  # 136 regs (granule 8) × 256 threads > 32 K
    assert cost_model.ctas_per_sm(4, 32, 0) == 16  # threads: 2048 / 128
    assert cost_model.ctas_per_sm(1, 16, 0) == 32  # the block limit
    assert cost_model.ctas_per_sm(4, 32, 228 * 1024) == 0  # above 227 KB per block


def test_mma_bound_launch_matches_the_dense_floor():
    # The tutorial tile: 128x128x64 per trip, 64 trips, 1024 CTAs, 2 CTAs/SM, issue well below MMA.
    pred = predict_launch(_cost(), (1024, 1, 1), bytes_moved=0)
    assert pred.bound == "mma" and pred.ctas_per_sm == 2 and pred.waves == 4
    floor_us = 2 * 4096**3 / cost_model.H200.bf16_flops_per_s * 1e6
    assert 1.0 <= pred.predicted_us / floor_us <= 1.05  # only the 3.9 -> 4 waves quantisation


def test_issue_bound_launch():
    pred = predict_launch(_cost(kloop_instr=2000), (1024, 1, 1), bytes_moved=0)
    assert pred.bound == "issue"
    per_cta = 2000 * 64 * 8 / 4
    assert pred.compute_us == pytest.approx(8 * per_cta / 1.98e9 * 1e6)  # 8 CTAs per SM, 2 at a time


def test_drained_wgmma_with_one_cta_per_sm_serialises():
    cost = _cost(smem=150 * 1024, wgmma_wait=0, kloop_instr=400)  # one CTA fits
    serial = predict_launch(cost, (132, 1, 1), 0)
    overlapped = predict_launch(_cost(smem=150 * 1024, wgmma_wait=1, kloop_instr=400), (132, 1, 1), 0)
    assert serial.bound == "serial" and serial.ctas_per_sm == 1
    lone = serial.fill_cycles + serial.epilogue_cycles  # a lone CTA also pays its fill and epilogue
    assert serial.compute_us == pytest.approx((serial.issue_cycles + serial.mma_cycles + lone) / 1.98e9 * 1e6)
    steady = max(overlapped.issue_cycles, overlapped.mma_cycles)
    assert overlapped.compute_us == pytest.approx((steady + lone) / 1.98e9 * 1e6)
    # Two resident CTAs overlap one's instructions with the other's MMA even when each drains.
    two = predict_launch(_cost(wgmma_wait=0, kloop_instr=400), (264, 1, 1), 0)
    assert two.ctas_per_sm == 2 and two.bound != "serial"


def test_memory_bound_and_roofline():
    pred = predict_launch(_cost(trips=1), (132, 1, 1), bytes_moved=int(4.3e9))  # 4.3 GB at 4.3 TB/s = 1 ms
    assert pred.bound == "memory" and pred.predicted_us == pytest.approx(1000.0)
    assert cost_model.roofline_us(790e12, 0) == pytest.approx(1e6)
    assert cost_model.roofline_us(1.0, 4.3e12) == pytest.approx(1e6)


# -- the cost terms of issue #24: shared memory, gathers, L2, fill + epilogue, launch gaps ------------


def test_smem_bytes_from_instruction_widths_and_hgmma_operands():
    instr = lambda op, operands="": sass.Instr(0, op, operands)
    w = 8  # warps: 2 warpgroups
    assert sass.smem_bytes(instr("LDGSTS.E.BYPASS.128"), w) == 16 * 32 * 8
    assert sass.smem_bytes(instr("LDGSTS.E.64"), w) == 8 * 32 * 8
    assert sass.smem_bytes(instr("LDGSTS.E"), w) == 4 * 32 * 8
    assert sass.smem_bytes(instr("STS.U16"), w) == 2 * 32 * 8
    assert sass.smem_bytes(instr("LDS.U8"), w) == 1 * 32 * 8
    assert sass.smem_bytes(instr("LDSM.16.M88.4"), w) == 512 * 8
    assert sass.smem_bytes(instr("LDSM.16.M88.2"), w) == 256 * 8
    assert sass.smem_bytes(instr("LDSM.16.M88"), w) == 128 * 8
    assert sass.smem_bytes(instr("STG.E.128"), w) == 0 and sass.store_bytes(instr("STG.E.128"), w) == 16 * 32 * 8
    # wgmma: B (n×k) per warpgroup; A (m×k) too when it is a shared-memory descriptor
    both = instr("HGMMA.64x128x16.F32.BF16", "R24, gdesc[UR8].tnspB, R24")
    a_in_regs = instr("HGMMA.64x128x16.F32.BF16", "R24, R100, gdesc[UR8], R24")
    assert sass.smem_bytes(both, w) == (64 * 16 + 128 * 16) * 2 * 2
    assert sass.smem_bytes(a_in_regs, w) == 128 * 16 * 2 * 2
    # the synthetic kernel: per warp LDS 4 B and two HGMMAs from descriptors in the loop; the
    # prologue's LDGSTS outside; the epilogue's STG.E (4 B) outside
    summary = sass.summarize(SYNTHETIC_SASS, num_warps=8)
    assert summary.kloop_smem_bytes == 4 * 32 * 8 + 2 * (64 * 16 + 128 * 16) * 2 * 2
    assert summary.other_smem_bytes == 16 * 32 * 8
    assert summary.store_bytes == 4 * 32 * 8


_TTIR = """
module {
  tt.func public @k(%w_ptr: !tt.ptr<i8> {tt.divisibility = 16 : i32} loc("w_ptr"(#loc)), %pair_ptr: !tt.ptr<i64> loc("pair_ptr"(#loc)), %x_ptr: !tt.ptr<bf16> loc("x_ptr"(#loc)), %K: i32) {
    %b = tt.splat %x_ptr : !tt.ptr<bf16> -> tensor<16x64x!tt.ptr<bf16>> loc(#loc1)
    %bias = tt.load %b : tensor<16x64x!tt.ptr<bf16>> loc(#loc1)
    %acc_5 = scf.for %k0 = %c0_i32 to %K step %c64_i32 iter_args(%acc = %cst) -> (tensor<128x16xf32>)  : i32 {
      %p = tt.splat %w_ptr : !tt.ptr<i8> -> tensor<128x32x!tt.ptr<i8>> loc(#loc2)
      %packed = tt.load %p : tensor<128x32x!tt.ptr<i8>> loc(#loc2)
      %idx = arith.extui %packed : tensor<128x32xi8> to tensor<128x32xi32> loc(#loc3)
      %t = tt.splat %pair_ptr : !tt.ptr<i64> -> tensor<128x32x!tt.ptr<i64>> loc(#loc3)
      %t_1 = tt.addptr %t, %idx : tensor<128x32x!tt.ptr<i64>>, tensor<128x32xi32> loc(#loc3)
      %pair = tt.load %t_1 : tensor<128x32x!tt.ptr<i64>> loc(#loc3)
      %x = tt.load %b : tensor<64x16x!tt.ptr<bf16>> loc(#loc4)
      %acc_2 = tt.dot %w, %x, %acc, inputPrecision = tf32 : tensor<128x64xbf16> * tensor<64x16xbf16> -> tensor<128x16xf32> loc(#loc5)
      scf.yield %acc_2 : tensor<128x16xf32> loc(#loc5)
    } loc(#loc6)
    tt.return loc(#loc7)
  } loc(#loc)
} loc(#loc)
"""  # noqa: E501


def test_ttir_finds_the_pair_table_gather_and_the_loads_per_trip():
    summary = ttir.summarize(_TTIR)
    # packed bytes 128×32 and the X tile 64×16 bf16 per trip; the bias tile once; the gather is no L2 load
    assert summary.kloop_load_bytes == 128 * 32 + 64 * 16 * 2
    assert summary.other_load_bytes == 16 * 64 * 2
    (gather,) = summary.gathers
    assert gather == ttir.Gather("pair_ptr", 128 * 32, 8, True)
    # 2 KB table = 16 lines: 128 warp-wide gathers × 16 wavefronts; an unknown table: the 32-line cap
    assert ttir.gather_wavefronts(gather, 256 * 8) == 128 * 16
    assert ttir.gather_wavefronts(gather, None) == 128 * 32
    assert ttir.gather_wavefronts(gather, 64) == 128  # a 16-entry fp32 code table: one line


_ROW_GATHER_TTIR = """
module {
  tt.func public @k(%x_ptr: !tt.ptr<bf16> loc("x_ptr"(#loc)), %rows_ptr: !tt.ptr<i32> loc("rows_ptr"(#loc)), %K: i32) {
    %r = tt.splat %rows_ptr : !tt.ptr<i32> -> tensor<64x!tt.ptr<i32>> loc(#loc1)
    %rows = tt.load %r : tensor<64x!tt.ptr<i32>> loc(#loc1)
    %rows_2 = tt.expand_dims %rows {axis = 1 : i32} : tensor<64xi32> -> tensor<64x1xi32> loc(#loc2)
    %rows_3 = arith.muli %rows_2, %K_s : tensor<64x1xi32> loc(#loc2)
    %rows_4 = tt.broadcast %rows_3 : tensor<64x1xi32> -> tensor<64x128xi32> loc(#loc2)
    %acc_5 = scf.for %k0 = %c0_i32 to %K step %c128_i32 iter_args(%acc = %cst) -> (tensor<64x16xf32>)  : i32 {
      %o = arith.addi %rows_4, %offs_k : tensor<64x128xi32> loc(#loc3)
      %p = tt.splat %x_ptr : !tt.ptr<bf16> -> tensor<64x128x!tt.ptr<bf16>> loc(#loc3)
      %p_1 = tt.addptr %p, %o : tensor<64x128x!tt.ptr<bf16>>, tensor<64x128xi32> loc(#loc3)
      %x = tt.load %p_1 : tensor<64x128x!tt.ptr<bf16>> loc(#loc3)
      %q = tt.addptr %p, %x2 : tensor<64x128x!tt.ptr<bf16>>, tensor<64x128xi32> loc(#loc4)
      %x2 = arith.fptosi %x : tensor<64x128xbf16> to tensor<64x128xi32> loc(#loc4)
      %y = tt.load %q : tensor<64x128x!tt.ptr<bf16>> loc(#loc4)
      %acc_2 = tt.dot %x, %a, %acc, inputPrecision = tf32 : tensor<64x128xbf16> * tensor<128x16xbf16> -> tensor<64x16xf32> loc(#loc5)
      scf.yield %acc_2 : tensor<64x16xf32> loc(#loc5)
    } loc(#loc6)
    tt.return loc(#loc7)
  } loc(#loc)
} loc(#loc)
"""  # noqa: E501


def test_ttir_row_gathers_are_loads_and_element_gathers_are_not():
    summary = ttir.summarize(_ROW_GATHER_TTIR)
    # x[rows[:, None] * K + offs_k]: the index is per row ([64] for a [64, 128] tile), so each row is
    # a contiguous run: its bytes count as a load per trip; the [64] index load itself counts once.
    # y's offsets come from x's own [64, 128] values: one address per element, a gather.
    assert summary.kloop_load_bytes == 64 * 128 * 2
    assert summary.other_load_bytes == 64 * 4
    (gather,) = summary.gathers
    assert gather == ttir.Gather("x_ptr", 64 * 128, 2, True)


def test_smem_bound_shares_the_sm_and_gathers_add_to_it():
    base = _cost(kloop_smem_bytes=0)
    heavy = _cost(kloop_smem_bytes=2000 * 128)  # 2,000 cycles a trip against 1,387 MMA cycles
    assert predict_launch(base, (1024, 1, 1), 0).bound == "mma"
    pred = predict_launch(heavy, (1024, 1, 1), 0)
    assert pred.bound == "smem" and pred.smem_cycles == 2000 * 64
    assert pred.compute_us == pytest.approx(4 * 2 * 2000 * 64 / 1.98e9 * 1e6)  # 4 groups of 2 resident CTAs
    gathered = predict_launch(_cost(kloop_gather_wavefronts=2000), (1024, 1, 1), 0)
    assert gathered.bound == "smem" and gathered.gather_cycles == gathered.smem_cycles == 2000 * 64


def test_l2_bound_counts_every_ctas_tiles():
    # 1024 CTAs × 64 trips × 32 KB (a 128×64 and a 64×128 bf16 tile) = 2.15 GB at the L2 rate
    pred = predict_launch(_cost(kloop_load_bytes=32 * 1024), (1024, 1, 1), bytes_moved=0)
    assert pred.l2_bytes == 1024 * 64 * 32 * 1024
    assert pred.l2_us == pytest.approx(pred.l2_bytes / cost_model.H200.l2_bytes_per_s * 1e6)
    assert pred.bound == "l2" and pred.predicted_us == pytest.approx(pred.l2_us)


def test_fill_and_epilogue_only_for_a_lone_cta():
    lone = _cost(smem=150 * 1024, num_stages=3, has_loop=True, store_bytes=32 * 1024)  # one CTA fits
    pred = predict_launch(lone, (264, 1, 1), 0)  # two waves of one CTA per SM
    latency = cost_model.H200.load_latency_cycles
    assert pred.fill_cycles == 2 * latency and pred.lone_groups == 2
    assert pred.epilogue_cycles == pytest.approx(32 * 1024 / cost_model.H200.l2_bytes_per_sm_clock)
    steady = max(pred.issue_cycles, pred.mma_cycles)
    assert pred.compute_us == pytest.approx(2 * (steady + pred.fill_cycles + pred.epilogue_cycles) / 1.98e9 * 1e6)
    shared = predict_launch(_cost(num_stages=3, has_loop=True, store_bytes=32 * 1024), (264, 1, 1), 0)
    assert shared.ctas_per_sm == 2 and shared.lone_groups == 0  # two resident CTAs hide each other's fill
    assert shared.compute_us == pytest.approx(2 * shared.mma_cycles / 1.98e9 * 1e6)


def test_launch_gaps_between_dependent_launches():
    assert cost_model.launch_gaps_us(1) == 0.0
    assert cost_model.launch_gaps_us(5) == pytest.approx(4 * 1.5)  # decode: five dependent launches


def test_op_prediction_adds_launch_gaps_and_the_peft_bnb_baseline():
    from tools.hopper.ops import qlora_decode

    case = qlora_decode(16)
    library = launch_capture.Launch("library", "torch.sum", flops=0.0, bytes=int(4.3e6))  # 1 µs each
    op = evaluate.op_object(case, [library, library, library], {})
    assert op["launch_gaps_us"] == pytest.approx(3.0) and op["predicted_us"] == pytest.approx(6.0)
    layer = peft_bnb.layer_for(case)
    assert op["peft_bnb_us"] == pytest.approx(layer.predicted_us, abs=1e-3)
    assert op["speedup_vs_peft_bnb"] == pytest.approx(layer.predicted_us / 6.0, rel=1e-3)


def test_peft_bnb_layer_launches():
    elem, n, k, m, r = 2, 4096, 4096, 4096, 16
    steps = peft_bnb.forward(m, n, k, r, 0.1, elem, double_quant=True, grad=True)
    names = [s.name for s in steps]
    assert names[:4] == ["bnb dequantize_blockwise (absmax)", "absmax += offset", "bnb dequantize_4bit",
                         "cuBLAS X·deq(W)ᵀ"]  # fmt: skip
    assert "dropout (+ mask)" in names and names[-3:] == ["lora_B", "× scaling", "result + lora"]
    gemm = steps[3]
    assert gemm.us() == pytest.approx(2 * m * n * k / 790e12 * 1e6)  # cuBLAS at the 790 TFLOP/s roofline
    layer = peft_bnb.Layer(tuple(steps))
    assert layer.predicted_us == pytest.approx(sum(s.us() for s in steps) + 1.5 * (len(steps) - 1))
    # decode at M = 1 without grad: bitsandbytes' GEMV, no deq(W) written; no dropout at p = 0
    decode = [s.name for s in peft_bnb.forward(1, n, k, r, 0.0, elem, double_quant=True, grad=False)]
    assert "bnb gemv_4bit" in decode and "bnb dequantize_4bit" not in decode and "dropout (+ mask)" not in decode
    backward = [s.name for s in peft_bnb.backward(m, n, k, r, 0.1, elem, double_quant=True)]
    assert backward.count("bnb dequantize_4bit") == 1 and "cuBLAS dY·deq(W)" in backward and len(backward) == 11


# -- ratchet -------------------------------------------------------------------------------------


def _report(ratios: dict[str, float], stack: int = 0) -> dict:
    ops = []
    for name, ratio in ratios.items():
        launch = {"kernel": "m:k", "signature": {"x": "*bf16"}, "spill_bytes": stack, "has_loop": True,
                  "loop_trips": 64}  # fmt: skip
        ops.append({"id": name, "op": name, "M": 1, "N": 1, "K": 1, "ratio": ratio, "launches": [launch]})
    return {"ops": ops}


def test_ratchet_fails_only_beyond_the_tolerance():
    base = _report({"a": 1.00, "b": 2.00})
    assert ratchet.compare(_report({"a": 1.029, "b": 2.0}), base)[0] == []
    failures, _ = ratchet.compare(_report({"a": 1.031, "b": 2.0}), base)
    assert len(failures) == 1 and failures[0].startswith("a:")


def test_ratchet_notes_new_and_improved_ops_and_fails_spills():
    failures, notes = ratchet.compare(_report({"a": 0.5, "new": 3.0}), _report({"a": 1.0}))
    assert failures == []
    assert any(n.startswith("new:") and "not in the baseline" in n for n in notes)
    assert any(n.startswith("a:") and "improved" in n for n in notes)
    failures, _ = ratchet.compare(_report({"a": 1.0}, stack=56), _report({"a": 1.0}))
    assert len(failures) == 1 and "spills" in failures[0]


def test_recompile_mismatches():
    launch = {"kernel": "m:k", "kloop_instr_per_warp": 100, "regs": 128, "smem": 1024}
    same = {"error": None, "sass": {"kloop_instr": 109}, "regs": 128, "smem": 1024}
    assert ratchet.recompile_mismatches(launch, same) == []
    worse = {"error": None, "sass": {"kloop_instr": 111}, "regs": 130, "smem": 2048}
    problems = ratchet.recompile_mismatches(launch, worse)
    assert len(problems) == 3 and "K-loop" in problems[0] and "registers" in problems[1]
    assert ratchet.recompile_mismatches(launch, {"error": "boom"}) == ["m:k: does not compile: boom"]


# -- launch capture -------------------------------------------------------------------------------


def test_capture_records_library_calls_on_fake_cuda_tensors():
    import torch

    seen = {}

    def call():
        a = torch.empty(64, 32, dtype=torch.bfloat16, device="cuda")
        b = torch.empty(32, 16, dtype=torch.bfloat16, device="cuda")
        seen["device"] = a.device.type
        seen["sms"] = torch.cuda.get_device_properties(a.device).multi_processor_count
        out = torch.empty(64, 16, dtype=torch.bfloat16, device=a.device)  # allocation: no launch
        out.addmm_(a, b, beta=0, alpha=2.0)
        a.t()  # a view: no launch
        a.float().sum(0)
        out.addmm_(a, b)  # beta = 1: C is read, then written
        out.fill_(0.0)  # write only

    launches = launch_capture.record(call)
    assert seen == {"device": "cuda", "sms": 132}
    kernels = ["torch.addmm_", "torch._to_copy", "torch.sum", "torch.addmm_", "torch.fill_"]
    assert [la.kernel for la in launches] == kernels
    mm, cast, total, accumulate, fill = launches
    assert mm.flops == 2 * 64 * 32 * 16 and mm.bytes == 2 * (64 * 32 + 32 * 16 + 64 * 16)
    assert accumulate.bytes == mm.bytes + 2 * 64 * 16 and fill.bytes == 2 * 64 * 16
    assert cast.flops == 0 and cast.bytes == 64 * 32 * (2 + 4)
    assert total.bytes == 64 * 32 * 4 + 32 * 4


# -- trip counts -----------------------------------------------------------------------------------


def test_trip_counts_from_the_kernel_source():
    import triton
    import triton.language as tl

    @triton.jit
    def _mma(a, b, acc):
        return tl.dot(a, b, acc)

    @triton.jit
    def _kernel(x_ptr, K, k_slice, BLOCK_K: tl.constexpr, HAS_TAIL: tl.constexpr):
        split = tl.program_id(1)
        k_start = split * k_slice
        acc = tl.zeros((16, 16), dtype=tl.float32)
        for k0 in range(k_start, tl.minimum(k_start + k_slice, K), BLOCK_K):
            a = tl.load(x_ptr + k0 + tl.arange(0, 16)[:, None] + tl.arange(0, 16)[None, :])
            acc = _mma(a, a, acc)
        if HAS_TAIL:
            for _r in range(0, tl.cdiv(K, 1024)):
                acc = tl.dot(a, a, acc)
        for _i in range(0, 3):
            acc += 1.0
        tl.store(x_ptr + tl.arange(0, 16)[:, None] + tl.arange(0, 16)[None, :], acc)

    args = {"x_ptr": None, "K": 4096, "k_slice": 832, "BLOCK_K": 32, "HAS_TAIL": True}
    trips, loop = trip_count.main_loop(_kernel, args, (32, 5, 1))
    assert trips == 26 and loop.has_dot and "k_slice" in loop.source
    found = trip_count.loops(_kernel, args, (32, 5, 1))
    assert sorted(lp.trips for lp in found) == [3, 4, 26]

    @triton.jit
    def _unknown(x_ptr, BLOCK: tl.constexpr):
        n = tl.load(x_ptr)
        acc = tl.zeros((16, 16), dtype=tl.float32)
        for _i in range(0, n):
            a = tl.load(x_ptr + tl.arange(0, 16)[:, None] + tl.arange(0, 16)[None, :])
            acc = tl.dot(a, a, acc)
        tl.store(x_ptr + tl.arange(0, 16)[:, None] + tl.arange(0, 16)[None, :], acc)

    with pytest.raises(trip_count.TripCountError, match="TRIP_OVERRIDES"):
        trip_count.main_loop(_unknown, {"x_ptr": None, "BLOCK": 16}, (1, 1, 1))


def test_two_pass_kernels_cost_every_mma_loop_with_its_trips():
    """A kernel with two dot loops in a row: each SASS MMA loop gets the trips of its source loop."""
    import triton
    import triton.language as tl

    @triton.jit
    def _two_pass(x_ptr, D, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        acc = tl.zeros((16, 16), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            a = tl.load(x_ptr + k0 + tl.arange(0, 16)[:, None] + tl.arange(0, 16)[None, :])
            acc = tl.dot(a, a, acc)
        for n0 in range(0, D, BLOCK_N):
            b = tl.load(x_ptr + n0 + tl.arange(0, 16)[:, None] + tl.arange(0, 16)[None, :])
            tl.store(x_ptr + n0 + tl.arange(0, 16)[:, None] + tl.arange(0, 16)[None, :], tl.dot(acc.to(b.dtype), b))

    from types import SimpleNamespace

    cand = SimpleNamespace(args={"x_ptr": None, "D": 4096, "BLOCK_K": 64, "BLOCK_N": 128}, grid=(128, 1, 1))

    # SASS: two innermost MMA loops in address order, (instructions, MMA FLOPs per trip); the K-loop
    # (the one the cost model multiplies) is the second.
    summary = {"has_loop": True, "mma_loops": [(100, 1000), (300, 4000)], "kloop_index": 1}
    trips, extra_instr, extra_flops, per_loop = evaluate._other_mma_loops(_two_pass, cand, summary, 64)
    assert per_loop == [64, 32] and trips == 32
    assert extra_instr == 100 * 63 and extra_flops == 1000 * 63  # the first loop's other 63 trips
    # A SASS that does not show one loop per source dot loop (say, one was unrolled) changes nothing.
    one = {"has_loop": True, "mma_loops": [(300, 4000)], "kloop_index": 0}
    assert evaluate._other_mma_loops(_two_pass, cand, one, 32) == (32, 0, 0, [])


# -- the registry, the sweep's pure parts, the MFU arithmetic -------------------------------------------


def test_registry_keeps_the_report_ops_and_their_order():
    """The baselines key ops by id: the registry must give the report the same ops, in the same order."""
    ids = [case.id for case in all_ops()]
    assert ids[:17] == [
        "dense_tutorial_gemm M=4096 N=4096 K=4096",
        "qlora_forward M=512 N=4096 K=4096",
        "qlora_forward M=4096 N=4096 K=4096",
        "qlora_forward M=4096 N=14336 K=4096",
        "qlora_forward M=4096 N=4096 K=14336",
        "dequant_then_cublas M=512 N=4096 K=4096",
        "dequant_then_cublas M=4096 N=4096 K=4096",
        "dequant_then_cublas M=4096 N=14336 K=4096",
        "dequant_then_cublas M=4096 N=4096 K=14336",
        "qlora_backward M=512 N=4096 K=4096",
        "qlora_backward M=4096 N=4096 K=4096",
        "qlora_decode M=1 N=4096 K=4096",
        "qlora_decode M=16 N=4096 K=4096",
        "nf4_dequantize M=0 N=4096 K=4096",
        "ia3_forward M=4096 N=4096 K=4096",
        "adapter_forward M=4096 N=4096 K=4096",
        "rms_norm_forward M=4096 N=4096 K=4096",
    ]
    assert len(set(ids)) == len(ids) and len({e.name for e in REGISTRY}) == len(REGISTRY)
    # Every sweep case of every dtype is an op the registry builds (no launcher runs here).
    sweep = [case for entry in REGISTRY for dtype in ("fp32", "fp16", "bf16") for case in entry.sweep(dtype)]
    assert {case.dtype for case in sweep} == {"fp32", "fp16", "bf16"}
    assert {case.base for case in sweep} >= {"dense", "nf4", "nf4dq"}


def test_sweep_classifies_skips_and_the_contraction_check():
    assert classify(100_000, None) == "OK"
    assert classify(240_000, None) == "SKIP"  # more than 227 KB: the autotuner drops it at launch
    assert classify(None, "OutOfResources: out of resource: shared memory") == "SKIP"
    assert classify(None, "CompilationError: boom") == "FAIL"
    spec = lambda options, constexprs: KernelSpec("m:k", {}, constexprs, [], options)
    assert contraction_check_applies(spec({"enable_fp_fusion": False}, {"DOT_PRECISION": "tf32"}))
    assert contraction_check_applies(spec({"enable_fp_fusion": False}, {"OUT_KIND": 2}))  # the dequant kernel
    assert not contraction_check_applies(spec({"enable_fp_fusion": False}, {"DOT_PRECISION": "ieee"}))  # fp32 dots
    assert not contraction_check_applies(spec({}, {"DOT_PRECISION": "tf32"}))


def test_mfu_arithmetic_on_a_hand_computed_decoder():
    # 2 layers, hidden 64, 4 query heads and 2 kv heads of 16, MLP 128, vocabulary 100, T = 32.
    shape = mfu.DecoderShape("tiny", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=100)
    # per layer: q 64·64 + k, v 64·32 each + o 64·64 = 12,288; MLP 3·64·128 = 24,576; head 64·100 = 6,400
    assert shape.layer_matmul_params() == 36_864
    assert shape.matmul_params() == 2 * 36_864 + 6_400 == 80_128
    # LoRA r=4: 4·[(64+64) + (64+32)·2 + (64+64) + (64+128)·2 + (128+64)] = 4·1,024 per layer
    assert shape.lora_params(4) == 2 * 4_096 == 8_192
    assert shape.attention_flops_per_token(32) == 12 * 2 * 64 * 32 == 49_152
    full = mfu.full_finetune_flops(shape, seq=32, batch=2)
    assert full.model_per_token == 6 * 80_128 + 49_152 == 529_920  # nanoGPT's 6N + 12·L·H·Q·T
    assert full.model == 64 * 529_920
    lora = mfu.lora_flops(shape, seq=32, rank=4)
    assert lora.model_per_token == 4 * 80_128 + 6 * 8_192 + 49_152 == 418_816  # base backward 2N, not 4N
    # checkpointing recomputes every layer's forward: 2·(layer weights + LoRA) + 4·L·d·T
    assert lora.recompute_per_token == 2 * (2 * 36_864 + 8_192) + 16_384 == 180_224
    assert lora.floor_s(True) == pytest.approx(32 * (418_816 + 180_224) / 790e12)
    assert mfu.mfu(1e9, 790e3) == pytest.approx(1.0)


# -- end to end: one small kernel compiled for sm_90 -------------------------------------------------


_JIT_CHECK = """
import json, sys
import torch
from tools.hopper import sm90
launch = json.load(open(sys.argv[1]))["ops"][0]["launches"][0]
spec = sm90.KernelSpec.from_json(launch)
args = {n: sm90.PointerStub(torch.bfloat16) for n in ("a_ptr", "b_ptr", "c_ptr")}
args |= dict(M=4096, N=4096, K=4096, stride_am=4096, stride_bk=4096, stride_cm=4096) | spec.constexprs
jit = sm90.jit_compile(sm90.resolve(spec.kernel), args, spec.options)
print("same cubin" if jit.asm["cubin"] == sm90.compile_spec(spec).asm["cubin"] else "different cubin")
"""


def _python(*args: str) -> subprocess.CompletedProcess:
    """``python *args`` from the repository root (``tools`` importable) with the compiler, not the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@pytest.mark.skipif(not _cuobjdump().exists(), reason="Triton's cuobjdump is missing: cannot read SASS")
def test_report_json_contract_and_recompile_round_trip(tmp_path):
    """The tutorial GEMM alone: report keys, calibration ratio, and --recompile from the report's spec."""
    run = lambda *a: _python("-m", "tools.hopper.report", *a)
    out = run("--out", str(tmp_path), "--ops", "dense_tutorial_gemm", "--jobs", "1", "--no-sass")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "hopper-report.json").read_text())
    assert {"triton", "ptxas", "target", "ceilings", "ops"} <= report.keys() and report["target"] == "cuda:90"
    assert set(report["ceilings"]) == {"clock_hz", "sms", "bf16_flops_per_s", "hbm_bytes_per_s", "copy_bytes_per_s",
                                       "smem_bytes_per_clock", "l2_bytes_per_s", "load_latency_cycles",
                                       "launch_gap_s"}  # fmt: skip
    (op,) = report["ops"]
    op_keys = {"op", "M", "N", "K", "r", "dtype", "base", "dropout", "floor_us", "predicted_us", "ratio", "launches"}
    assert op_keys <= op.keys()
    (launch,) = op["launches"]
    launch_keys = {"kernel", "signature", "constexprs", "divisible_by_16", "num_warps", "num_stages", "options", "grid",
                   "loop_trips", "ctas_per_sm", "regs", "spill_bytes", "smem", "hgmma", "kloop_instr_per_warp",
                   "predicted_us"}  # fmt: skip
    assert launch_keys <= launch.keys()
    assert launch["kernel"] == "tools.hopper.tutorial_gemm:matmul_kernel" and launch["hgmma"]
    assert launch["loop_trips"] == 64
    # The JIT's specialisation: strides of 1 become constexprs, multiples of 16 get the hint.
    assert launch["constexprs"]["stride_ak"] == 1 and "K" in launch["divisible_by_16"]
    # 128×128 tiles re-read A and B: 2.15 GB from L2 (a lead of 10.75 TB/s) bound it above the MMA time.
    assert launch["bound"] == "l2" and 1.0 <= op["ratio"] <= 1.2
    assert (tmp_path / "hopper-report.md").read_text().startswith("# Static Hopper")

    # The spec compiles to the very cubin the JIT's own path (JITFunction.warmup) builds.
    jit = _python("-c", _JIT_CHECK, str(tmp_path / "hopper-report.json"))
    assert jit.returncode == 0 and jit.stdout.strip() == "same cubin", jit.stdout + jit.stderr
    # Recompiling from the report's own spec gives the same binary; a tampered report is caught, and
    # a report another Triton wrote is refused before anything is compiled (its SASS differs anyway).
    launch["regs"] += 1
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(report))
    other = tmp_path / "other-triton.json"
    other.write_text(json.dumps(report | {"triton": "3.0.0"}))
    check = run("--recompile", str(tmp_path / "hopper-report.json"), str(tampered), str(other), "--jobs", "1")
    assert check.returncode == 1, check.stdout + check.stderr
    assert "hopper-report.json: 0 mismatches" in check.stdout
    assert "tampered.json: 1 mismatches" in check.stdout and "registers" in check.stdout
    assert "other-triton.json was written by triton 3.0.0" in check.stderr and "other-triton.json:" not in check.stdout


def test_sweep_jobs_are_the_launches_every_autotune_config():
    """The compile sweep's job list is what the launchers launch: here the decode forward's kernels, in fp32."""
    code = """
import importlib, json
from tools.hopper import sweep as compile_sweep
from tools.hopper.ops import qlora_forward
jobs, failures = compile_sweep.build_jobs([qlora_forward(13, 200, 256, dtype="fp32", base="nf4dq", bias=True)])
configs, listed = {}, {}
for job in jobs:
    configs.setdefault(job.kernel, []).append(job.config)
    module, _, name = job.spec.kernel.partition(":")
    listed[job.kernel] = len(getattr(getattr(importlib.import_module(module), name), "configs", [None]))
print(json.dumps({"failures": len(failures), "dtypes": sorted({j.dtype for j in jobs}), "configs": configs,
                  "listed": listed}))
"""
    out = _python("-c", code)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failures"] == 0 and result["dtypes"] == ["fp32"]
    # M = 13 over the general NF4 layout (K = 200: blocks span rows, so no one-launch decode): the
    # split-K path, H (split over K), the partial GEMV and its epilogue.
    configs = result["configs"]
    assert set(configs) == {"_lora_down_kernel", "_splitk_partial_kernel", "_splitk_epilogue_kernel"}
    assert configs["_splitk_epilogue_kernel"] == [None]  # a fixed launch: one binary
    for kernel in ("_lora_down_kernel", "_splitk_partial_kernel"):  # every config the autotuner would time
        assert 1 < len(configs[kernel]) <= result["listed"][kernel], kernel
        assert len({json.dumps(c, sort_keys=True) for c in configs[kernel]}) == len(configs[kernel])


_DIRECT_RECOMPILE = """
import json, sys
from tools.hopper import sm90
report = json.load(open(sys.argv[1]))
out = {}
for op in report["ops"]:
    for la in op["launches"]:
        if la.get("signature") is not None:
            got = sm90.analyse(sm90.KernelSpec.from_json(la))
            out[la["kernel"]] = [la["kloop_instr_per_warp"], got["sass"]["kloop_instr"], la["regs"], got["regs"]]
print(json.dumps(out))
"""


@pytest.mark.skipif(not _cuobjdump().exists(), reason="Triton's cuobjdump is missing: cannot read SASS")
def test_decode_down_projection_report_equals_a_direct_recompile(tmp_path):
    """Issue #24: the report's K-loop count of the decode down-projection (M = 16, the split-K
    candidate's) is what a direct ``triton.compile`` of its stored spec gives, in a fresh process
    that never captured a launch; so are the one-launch decode kernel's (qlora_decode M=16)."""
    out = _python("-m", "tools.hopper.report", "--out", str(tmp_path), "--ops",
                  "qlora_forward:splitk_gemv M=16,qlora_decode M=16", "--jobs", "1", "--no-sass")  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    direct = _python("-c", _DIRECT_RECOMPILE, str(tmp_path / "hopper-report.json"))
    assert direct.returncode == 0, direct.stdout + direct.stderr
    counts = json.loads(direct.stdout.strip().splitlines()[-1])
    (down,) = [v for k, v in counts.items() if k.endswith(":_lora_down_kernel")]
    assert down[0] == down[1] and down[2] == down[3], counts
    assert any(k.endswith(":_lora_decode_kernel") for k in counts), counts
    assert all(v[0] == v[1] for v in counts.values()), counts
