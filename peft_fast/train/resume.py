"""Resuming a train job: the run record, what may change on resume, and how a changed setting continues."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from peft_fast.io import atomic_write
from peft_fast.train.args import RUN_MARKER, TrainArgs, UsageError
from peft_fast.train.build import demo_model_dir

__all__ = [
    "CHANGEABLE_ON_RESUME",
    "FIXED_ON_RESUME",
    "NOT_RECORDED",
    "moved_data_position",
    "read_run_record",
    "resume_changes",
    "set_learning_rate",
    "write_run_record",
]

# Settings that decide the adapter's shape or meaning: a checkpoint cannot continue under others.
FIXED_ON_RESUME = ("model", "method", "r", "alpha", "target_modules", "num_virtual_tokens")
# Settings a resumed run may change; each change is reported on one line.
CHANGEABLE_ON_RESUME = ("lr", "batch_size", "grad_accum", "epochs", "max_steps", "dropout", "seq_len", "data",
                        "eval_data", "seed", "packing", "gradient_checkpointing", "warmup_ratio",
                        "fuse", "offload_activations")  # fmt: skip
# How this invocation runs, not what it trains: never compared, never taken from the record.
NOT_RECORDED = ("output", "resume", "overwrite", "progress", "log_every", "log_every_seconds", "fsdp", "fsdp_offload",
                "extra")  # fmt: skip


def read_run_record(directory: str | Path) -> dict | None:
    """The run record (``peft_fast_run.json``) our train job wrote into ``directory``, or None."""
    path = Path(directory) / RUN_MARKER
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is damaged ({exc}); it is the record of the run in {directory}") from None
    if not isinstance(record, dict) or not isinstance(record.get("args"), dict):
        raise UsageError(f"{path} is damaged (no 'args' mapping); it is the record of the run in {directory}")
    return record


def write_run_record(out: Path, args: TrainArgs, task: str, labels: list[str] | None, world: int) -> None:
    """Write the record of the run into ``out``: ``--resume`` compares against it, ``peft-fast merge``
    rebuilds its model (the base model's resolved path, the task and the labels)."""
    record = {"args": dataclasses.asdict(args), "labels": labels, "task": task, "world_size": world,
              "base_model": str(_model_dir(args.model).resolve())}  # fmt: skip
    with atomic_write(out / RUN_MARKER, "w") as handle:
        json.dump(record, handle, indent=1)


def _model_dir(model: str | None) -> Path:
    return demo_model_dir() if model is None else Path(model)


def _same_path(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _show(name: str, value) -> str:
    if name == "model" and value is None:
        return "the embedded demo model"
    if name in ("data", "eval_data") and value is None:
        return "none" if name == "eval_data" else "the demo data"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_changes(args: TrainArgs, record: dict, world: int) -> list[str]:
    """Refuse settings a checkpoint cannot continue under; describe the allowed changes.

    Raises UsageError naming every fixed setting that differs from the run record; returns
    ``["lr 0.003 -> 0.001", ...]`` for the changeable ones. A ``seq_len`` of None takes the
    recorded value.
    """
    recorded = record["args"]
    base_model = record.get("base_model")

    def differs(name: str) -> bool:
        old, new = recorded.get(name), getattr(args, name)
        if name == "model":
            current = None if new is None else str(Path(new).expanduser().resolve())
            if base_model is not None and current is not None:
                return not _same_path(base_model, current)
            return not _same_path(old, new)
        if name in ("data", "eval_data"):
            return not _same_path(old, new)
        if name == "target_modules" and isinstance(old, list) and isinstance(new, list):
            return sorted(old) != sorted(new)
        if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(new, bool):
            return float(old) != float(new)
        return old != new

    if args.seq_len is None and recorded.get("seq_len") is not None:
        args.seq_len = recorded["seq_len"]
    fixed = [f"{_flag(n)} {_show(n, getattr(args, n))} (the run used {_show(n, recorded.get(n))})"
             for n in FIXED_ON_RESUME if n in recorded and differs(n)]  # fmt: skip
    if fixed:
        raise UsageError(
            f"cannot resume {args.output}: {'; '.join(fixed)}; a checkpoint continues only with the settings "
            "that shaped its adapter (drop those flags, or train into a new --output)"
        )
    changes = []
    for name in CHANGEABLE_ON_RESUME:
        if name == "batch_size":
            old_global = recorded.get("batch_size", args.batch_size) * record.get("world_size", 1)
            if old_global != args.batch_size * world:
                changes.append(f"batch size {old_global} -> {args.batch_size * world} (examples per step, all ranks)")
        elif name in recorded and differs(name):
            changes.append(
                f"{name.replace('_', ' ')} {_show(name, recorded[name])} -> {_show(name, getattr(args, name))}"
            )
    return changes


def moved_data_position(micro_step: int, old_global: int, new_global: int, n_examples: int) -> int:
    """The micro step of a new global batch size at the same place in the same epoch.

    The position is the micro step (``epoch * per_epoch + index``); with another batch size the
    same number would land elsewhere. Examples not yet seen this epoch stay unseen (rounded up to
    a whole batch).
    """
    old_per_epoch, new_per_epoch = max(1, n_examples // old_global), max(1, n_examples // new_global)
    epoch, index = divmod(micro_step, old_per_epoch)
    new_index = -(-index * old_global // new_global)
    if new_index >= new_per_epoch:
        return (epoch + 1) * new_per_epoch
    return epoch * new_per_epoch + new_index


def set_learning_rate(optimizer, scheduler, lr: float) -> None:
    """A new peak learning rate for a resumed run: the schedule continues at the same point."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, schedule in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
