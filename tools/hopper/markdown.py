"""Render the Hopper report's JSON as markdown: a summary table, then each op's launches."""

from __future__ import annotations

from typing import Any

from tools.hopper import cost_model


def _num(value: Any, fmt: str = "{:,.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def _met(value: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "–"}[value]


def _is_tile(name: str) -> bool:
    return name.startswith(("BLOCK_", "TILE")) or name in ("ROWS", "COLS")  # not BLOCKSIZE (NF4 blocks)


def _config(launch: dict[str, Any]) -> str:
    """Tile sizes (the autotune config's, else the launch's tile constexprs), warps and stages."""
    source = launch.get("config") or launch.get("constexprs") or {}
    tiles = "×".join(str(v) for k, v in source.items() if _is_tile(k) and isinstance(v, int) and k != "BLOCK_R")
    if launch.get("num_warps") is None:
        return ""
    return f"{tiles} w{launch['num_warps']} s{launch['num_stages']}".strip()


def render(report: dict[str, Any]) -> str:
    """The markdown report."""
    ceil = report["ceilings"]
    lines = [
        f"# Static Hopper (sm_90) cost report — Triton {report['triton']}",
        "",
        "Compile-time **lower bounds** from each kernel's cubin / SASS for an H200 — predictions, not measurements.",
        f"Ceilings: {ceil['sms']} SMs at {ceil['clock_hz'] / 1e9:.2f} GHz, bf16 {ceil['bf16_flops_per_s'] / 1e12:.0f}"
        f" TFLOP/s, HBM {ceil['hbm_bytes_per_s'] / 1e12:.1f} TB/s (measured copy rate, read + write).",
        "",
        "## Ops",
        "",
        "| op | M | N | K | floor µs | predicted µs | ratio | goal | met? |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for op in report["ops"]:
        goal = op.get("goal") or {}
        extra = ""
        if "hbm_fraction" in op:
            extra = f" ({_num(op['hbm_fraction'], '{:.0%}')} of HBM)"
        if "copy_fraction" in op:
            extra = f" ({_num(op['copy_fraction'], '{:.0%}')} of copy bw)"
        lines.append(
            f"| {op['op']} | {op['M']} | {op['N']} | {op['K']} | {_num(op['floor_us'])} | {_num(op['predicted_us'])} | "
            f"{_num(op['ratio'], '{:.2f}')}{extra} | {goal.get('text', '–')} | {_met(goal.get('met'))} |"
        )
    goals = report.get("goals", {})
    lines += ["", "Kernel-wide goals:", ""]
    for name, goal in goals.items():
        lines.append(f"- {goal.get('text', name)}: {_met(goal['met'])}")
        lines += [f"  - {v}" for v in goal["violations"]]
    lines += ["", "## Launches", ""]
    for op in report["ops"]:
        lines += [f"### {op['id']} — {_num(op['predicted_us'])} µs vs floor {_num(op['floor_us'])} µs", ""]
        if op.get("note"):
            lines += [f"_{op['note']}_", ""]
        lines += [
            "| kernel | config | grid | trips | CTAs/SM | regs | stack B | smem KB | HGMMA | wait | K-loop instr"
            " | bound | µs |",
            "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---:|",
        ]
        for la in op["launches"]:
            name = la["kernel"].rpartition(":")[2]
            grid = "×".join(str(g) for g in la["grid"]) if la.get("grid") else ""
            smem = _num(la["smem"] / 1024 if la.get("smem") is not None else None)
            hgmma = "–" if la.get("hgmma") is None else ("yes" if la["hgmma"] else ("HMMA" if la.get("hmma") else "no"))
            lines.append(
                f"| {name} | {_config(la)} | {grid} | {_num(la.get('loop_trips'), '{}')} | "
                f"{_num(la.get('ctas_per_sm'), '{}')} | {_num(la.get('regs'), '{}')} | "
                f"{_num(la.get('spill_bytes'), '{}')} | {smem} | {hgmma} | {_num(la.get('wgmma_wait'), '{}')} | "
                f"{_num(la.get('kloop_instr_per_warp'), '{:,}')} | {la.get('bound', '')} | {_num(la['predicted_us'])} |"
            )
        lines.append("")
    lines += ["## Cost model", "", *(cost_model.__doc__ or "").strip().splitlines(), ""]
    return "\n".join(lines)
