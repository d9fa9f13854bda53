"""Shared benchmark harness: timing, run metadata and result files.

CUDA timings use ``triton.testing.do_bench`` (clears L2 between runs, median of many);
CPU timings use ``torch.utils.benchmark.Timer.blocked_autorange``. Every result row carries
the run's metadata so a JSON file stands on its own.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def run_metadata() -> dict:
    """Device, library versions, git commit and date of this run."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name()
        if cuda
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "peft_fast": _version("peft_fast"),
        "git_commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def time_ms(fn: Callable[[], object], device: str) -> dict[str, float]:
    """Median, p20 and p80 of ``fn``'s run time in milliseconds."""
    if device == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"ms": p50, "ms_p20": p20, "ms_p80": p80}
    from torch.utils.benchmark import Timer

    measurement = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.3)
    times = sorted(measurement.times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e3
    return {"ms": measurement.median * 1e3, "ms_p20": pick(0.2), "ms_p80": pick(0.8)}


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Peak GPU memory allocated while ``fn`` runs (None on CPU, where bytes saved are reported)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def write_results(name: str, rows: list[dict], out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write ``rows`` as JSON (with metadata) and a markdown table; returns both paths."""
    meta = run_metadata()
    out_dir.mkdir(parents=True, exist_ok=True)
    device_tag = "".join(c if c.isalnum() else "-" for c in meta["device"].split("(")[0].strip()).strip("-").lower()
    stem = f"{meta['date'][:10]}-{device_tag}-{name}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps({"metadata": meta, "rows": rows}, indent=1) + "\n")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = [f"# {name} — {meta['device']}", "", ", ".join(f"{k} {v}" for k, v in meta.items() if k != "device"), ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [f"{row.get(c):.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path
