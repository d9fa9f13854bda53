"""`peft-fast bench` on a tiny configuration: the files, their fields, and the memory claim."""

from __future__ import annotations

import json

import pytest

from peft_fast import benchmark


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


def test_bench_writes_json_markdown_and_png_with_both_stacks(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "CPU_SHAPES", [(128, 192)])
    monkeypatch.setattr(benchmark, "CPU_M", [1, 8])
    rows = benchmark.run_benchmarks(quick=True)
    paths = benchmark.write_results(rows, tmp_path)

    data = json.loads(paths["json"].read_text())
    meta = data["metadata"]
    for key in ("device", "backend", "torch", "triton", "transformers", "peft", "bitsandbytes", "git_commit", "date"):
        assert key in meta, key
    ops = {row["op"] for row in data["rows"]}
    assert ops == {"nf4_dequantize", "lora_linear", "saved_for_backward", "train_step", "quantize_peak_rss"}
    for row in data["rows"]:
        assert {"op", "impl"} <= set(row)
        if row["op"] in ("nf4_dequantize", "lora_linear", "train_step"):
            assert row["ms"] > 0 and row["ms_p20"] <= row["ms_p80"]
    linear_impls = {row["impl"] for row in data["rows"] if row["op"] == "lora_linear"}
    assert {"peft_fast qlora", "peft+bnb qlora", "peft lora", "peft_fast lora", "matmul alone"} <= linear_impls
    assert all("tflops" in row for row in data["rows"] if row["op"] == "lora_linear")
    markdown = paths["md"].read_text()
    assert "## lora_linear" in markdown and "peft+bnb qlora" in markdown and meta["device"] in markdown
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_saved_bytes_at_most_070_of_peft_bitsandbytes():
    """Tiny Llama, all-linear, r=16, dropout 0.05, bf16: what backward keeps, ours vs PEFT + bnb."""
    counts = benchmark._model_saved_bytes("cpu")
    ratio = counts["peft_fast qlora"] / counts["peft+bnb qlora"]
    print(f"saved for backward: peft_fast {counts['peft_fast qlora']} B, PEFT + bnb {counts['peft+bnb qlora']} B")
    assert ratio <= 0.7, counts
