"""A train job's arguments and errors: ``TrainArgs``, the ``--method`` names, the checks of the
arguments and of the output directory, and ``--config`` settings files."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CHECKPOINT",
    "METHOD_NAMES",
    "RUN_MARKER",
    "Interrupted",
    "TrainArgs",
    "UsageError",
    "check_args",
    "check_output_dir",
    "first_line",
    "read_settings_file",
]

RUN_MARKER = "peft_fast_run.json"  # the run record; it also marks an output directory as ours
CHECKPOINT = "checkpoint"  # <output>/checkpoint: the one checkpoint a run keeps
# The --method names (peft_fast.registry.METHODS holds the methods themselves): LoRA without and
# with an NF4 base, bottleneck adapters, (IA)³, the four prompt methods.
METHOD_NAMES = ("lora", "qlora", "adapter", "ia3", "prompt-tuning", "prefix-tuning", "p-tuning", "llama-adapter")


class UsageError(ValueError):
    """Bad input from the user: the CLI prints the message on one line and exits with code 2."""


class Interrupted(Exception):
    """Training stopped by Ctrl-C after writing a checkpoint."""


@dataclass
class TrainArgs:
    """Every ``peft-fast train`` flag; ``None`` model and data mean the embedded demo."""

    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    method: str = "qlora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int | None = None  # default: the model's limit, at most 512
    packing: bool = False
    gradient_checkpointing: bool = False
    output: str = "peft_fast_output"
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    eval_every: int | None = None
    save_every: int | None = None
    warmup_ratio: float = 0.05
    num_virtual_tokens: int = 20  # prompt methods: virtual tokens (LLaMA-Adapter: prompt length)
    progress: bool = True
    log_every: int = 50  # without a terminal: a progress line every N steps ...
    log_every_seconds: float = 10.0  # ... or every S seconds, whichever comes first (0: off)
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP (one process: ignored)
    fsdp_offload: bool = False  # with fsdp: the shards (NF4 base, LoRA parameters, Adam state) in host memory
    fuse: str = "all"  # the fused training step: all, none, or comma-separated pieces (peft_fast.fused.PIECES)
    offload_activations: bool = False  # checkpointed layer inputs in host memory (implies gradient checkpointing)
    extra: dict = field(default_factory=dict)

    @classmethod
    def demo(cls, **overrides) -> TrainArgs:
        """The embedded default: QLoRA on MiniLM for intent classification, a few minutes on CPU."""
        # A fresh output directory per run, so running the README command twice overwrites nothing.
        stamp = time.strftime("%Y%m%d-%H%M%S")
        settings = {"method": "qlora", "r": 8, "alpha": 16.0, "dropout": 0.05, "lr": 3e-3, "epochs": 4.0,
                    "batch_size": 16, "seq_len": 64, "output": f"peft_fast_output/demo-{stamp}"}  # fmt: skip
        return cls(**{**settings, **overrides})


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): for one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_args(args: TrainArgs) -> None:
    """A UsageError naming the first flag whose value cannot train."""
    if args.r <= 0:
        raise UsageError(f"--r must be a positive integer, got {args.r}")
    if args.method not in METHOD_NAMES:
        raise UsageError(f"--method {args.method!r} is unknown; choose one of {', '.join(METHOD_NAMES)}")
    for name in ("batch_size", "grad_accum", "seq_len"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    fused_pieces(args.fuse)
    if args.max_steps is not None and args.max_steps <= 0:
        raise UsageError(f"--max-steps must be positive, got {args.max_steps}")
    if (args.model is None) != (args.data is None):
        raise UsageError("give both --model and --data, or neither (the embedded demo)")
    if args.fsdp_offload and not args.fsdp:
        raise UsageError("--fsdp-offload keeps FSDP's shards in host memory: it needs --fsdp")
    if args.log_every < 0 or not args.log_every_seconds >= 0:
        raise UsageError("--log-every and --log-every-seconds must be 0 (off) or positive")


def check_output_dir(args: TrainArgs) -> Path:
    """The output directory; on resume it must hold a checkpoint, else it must be empty (or ``--overwrite``)."""
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
    ours = (out / RUN_MARKER).is_file()
    if args.resume:
        if not (out / CHECKPOINT).is_dir():
            raise UsageError(f"nothing to resume: {out / CHECKPOINT} does not exist")
        return out
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        what = "holds an earlier run" if ours else "exists and was not written by peft-fast"
        raise UsageError(f"output directory {out} {what}; pass --overwrite (or --resume to continue)")
    return out


def read_settings_file(path: str | os.PathLike) -> dict:
    """The settings of a ``--config`` file (yaml, or else json): flag names (``_`` for ``-``) -> values."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            settings = yaml.safe_load(text) or {}
        else:
            settings = json.loads(text)
    except Exception as exc:
        raise UsageError(f"config file {path} is not valid: {str(exc).splitlines()[0]}") from None
    if not isinstance(settings, dict):
        raise UsageError(f"config file {path} must hold a mapping of flag names to values")
    return {key.replace("-", "_"): value for key, value in settings.items()}


def fused_pieces(fuse: str) -> bool | list[str]:
    """``--fuse``'s value as ``patch``'s ``fused``: True (all), False (none) or the named pieces."""
    from peft_fast.fused import PIECES, resolve_pieces

    if not isinstance(fuse, str):
        raise UsageError(f"--fuse must be all, none or comma-separated pieces of {', '.join(PIECES)}; got {fuse!r}")
    value = fuse.strip().lower()
    if value in ("all", "none"):
        return value == "all"
    pieces = [piece.strip() for piece in value.split(",") if piece.strip()]
    try:
        resolve_pieces(pieces)
    except ValueError as exc:
        raise UsageError(f"--fuse: {first_line(exc)}") from None
    return pieces
