"""tools.hopper.time_ops on CPU: the GPU timing harness builds real inputs, rotates them, and puts
measurements beside the report (the kernels run under the interpreter, tiny shapes)."""

from __future__ import annotations

import pytest
import torch

from tools.hopper import cases, ops, time_ops


def test_pool_rotates_real_input_sets():
    pool = time_ops.InputPool("cpu", sets=4)
    seen = []
    for _ in range(8):
        pool.next_call()
        seen.append(pool.tensor(8, 16))
    assert len({t.data_ptr() for t in seen}) == 4  # 4 sets, reused in turn
    assert seen[0] is seen[4] and seen[0] is not seen[1]
    assert all(t.abs().sum() > 0 and t.isfinite().all() for t in seen)  # never zeros or garbage
    w = pool.nf4(32, 64)
    assert w.shape == (32, 64) and w.double_quant and w.blocksize == cases.BLOCKSIZE
    labels = pool.tensor(16, dtype=torch.int64)
    assert labels.dtype == torch.int64 and 0 <= int(labels.min()) and int(labels.max()) < 2**15


def test_time_ops_measures_each_op_and_restores_the_inputs():
    source = cases.current_inputs()
    report_ops = [
        ops.qlora_forward(17, 64, 32, 1.3),
        ops.qlora_decode(1, 64, 32),
        ops.nf4_dequantize(32, 64),
    ]
    rows = time_ops.time_ops(report_ops, "cpu", sets=4)
    assert cases.current_inputs() is source  # the meta inputs are back for the next capture
    assert [r["op"] for r in rows] == [o.id for o in report_ops]
    for row in rows:
        assert 0 < row["us_p20"] <= row["us_p80"] and row["us"] > 0
    assert "dense_mm_us" in rows[0] and "dense_mm_us" not in rows[2]  # dequantize has no GEMM (M = 0)
    report = {
        "ops": [{"op": "qlora_forward", "M": 17, "N": 32, "K": 64, "floor_us": 1.0, "predicted_us": rows[0]["us"]}]
    }
    merged = time_ops.beside_predictions(rows, report)
    assert merged[0]["measured_over_predicted"] == pytest.approx(1.0) and not merged[0]["missed_by_more_than_25pct"]
    assert merged[1]["predicted_us"] is None
    assert "| qlora_forward M=17 N=32 K=64 |" in time_ops.markdown(merged, {"device": "cpu", "sets": 4})


def test_refuses_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert time_ops.main(["--out", str(tmp_path)]) == 2
