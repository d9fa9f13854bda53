"""The benchmark harness: timing, run metadata, result rows, target checks and the JSON / markdown / PNG files."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from peft_fast.io import atomic_write
from peft_fast.ops import backend_name

# -- measuring -----------------------------------------------------------------------------


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
    device = torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": device,
        "backend": backend_name("cuda" if cuda else "cpu"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "peft_fast": _version("peft_fast"),
        "git_commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def time_ms(fn: Callable[[], object], device: str, min_run_time: float = 0.2) -> dict[str, float]:
    """Median, p20 and p80 of ``fn``'s run time in milliseconds."""
    if device == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"ms": p50, "ms_p20": p20, "ms_p80": p80}
    from torch.utils.benchmark import Timer

    fn()  # warm-up
    measurement = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    times = sorted(measurement.times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e3
    return {"ms": measurement.median * 1e3, "ms_p20": pick(0.2), "ms_p80": pick(0.8)}


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Peak GPU memory allocated while ``fn`` runs; None on CPU (saved bytes are reported there)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def saved_bytes(run: Callable[[], object], module: torch.nn.Module) -> int:
    """Bytes of distinct storages saved for backward by ``run``, parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def timed_row(
    op: str,
    impl: str,
    timing: dict[str, float],
    *,
    dtype: torch.dtype,
    device: str,
    flops: float = 0.0,
    bytes_moved: float = 0.0,
    peak_mem_bytes: int | None = None,
    **fields,
) -> dict:
    """One timed result with the fields every timed row carries (None where a figure does not apply).

    ``backend`` says which code ran: ours through :func:`peft_fast.ops.backend_name`, the others by
    their library. ``tflops`` and ``gb_per_s`` are achieved rates from ``flops`` and ``bytes_moved``.
    """
    ms = timing["ms"]
    return {
        "op": op, "impl": impl, "backend": _backend_of(impl, device), **fields, "dtype": _name(dtype), **timing,
        "tflops": flops / ms / 1e9 if flops else None, "gb_per_s": bytes_moved / ms / 1e6 if bytes_moved else None,
        "peak_mem_bytes": peak_mem_bytes,
    }  # fmt: skip


def _backend_of(impl: str, device: str) -> str:
    if impl.startswith("peft_fast"):
        return backend_name(device)
    if "bnb" in impl or impl.startswith("bitsandbytes"):
        return f"bitsandbytes {_version('bitsandbytes')}"
    return f"torch {torch.__version__}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- targets and writing ----------------------------------------------------------------------


# The H100 goals of the benchmark issue (bf16, r=16), each a ratio between rows of one run:
# (name, comparison, goal). A check reports the worst case over the rows it covers.
TARGETS = (
    ("NF4 dequantize GB/s / bf16 copy GB/s", ">=", 0.85),
    ("QLoRA fwd time / bf16 GEMM time (M >= 512)", "<=", 1.15),
    ("QLoRA fwd speed-up vs PEFT + bnb (M >= 512)", ">=", 1.3),
    ("QLoRA fwd+bwd speed-up vs PEFT + bnb (M >= 512)", ">=", 1.5),
    ("M = 1 speed-up vs bnb 4-bit inference", ">=", 1.5),
    ("train step speed-up vs PEFT + bnb", ">=", 1.5),
    ("train step peak memory / PEFT + bnb", "<=", 0.75),
)
_LARGE_M = 512
_WHERE = ("K", "N", "M", "model", "batch", "grad_ckpt")  # the fields that identify one case


def target_checks(rows: list[dict]) -> list[dict]:
    """Each goal of :data:`TARGETS`: the measured worst-case ratio, where it occurred and whether it is met.

    ``measured`` is None (and ``met`` None) when the run holds no rows for that ratio, e.g. a CPU
    run has no M >= 512 and no Triton dequantization.
    """

    def where(row: dict) -> tuple:
        return tuple(row.get(f) for f in _WHERE)

    def pick(op: str, impl: str, phase: str | None = None, large_m: bool = False, m: int | None = None) -> dict:
        return {
            where(r): r for r in rows
            if r["op"] == op and r["impl"].startswith(impl) and (phase is None or r.get("phase") == phase)
            and (not large_m or r["M"] >= _LARGE_M) and (m is None or r["M"] == m)
        }  # fmt: skip

    def ratios(num: dict, den: dict, field: str) -> list[tuple[float, tuple]]:
        return [(num[k][field] / den[k][field], k) for k in num.keys() & den.keys()
                if num[k][field] is not None and den[k][field]]  # fmt: skip

    linear = lambda impl, phase, **kw: pick("lora_linear", impl, phase, **kw)
    measured = [
        ratios(pick("nf4_dequantize", "peft_fast"), pick("nf4_dequantize", "copy"), "gb_per_s"),
        ratios(linear("peft_fast qlora", "fwd", large_m=True), linear("matmul alone", "fwd", large_m=True), "ms"),
        ratios(linear("peft+bnb qlora", "fwd", large_m=True), linear("peft_fast qlora", "fwd", large_m=True), "ms"),
        ratios(
            linear("peft+bnb qlora", "fwd+bwd", large_m=True), linear("peft_fast qlora", "fwd+bwd", large_m=True), "ms"
        ),
        ratios(linear("bnb 4bit inference", "infer", m=1), linear("peft_fast qlora", "infer", m=1), "ms"),
        ratios(pick("train_step", "peft+bnb"), pick("train_step", "peft_fast"), "ms"),
        ratios(pick("train_step", "peft_fast"), pick("train_step", "peft+bnb"), "peak_mem_bytes"),
    ]
    checks = []
    for (name, comparison, goal), values in zip(TARGETS, measured, strict=True):
        worst = (min if comparison == ">=" else max)(values, default=None)
        value = None if worst is None else worst[0]
        met = None if value is None else (value >= goal if comparison == ">=" else value <= goal)
        at = {} if worst is None else dict(zip(_WHERE, worst[1], strict=True))
        checks.append({"target": name, "goal": f"{comparison} {goal}", "measured": value, "met": met,
                       "cases": len(values), "worst_at": {k: v for k, v in at.items() if v is not None}})  # fmt: skip
    return checks


def write_results(rows: list[dict], out_dir: str | Path, name: str = "bench") -> dict[str, Path]:
    """JSON (rows + metadata), a markdown table and a PNG plot; returns their paths."""
    meta = run_metadata()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() else "-" for c in meta["device"].split("(")[0].strip()).strip("-").lower()
    stem = out_dir / f"{meta['date'][:10]}-{tag}-{name}"
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md"), "png": stem.with_suffix(".png")}
    targets = target_checks(rows)
    with atomic_write(paths["json"], "w") as handle:
        handle.write(json.dumps({"metadata": meta, "targets": targets, "rows": rows}, indent=1) + "\n")
    with atomic_write(paths["md"], "w") as handle:
        handle.write(markdown_table(rows, meta, targets))
    try:
        plot(rows, meta, paths["png"])
    except ImportError:  # matplotlib is a bench/test extra; the numbers matter more than the picture
        print("matplotlib is not installed: no PNG plot written", file=sys.stderr)
        del paths["png"]
    return paths


def markdown_table(rows: list[dict], meta: dict, targets: list[dict] | None = None) -> str:
    lines = [f"# peft_fast benchmarks — {meta['device']}", ""]
    lines.append(", ".join(f"{k} {v}" for k, v in meta.items() if k != "device"))
    if targets:
        lines += ["", "## targets", "",
                  "Goals set for an H100 in bf16; on another device the same ratios, for reference only. "
                  "Worst case over the cases each covers.", "",
                  "| target | goal | measured | met | cases | worst at |", "|" + " --- |" * 6]  # fmt: skip
        for check in targets:
            value = "n/a" if check["measured"] is None else f"{check['measured']:.3g}"
            met = {None: "n/a", True: "yes", False: "**no**"}[check["met"]]
            at = ", ".join(f"{k}={v}" for k, v in check["worst_at"].items())
            lines.append(f"| {check['target']} | {check['goal']} | {value} | {met} | {check['cases']} | {at} |")
    for op in dict.fromkeys(r["op"] for r in rows):
        subset = [r for r in rows if r["op"] == op]
        columns = [c for c in dict.fromkeys(k for r in subset for k in r) if c != "op"]
        lines += ["", f"## {op}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        for row in subset:
            cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    """Speed-up of peft_fast over PEFT + bnb vs M per shape, and saved-bytes bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    linear = [r for r in rows if r["op"] == "lora_linear"]
    for k, n, phase in dict.fromkeys((r["K"], r["N"], r["phase"]) for r in linear):
        ours = {
            r["M"]: r["ms"]
            for r in linear
            if (r["K"], r["N"], r["phase"], r["impl"]) == (k, n, phase, "peft_fast qlora")
        }
        theirs = {
            r["M"]: r["ms"]
            for r in linear
            if (r["K"], r["N"], r["phase"], r["impl"]) == (k, n, phase, "peft+bnb qlora")
        }
        common = sorted(set(ours) & set(theirs))
        if common:
            speed.plot(common, [theirs[m] / ours[m] for m in common], marker="o", label=f"K={k} N={n} {phase}")
    speed.axhline(1.0, color="grey", linewidth=0.8)
    speed.set_xscale("log")
    speed.set_xlabel("M (tokens)")
    speed.set_ylabel("speed-up vs PEFT + bitsandbytes")
    speed.set_title("QLoRA linear")
    if speed.lines[1:]:
        speed.legend(fontsize=7)
    saved = [r for r in rows if r["op"] == "saved_for_backward"]
    labels = [f"{r['impl']}\n{r['scope'][:18]}" for r in saved]
    memory.bar(range(len(saved)), [r["bytes"] / 2**20 for r in saved], color=["C0" if "fast" in r["impl"] else "C1"
                                                                               for r in saved])  # fmt: skip
    memory.set_xticks(range(len(saved)), labels, fontsize=6)
    memory.set_ylabel("MiB saved for backward")
    memory.set_title("activation memory")
    fig.suptitle(f"{meta['device']} — {meta['date'][:10]}", fontsize=9)
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:  # like the JSON and markdown: whole or not at all
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
