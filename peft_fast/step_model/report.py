"""The step model's outputs: the longest context that fits a budget, tables, JSON and markdown.

Longest context. With FlashAttention nothing holds an S × S tensor, so at a fixed batch the peak
is affine in S within a regime (peft_fast tiles its MLP from 8192 tokens and chunks its loss, so
its regime starts there; at Llama-3-8B's dims its peak moves from a QLoRA backward to FlashAttention's
backward near 32k tokens, where the slope changes by ~5%: the default fit points lie above that).
:func:`longest_context` traces two sequence lengths, fits
``peak = a + b·S``, reports the fit's error at a third traced length, solves for each budget, and
traces the solution to report the peak there (then moves the solution by one secant step if the
traced peak is off the budget). Budgets are decimal GB (80 GB = 80e9 bytes).
"""

from __future__ import annotations

import json
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path

from peft_fast.step_model.costs import BF16_FLOPS_PER_S, COPY_BYTES_PER_S
from peft_fast.step_model.runner import StepResult, run

__all__ = ["BUDGETS", "longest_context", "markdown", "metadata", "step_table", "write_report"]

BUDGETS = (24e9, 48e9, 80e9)
_GRANULE = 256  # solutions are rounded down to a multiple of this many tokens


def longest_context(
    stack: str = "peft_fast",
    budgets: Iterable[float] = BUDGETS,
    *,
    fit_seqs: tuple[int, int] = (32768, 131072),
    check_seq: int = 65536,
    verify: bool = True,
    **run_kwargs,
) -> dict:
    """The longest sequence (batch ``run_kwargs.get("batch", 1)``) whose peak fits each budget.

    Returns ``{"fit": {a, b, points, check_seq, check_error_bytes, check_error}, "budgets": {GB: {seq,
    traced_peak_bytes}}}``. ``run_kwargs`` go to :func:`run` (``checkpointing``, ``offload``,
    ``extrapolate``, ``config``, ...).
    """
    peaks = {s: run(stack=stack, seq=s, **run_kwargs).peak_bytes for s in (*fit_seqs, check_seq)}
    (s1, s2) = fit_seqs
    slope = (peaks[s2] - peaks[s1]) / (s2 - s1)
    intercept = peaks[s1] - slope * s1
    predicted = intercept + slope * check_seq
    out = {
        "fit": {
            "a_bytes": intercept, "b_bytes_per_token": slope, "points": {str(s): peaks[s] for s in fit_seqs},
            "check_seq": check_seq, "check_peak_bytes": peaks[check_seq],
            "check_error_bytes": predicted - peaks[check_seq],
            "check_error": (predicted - peaks[check_seq]) / peaks[check_seq],
        },
        "budgets": {},
    }  # fmt: skip
    for budget in budgets:
        seq = max(_GRANULE, int((budget - intercept) / slope) // _GRANULE * _GRANULE) if slope > 0 else None
        entry: dict = {"seq_fit": seq}
        if verify and seq:
            traced = run(stack=stack, seq=seq, **run_kwargs).peak_bytes
            if traced > budget or budget - traced > slope * _GRANULE * 2:
                # one secant step through the traced point and the nearer fit point
                near = min(fit_seqs, key=lambda s: abs(s - seq))
                local = (traced - peaks[near]) / (seq - near) if seq != near else slope
                seq2 = max(_GRANULE, int(seq + (budget - traced) / local) // _GRANULE * _GRANULE)
                entry["seq_fit_traced_peak_bytes"] = traced
                seq, traced = seq2, run(stack=stack, seq=seq2, **run_kwargs).peak_bytes
            entry.update(seq=seq, traced_peak_bytes=traced, fits=traced <= budget)
        else:
            entry["seq"] = seq
        out["budgets"][f"{budget / 1e9:g} GB"] = entry
    return out


def metadata() -> dict:
    """Library versions, the commit, and the modelled device and its rates."""

    def version(name: str) -> str | None:
        try:
            return __import__(name).__version__
        except Exception:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parent).stdout.strip() != ""  # fmt: skip
    except OSError:
        commit, dirty = "", False
    return {
        "device": "H200 roofline model",
        "bf16_flops_per_s": BF16_FLOPS_PER_S,
        "copy_bytes_per_s": COPY_BYTES_PER_S,
        "python": platform.python_version(),
        **{name: version(name) for name in ("torch", "triton", "transformers", "peft", "bitsandbytes", "peft_fast")},
        "git_commit": commit + ("+uncommitted" if dirty else ""),
    }


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def step_table(results: list[StepResult]) -> str:
    """One markdown row per step result."""
    lines = ["| stack | S | ckpt | offload | ms | roofline ms | FLOP floor ms | ops | kernels | peak GB | peak at | "
             "saved GB | depth |", "|" + " --- |" * 13]  # fmt: skip
    for r in results:
        lines.append(
            f"| {r.stack} | {r.seq} | {'on' if r.checkpointing else 'off'} | {'on' if r.offload else 'off'} | "
            f"{r.ms:.1f} | {r.roofline_ms:.1f} | {r.flop_floor_ms:.1f} | {r.ops:,.0f} | {r.kernels:,.0f} | "
            f"{_gb(r.peak_bytes)} | {r.peak_at.split(' (')[0]} | {_gb(r.saved_bytes)} | {r.depth} |"
        )
    return "\n".join(lines)


def kind_table(result: StepResult, top: int = 15) -> str:
    """The op kinds taking most of one step's time."""
    lines = [f"| op ({result.stack}, S={result.seq}, ckpt {'on' if result.checkpointing else 'off'}) | calls | "
             "kernels | TFLOP | GB moved | ms |", "|" + " --- |" * 6]  # fmt: skip
    for kind, t in list(result.by_kind.items())[:top]:
        lines.append(f"| `{kind}` | {t.calls:,.0f} | {t.kernels:,.0f} | {t.flops / 1e12:.2f} | {t.bytes / 1e9:.1f} | "
                     f"{t.ms:.2f} |")  # fmt: skip
    return "\n".join(lines)


def context_table(contexts: dict[str, dict]) -> str:
    """Longest sequence per budget, one row per (stack, setting)."""
    budgets = sorted({b for c in contexts.values() for b in c["budgets"]}, key=lambda b: float(b.split()[0]))
    lines = ["| setting | " + " | ".join(f"longest S on {b}" for b in budgets) + " | fit a (GB) | b (MB/token) | "
             "fit error at check S |", "|" + " --- |" * (len(budgets) + 4)]  # fmt: skip
    for name, c in contexts.items():
        cells = [f"{c['budgets'][b].get('seq', 0) or 0:,}" for b in budgets]
        fit = c["fit"]
        error = f"{fit['check_error'] * 100:+.2f}% at {fit['check_seq']}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fit['a_bytes'] / 1e9:.2f} | "
                     f"{fit['b_bytes_per_token'] / 1e6:.3f} | {error} |")  # fmt: skip
    return "\n".join(lines)


def markdown(results: list[StepResult], contexts: dict[str, dict] | None = None, meta: dict | None = None,
             layers: list[StepResult] | None = None) -> str:  # fmt: skip
    meta = meta or metadata()
    parts = [
        "# One training step on the H200 roofline model", "",
        ", ".join(f"{k} {v}" for k, v in meta.items()), "",
        "A model, not a measurement: max(FLOPs / 790e12, bytes / 4.3e12) per kernel, summed; no launch gaps "
        "(kernel counts below), no allocator fragmentation or library workspaces, no optimizer step. `ms` scales "
        "peft_fast's QLoRA ops by the static Hopper report's ratios; `roofline ms` does not.", "",
        "## Steps", "", step_table(results),
    ]  # fmt: skip
    for r in results:
        parts += ["", kind_table(r)]
    if layers:
        parts += ["", "## One decoder layer (run(2 layers) − run(1 layer))", "", step_table(layers)]
        for r in layers:
            parts += ["", kind_table(r)]
    if contexts:
        parts += ["", "## Longest context at batch 1", "", context_table(contexts)]
    return "\n".join(parts) + "\n"


def write_report(results: list[StepResult], out_dir, contexts: dict[str, dict] | None = None,
                 name: str = "step-model", layers: list[StepResult] | None = None) -> dict[str, Path]:  # fmt: skip
    """``<out>/<name>.json`` (metadata, results, contexts) and ``<out>/<name>.md``; returns the paths."""
    from peft_fast.io import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = metadata()
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    payload = {"metadata": meta, "results": [r.to_dict() for r in results], "longest_context": contexts or {},
               "one_layer": [r.to_dict() for r in layers or []]}  # fmt: skip
    with atomic_write(paths["json"], "w") as handle:
        handle.write(json.dumps(payload, indent=1, default=str) + "\n")
    with atomic_write(paths["md"], "w") as handle:
        handle.write(markdown(results, contexts, meta, layers))
    return paths
