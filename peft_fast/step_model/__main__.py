"""``python -m peft_fast.step_model``: both stacks' training step on the H200 roofline model, as tables.

python -m peft_fast.step_model --seq 2048 16384 --checkpointing on off --out bench/step_model
python -m peft_fast.step_model --seq 2048 --layers 4 --extrapolate       # quick
python -m peft_fast.step_model --context --offload                        # + longest S per budget
python -m peft_fast.step_model --fsdp-70b --out DIR                       # FSDP2 per-GPU memory, Llama-3-70B
"""

from __future__ import annotations

import argparse
import sys

from peft_fast.step_model.report import BUDGETS, context_table, kind_table, longest_context, step_table, write_report
from peft_fast.step_model.runner import one_layer, run
from peft_fast.step_model.stacks import STACKS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m peft_fast.step_model", description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 16384], help="sequence lengths (batch 1)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--checkpointing", nargs="+", choices=("on", "off"), default=["on", "off"])
    parser.add_argument("--stacks", nargs="+", choices=STACKS, default=list(STACKS))
    parser.add_argument("--layers", type=int, default=None, help="depth (default: the config's, 32)")
    parser.add_argument("--extrapolate", action="store_true", help="from 2- and 3-layer runs instead of full depth")
    parser.add_argument("--offload", action="store_true", help="also peft_fast with offload_activations (ckpt on)")
    parser.add_argument("--context", action="store_true", help="longest S on 24 / 48 / 80 GB (ckpt on)")
    parser.add_argument(
        "--context-direct",
        action="store_true",
        help="trace the context search at full depth (default: extrapolated from 2 and 3 layers)",
    )
    parser.add_argument("--no-hopper-report", action="store_true", help="ms = roofline ms (no report ratios)")
    parser.add_argument("--kinds", type=int, default=12, help="op kinds per step in the breakdown tables")
    parser.add_argument("--fsdp-70b", dest="fsdp_70b", action="store_true",
                        help="only the FSDP2 per-GPU peak of Llama-3-70B QLoRA (S 2048, batch 2; 2 and 8 ranks, "
                             "with and without CPU offload): fsdp-70b.json / .md")  # fmt: skip
    parser.add_argument("--out", default=None, help="directory for step-model.json and step-model.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.fsdp_70b:
        return _fsdp_70b(args.out)
    common = {"batch": args.batch, "layers": args.layers, "extrapolate": args.extrapolate,
              "hopper_report": not args.no_hopper_report}  # fmt: skip
    settings = [(stack, seq, ckpt == "on", False) for ckpt in args.checkpointing for seq in args.seq
                for stack in args.stacks]  # fmt: skip
    if args.offload and "peft_fast" in args.stacks:
        settings += [("peft_fast", seq, True, True) for seq in args.seq]
    results = []
    for stack, seq, ckpt, offload in settings:
        print(f"[step model] {stack} S={seq} checkpointing {'on' if ckpt else 'off'}"
              f"{' offload' if offload else ''} ...", file=sys.stderr, flush=True)  # fmt: skip
        results.append(run(stack=stack, seq=seq, checkpointing=ckpt, offload=offload, **common))
    layers = {}
    for stack in args.stacks:  # one decoder layer at the first length, checkpointing on
        print(f"[step model] one layer of {stack} ...", file=sys.stderr, flush=True)
        layers[stack] = one_layer(stack=stack, seq=args.seq[0], batch=args.batch,
                                  hopper_report=not args.no_hopper_report)  # fmt: skip
    print(step_table(results))
    for result in results:
        print()
        print(kind_table(result, args.kinds))
    for result in layers.values():
        print()
        print(kind_table(result, args.kinds))
    contexts = {}
    if args.context:
        variants = [(stack, False) for stack in args.stacks]
        if args.offload and "peft_fast" in args.stacks:
            variants.append(("peft_fast", True))
        for stack, offload in variants:
            print(f"[step model] longest context: {stack}{' offload' if offload else ''} ...", file=sys.stderr,
                  flush=True)  # fmt: skip
            context_args = {**common, "extrapolate": not args.context_direct}
            contexts[f"{stack}{' + offload' if offload else ''}, ckpt on"] = longest_context(
                stack, BUDGETS, checkpointing=True, offload=offload, **context_args
            )
        print()
        print(context_table(contexts))
    if args.out:
        paths = write_report(results, args.out, contexts, layers=list(layers.values()))
        print(f"\nwrote {paths['json']} and {paths['md']}", file=sys.stderr)
    return 0


def _fsdp_70b(out: str | None) -> int:
    import json
    from pathlib import Path

    from peft_fast.step_model.fsdp import fsdp_memory, fsdp_table
    from peft_fast.step_model.report import metadata

    print("[step model] Llama-3-70B QLoRA, one rank's step, then FSDP2's per-GPU peak ...", file=sys.stderr)
    result = {"meta": metadata(), **fsdp_memory()}
    table = fsdp_table(result)
    print(table)
    if out:
        directory = Path(out)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "fsdp-70b.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        anchors = "\n".join(f"- {a['what']}: " + (f"{a['per_gpu_gib']} GiB" if "per_gpu_gib" in a else
                                                   f"{a['per_gpu_gb']} GB") for a in result["anchors"])  # fmt: skip
        (directory / "fsdp-70b.md").write_text(
            "# FSDP2 QLoRA per-GPU peak — a model (peft_fast.step_model.fsdp), not a measurement\n\n"
            + table
            + "\n\nPublished anchors (other models and settings):\n\n"
            + anchors
            + "\n"
        )
        print(f"wrote {directory / 'fsdp-70b.json'} and {directory / 'fsdp-70b.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
