"""`peft-fast bench` on a tiny configuration: the files, their fields, and the memory claim.

The format tests run every suite's real code (both stacks: peft_fast and PEFT + bitsandbytes) on
stubbed clocks: each timed call runs once and gets a made-up, distinct time, so a test checks what
is written in a second or two instead of timing it for half a minute. The timer itself and the
quantization memory probe are measured for real elsewhere (``test_time_ms_*`` here, and
``test_streaming_quantization_peak_memory``, a slow study).
"""

from __future__ import annotations

import itertools
import json

import pytest

from peft_fast import benchmark
from peft_fast.benchmark import suites


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


@pytest.fixture
def stub_clocks(monkeypatch):
    """Tiny shapes; each timed function runs once (it must work) and gets the next made-up time;
    the quantization memory suite gets made-up peaks without writing a checkpoint or starting
    processes. Returns the list of (loader) calls of the memory probe."""
    monkeypatch.setattr(benchmark, "CPU_SHAPES", [(128, 192)])
    monkeypatch.setattr(benchmark, "CPU_M", [1, 8])
    clock = itertools.count(1)

    def time_once(fn, device, min_run_time=0.2):
        fn()
        ms = float(next(clock))
        return {"ms": ms, "ms_p20": 0.9 * ms, "ms_p80": 1.1 * ms}

    probes: list[str] = []

    def peak_rss(path, loader="peft_fast"):
        probes.append(loader)
        return {"peft_fast": 100, "bitsandbytes": 300}[loader] * 2**20

    monkeypatch.setattr(suites, "time_ms", time_once)
    monkeypatch.setattr(suites, "write_random_llama_checkpoint", lambda path, layers=12: 1000 * layers)
    monkeypatch.setattr(suites, "quantize_peak_rss", peak_rss)
    return probes


def test_time_ms_measures_a_function_with_quantiles():
    """The real CPU timer (torch.utils.benchmark): a median and p20 <= p80, in milliseconds."""
    calls = []
    timing = benchmark.time_ms(lambda: calls.append(sum(range(2000))), "cpu", min_run_time=0.02)
    assert set(timing) == {"ms", "ms_p20", "ms_p80"} and len(calls) > 2  # warm-up + the measured runs
    assert 0 < timing["ms_p20"] <= timing["ms_p80"] and 0 < timing["ms"] < 100, timing


def test_bench_writes_json_markdown_and_png_with_both_stacks(tmp_path, stub_clocks):
    rows = benchmark.run_benchmarks(quick=True)
    assert not [r for r in rows if r["op"] == "suite_error"], rows
    assert stub_clocks == ["peft_fast", "bitsandbytes"]  # each loader's peak, in its own process
    paths = benchmark.write_results(rows, tmp_path)

    data = json.loads(paths["json"].read_text())
    meta = data["metadata"]
    for key in ("device", "backend", "torch", "triton", "transformers", "peft", "bitsandbytes", "git_commit", "date"):
        assert key in meta, key
    ops = {row["op"] for row in data["rows"]}
    assert ops == {
        "nf4_dequantize",
        "lora_linear",
        "saved_for_backward",
        "train_step",
        "quantize_peak_rss",
        "step_model",
    }
    for row in data["rows"]:
        assert {"op", "impl"} <= set(row)
        if row["op"] in ("nf4_dequantize", "lora_linear", "train_step"):
            assert row["ms"] > 0 and row["ms_p20"] <= row["ms_p80"]
    linear_impls = {row["impl"] for row in data["rows"] if row["op"] == "lora_linear"}
    assert {"peft_fast qlora", "peft+bnb qlora", "peft lora", "peft_fast lora", "matmul alone"} <= linear_impls
    assert all("tflops" in row for row in data["rows"] if row["op"] == "lora_linear")
    both = {"peft_fast qlora", "peft+bnb qlora"}
    for op in ("saved_for_backward", "train_step", "step_model"):  # both stacks in every suite
        assert {row["impl"] for row in data["rows"] if row["op"] == op} == both, op
    steps = [row for row in data["rows"] if row["op"] == "train_step"]
    assert all(row["tokens_per_s"] > 0 and row["tflops"] > 0 for row in steps), steps
    modelled = {row["impl"]: row for row in data["rows"] if row["op"] == "step_model"}
    assert all(row["backend"] == "H200 roofline model" and row["seq"] == 2048 for row in modelled.values())
    assert modelled["peft_fast qlora"]["ms"] < modelled["peft+bnb qlora"]["ms"]
    quantize = {row["impl"]: row for row in data["rows"] if row["op"] == "quantize_peak_rss"}
    assert set(quantize) == {"peft_fast quantize_model", "transformers+bnb load_in_4bit"}
    ours = quantize["peft_fast quantize_model"]
    assert ours["bytes"] == 100 * 2**20 and ours["params"] == 2000 and ours["fp32_bytes"] == 8000
    markdown = paths["md"].read_text()
    assert "## lora_linear" in markdown and "peft+bnb qlora" in markdown and meta["device"] in markdown
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_saved_bytes_at_most_070_of_peft_bitsandbytes():
    """Tiny Llama, all-linear, r=16, dropout 0.05, bf16: what backward keeps, ours vs PEFT + bnb."""
    counts = benchmark.model_saved_bytes("cpu")
    ratio = counts["peft_fast qlora"] / counts["peft+bnb qlora"]
    print(f"saved for backward: peft_fast {counts['peft_fast qlora']} B, PEFT + bnb {counts['peft+bnb qlora']} B")
    assert ratio <= 0.7, counts


TIMED_FIELDS = {"op", "impl", "backend", "dtype", "ms", "ms_p20", "ms_p80", "tflops", "gb_per_s", "peak_mem_bytes"}


def test_every_timed_row_carries_the_common_fields_and_the_run_has_target_checks(tmp_path, stub_clocks):
    rows = benchmark.run_benchmarks(quick=True, suites=("dequantize", "lora_linear"))
    for row in rows:
        assert TIMED_FIELDS <= set(row), (row["op"], row["impl"], TIMED_FIELDS - set(row))
        assert row["gb_per_s"] > 0, row
    ours = [r for r in rows if r["impl"].startswith("peft_fast")]
    assert ours and all(r["backend"] == "torch-cpu" for r in ours)
    inference = {(r["impl"], r["M"]) for r in rows if r.get("phase") == "infer"}
    assert inference == {("peft_fast qlora", 1), ("peft_fast qlora", 8), ("bnb 4bit inference", 1),
                         ("bnb 4bit inference", 8)}  # fmt: skip

    data = json.loads(benchmark.write_results(rows, tmp_path)["json"].read_text())
    names = [check["target"] for check in data["targets"]]
    assert names == [name for name, _, _ in benchmark.TARGETS]
    by_name = {check["target"]: check for check in data["targets"]}
    # CPU has the M = 1 inference comparison; no M >= 512 rows and no train step in this run.
    m1 = by_name["M = 1 speed-up vs bnb 4-bit inference"]
    infer_ms = {r["impl"]: r["ms"] for r in rows if r.get("phase") == "infer" and r["M"] == 1}
    assert m1["measured"] == pytest.approx(infer_ms["bnb 4bit inference"] / infer_ms["peft_fast qlora"])
    assert m1["met"] == (m1["measured"] >= 1.5) and m1["worst_at"] == {"K": 128, "N": 192, "M": 1}
    assert by_name["QLoRA fwd speed-up vs PEFT + bnb (M >= 512)"]["measured"] is None
    assert by_name["train step speed-up vs PEFT + bnb"]["met"] is None
    assert not list(tmp_path.glob(".*.tmp")), "atomic writes leave no temporary files"


def _linear_row(impl: str, phase: str, m: int, ms: float, k: int = 64, n: int = 64) -> dict:
    return {"op": "lora_linear", "impl": impl, "phase": phase, "M": m, "K": k, "N": n, "ms": ms}


def test_target_checks_report_the_worst_case_and_whether_it_meets_the_goal():
    rows = [
        # fwd at M >= 512: ours 1.0 and 2.0 ms, GEMM 0.9 and 1.5 ms -> worst time ratio 2.0/1.5
        _linear_row("peft_fast qlora", "fwd", 512, 1.0), _linear_row("matmul alone", "fwd", 512, 0.9),
        _linear_row("peft_fast qlora", "fwd", 4096, 2.0), _linear_row("matmul alone", "fwd", 4096, 1.5),
        # PEFT + bnb fwd: speed-ups 1.8 and 2.6 -> worst 1.8, met (>= 1.3)
        _linear_row("peft+bnb qlora", "fwd", 512, 1.8), _linear_row("peft+bnb qlora", "fwd", 4096, 5.2),
        # M < 512 rows must not count toward the M >= 512 goals
        _linear_row("peft_fast qlora", "fwd", 16, 9.0), _linear_row("matmul alone", "fwd", 16, 1.0),
        {"op": "nf4_dequantize", "impl": "peft_fast triton", "K": 64, "N": 64, "M": None, "gb_per_s": 80.0},
        {"op": "nf4_dequantize", "impl": "copy (bandwidth ceiling)", "K": 64, "N": 64, "M": None, "gb_per_s": 100.0},
        {"op": "train_step", "impl": "peft_fast qlora", "model": "1B", "batch": 1, "grad_ckpt": False, "M": 2048,
         "ms": 100.0, "peak_mem_bytes": 60},
        {"op": "train_step", "impl": "peft+bnb qlora", "model": "1B", "batch": 1, "grad_ckpt": False, "M": 2048,
         "ms": 140.0, "peak_mem_bytes": 100},
    ]  # fmt: skip
    checks = {c["target"]: c for c in benchmark.target_checks(rows)}
    gemm = checks["QLoRA fwd time / bf16 GEMM time (M >= 512)"]
    assert gemm["measured"] == pytest.approx(2.0 / 1.5) and gemm["met"] is False and gemm["cases"] == 2
    assert gemm["worst_at"] == {"K": 64, "N": 64, "M": 4096}
    fwd = checks["QLoRA fwd speed-up vs PEFT + bnb (M >= 512)"]
    assert fwd["measured"] == pytest.approx(1.8) and fwd["met"] is True
    assert checks["NF4 dequantize GB/s / bf16 copy GB/s"]["measured"] == pytest.approx(0.8)
    assert checks["NF4 dequantize GB/s / bf16 copy GB/s"]["met"] is False
    assert checks["train step speed-up vs PEFT + bnb"]["measured"] == pytest.approx(1.4)
    assert checks["train step peak memory / PEFT + bnb"]["measured"] == pytest.approx(0.6)
    assert checks["train step peak memory / PEFT + bnb"]["met"] is True
    missing = checks["QLoRA fwd+bwd speed-up vs PEFT + bnb (M >= 512)"]
    assert missing["measured"] is None and missing["met"] is None and missing["cases"] == 0


def test_a_failing_suite_is_recorded_and_the_others_still_run_and_are_written(tmp_path, monkeypatch):
    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(benchmark, "bench_dequantize", out_of_memory)
    saved = {"op": "saved_for_backward", "impl": "peft_fast qlora", "scope": "layer", "bytes": 1}
    monkeypatch.setattr(benchmark, "bench_saved_bytes", lambda device: [saved])
    seen: list[list[str]] = []
    rows = benchmark.run_benchmarks(suites=("dequantize", "saved_bytes"),
                                    after_suite=lambda rows: seen.append([r["op"] for r in rows]))  # fmt: skip
    assert seen == [["suite_error"], ["suite_error", "saved_for_backward"]]
    assert rows[0]["impl"] == "dequantize" and "out of memory" in rows[0]["error"]
    assert "## suite_error" in benchmark.write_results(rows, tmp_path)["md"].read_text()
    with pytest.raises(ValueError, match=r"unknown suite.*'nope'"):
        benchmark.run_benchmarks(suites=("saved_bytes", "nope"))


def test_bench_cli_writes_after_each_suite_and_exits_1_when_a_suite_failed(tmp_path, monkeypatch, capsys):
    from peft_fast.cli import main

    written = []
    real_write = benchmark.write_results
    monkeypatch.setattr(
        benchmark, "write_results", lambda rows, out: written.append(len(rows)) or real_write(rows, out)
    )
    monkeypatch.setattr(benchmark, "bench_saved_bytes", lambda device: 1 / 0)
    assert main(["bench", "--suites", "saved_bytes", "--out", str(tmp_path)]) == 1
    assert written == [1, 1]  # after the suite, then the final write
    assert "failed suites: saved_bytes" in capsys.readouterr().err
    assert main(["bench", "--suites", "dequantize,nope", "--out", str(tmp_path)]) == 2
    assert "unknown --suites nope" in capsys.readouterr().err
