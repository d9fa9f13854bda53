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


def _terms(launch: dict[str, Any]) -> str:
    """Per-CTA cycles of the four SM resources (library calls: none)."""
    if launch.get("signature") is None:
        return "–"
    cyc = lambda key: _num(launch.get(key), "{:,.0f}")
    gather = launch.get("gather_cycles_per_cta")
    return (f"{cyc('issue_cycles_per_cta')} / {cyc('mma_cycles_per_cta')} / {cyc('smem_cycles_per_cta')}"
            + (f" ({cyc('gather_cycles_per_cta')})" if gather else ""))  # fmt: skip


def _lone(launch: dict[str, Any]) -> str:
    """Fill + epilogue cycles a lone CTA pays, and how many such groups the busiest SM runs."""
    if launch.get("signature") is None:
        return "–"
    fill, epilogue = launch.get("fill_cycles") or 0, launch.get("epilogue_cycles") or 0
    return f"{fill:,.0f} + {epilogue:,.0f} × {launch.get('lone_groups') or 0}"


def render(report: dict[str, Any]) -> str:
    """The markdown report."""
    ceil = report["ceilings"]
    lines = [
        f"# Static Hopper (sm_90) cost report — Triton {report['triton']}",
        "",
        "Compile-time **lower bounds** from each kernel's cubin / SASS for an H200 — predictions, not measurements.",
        f"Ceilings: {ceil['sms']} SMs at {ceil['clock_hz'] / 1e9:.2f} GHz, bf16 {ceil['bf16_flops_per_s'] / 1e12:.0f}"
        f" TFLOP/s, HBM {ceil['hbm_bytes_per_s'] / 1e12:.1f} TB/s (measured copy rate, read + write).",
        f"Leads (estimates, see Cost model): shared memory {ceil.get('smem_bytes_per_clock', '–')} B/clk/SM, L2"
        f" {_num(ceil.get('l2_bytes_per_s', 0) / 1e12, '{:.2f}')} TB/s, load latency"
        f" {ceil.get('load_latency_cycles', '–')} cycles, {_num(ceil.get('launch_gap_s', 0) * 1e6, '{:.1f}')} µs"
        " between dependent launches.",
        "",
        "## Ops",
        "",
        "| op | M | N | K | floor µs | predicted µs | launch gaps µs | ratio | PEFT + bnb µs | speedup vs PEFT + bnb"
        " | goal | met? |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
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
            f"{_num(op.get('launch_gaps_us'))} | {_num(op['ratio'], '{:.2f}')}{extra} | "
            f"{_num(op.get('peft_bnb_us'))} | "
            f"{_num(op.get('speedup_vs_peft_bnb'), '{:.2f}×')} | {goal.get('text', '–')} | {_met(goal.get('met'))} |"
        )
    goals = report.get("goals", {})
    lines += ["", "Kernel-wide goals:", ""]
    for name, goal in goals.items():
        lines.append(f"- {goal.get('text', name)}: {_met(goal['met'])}")
        lines += [f"  - {v}" for v in goal["violations"]]
    lines += ["", "## Launches", ""]
    for op in report["ops"]:
        versus = f"{_num(op.get('ratio'), '{:.2f}')}× its floor"
        if op.get("peft_bnb_us") is not None:
            speedup = _num(op.get("speedup_vs_peft_bnb"), "{:.2f}")
            versus += f", {speedup}× the speed of PEFT + bnb's layer ({op['peft_bnb_us']:,.1f} µs)"
        lines += [
            f"### {op['id']} — {_num(op['predicted_us'])} µs vs floor {_num(op['floor_us'])} µs ({versus})",
            "",
            f"{op.get('n_launches', len(op['launches']))} launches, "
            f"{_num(op.get('launch_gaps_us'))} µs of launch gaps.",
            "",
        ]
        if op.get("note"):
            lines += [f"_{op['note']}_", ""]
        lines += [
            "| kernel | config | grid | trips | CTAs/SM | regs | stack B | smem KB | HGMMA | wait | K-loop instr"
            " | issue / MMA / smem (gather) cyc per CTA | fill + epilogue cyc × lone groups | L2 µs | HBM µs"
            " | bound | µs |",
            "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|---:|---:|---|---:|",
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
                f"{_num(la.get('kloop_instr_per_warp'), '{:,}')} | {_terms(la)} | {_lone(la)} | "
                f"{_num(la.get('l2_us'), '{:,.2f}')} | {_num(la.get('memory_us'), '{:,.2f}')} | "
                f"{la.get('bound', '')} | {_num(la['predicted_us'])} |"
            )
        lines.append("")
    lines += ["## Cost model", "", *(cost_model.__doc__ or "").strip().splitlines(), ""]
    return "\n".join(lines)
