"""A train job's checkpoint: every trainable tensor, the optimizer, scheduler, RNG and data position,
written atomically to ``<output>/checkpoint`` and read back (under any parallelism)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from peft_fast import distributed
from peft_fast.io import atomic_write, fsync_directory, respect_umask
from peft_fast.train.args import CHECKPOINT, UsageError, first_line

__all__ = ["CHECKPOINT_OLD", "CHECKPOINT_STAGING", "load_checkpoint", "recover_checkpoint", "save_checkpoint"]

# The swap of save_checkpoint: a complete copy is written to CHECKPOINT_STAGING, then CHECKPOINT is
# renamed to CHECKPOINT_OLD, the staging copy to CHECKPOINT, and the old one removed. A kill at any
# point leaves at least one complete copy among the three; recover_checkpoint finishes the swap
# from whichever is newest.
CHECKPOINT_STAGING, CHECKPOINT_OLD = f".{CHECKPOINT}.tmp", f".{CHECKPOINT}.old"
_STATE_FILES = ("trainer_state.safetensors", "trainer_state.json")  # the json is written last


def _complete_step(directory: Path) -> int | None:
    """The step of a complete checkpoint copy (both files, the json written last and whole), else None."""
    try:
        if not (directory / _STATE_FILES[0]).is_file():
            return None
        step = json.loads((directory / _STATE_FILES[1]).read_text(encoding="utf-8"))["step"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def recover_checkpoint(out: Path, rank: int = 0, world: int = 1) -> Path | None:
    """Finish a checkpoint swap a kill interrupted: ``<out>/checkpoint`` becomes the newest complete copy.

    The candidates are ``checkpoint``, the staging copy ``.checkpoint.tmp`` and the previous one
    ``.checkpoint.old``; complete ones (:func:`_complete_step`) are ranked by step, ``checkpoint``
    first on a tie. The best is renamed into place (the same swap, so a kill here is recovered
    too) and the other copies are removed. Returns ``<out>/checkpoint``, or None when no copy is
    complete (nothing is touched then). Rank 0 acts; under torchrun every rank waits for it.
    """
    final = out / CHECKPOINT
    result = None
    if rank == 0:
        copies = [final, out / CHECKPOINT_STAGING, out / CHECKPOINT_OLD]
        complete = [(step, -i, copy) for i, copy in enumerate(copies) if (step := _complete_step(copy)) is not None]
        if complete:
            best = max(complete)[2]
            if best != final:
                spare = next(copy for copy in copies[1:] if copy != best)  # emptied, then it holds the old copy
                shutil.rmtree(spare, ignore_errors=True)
                if final.exists():
                    os.replace(final, spare)
                os.replace(best, final)
            for copy in copies[1:]:
                shutil.rmtree(copy, ignore_errors=True)
            result = final
    if world > 1:
        torch.distributed.barrier()
    return result


def save_checkpoint(
    out: Path, model, optimizer, scheduler, step: int, micro_step: int, rank: int = 0, global_batch: int | None = None
) -> None:
    """Write <out>/checkpoint atomically: into a temporary directory, then swapped in.

    It holds every trainable tensor by name (whatever the method), the optimizer and scheduler
    state, the RNG states and the data position; safetensors and JSON only. Called on every rank
    (FSDP gathers sharded tensors, a collective); rank 0 writes.
    """
    from safetensors.torch import save_file

    def full(tensor: torch.Tensor) -> torch.Tensor:
        return distributed.full_tensor(tensor.detach()).cpu().contiguous()

    tensors = {f"param.{n}": full(p) for n, p in model.named_parameters() if p.requires_grad}
    opt_state = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = full(value)
            else:
                scalars.setdefault(str(index), {})[key] = value
    if rank != 0:
        return
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    recover_checkpoint(out)  # a swap a kill interrupted: finished first, so the staging copy is never the only one
    staging = out / CHECKPOINT_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(tensors, staging / "trainer_state.safetensors")
    respect_umask(staging / "trainer_state.safetensors")  # safetensors creates its files 0600
    with open(staging / "trainer_state.safetensors", "rb") as handle:  # on disk before the json marks it complete
        os.fsync(handle.fileno())
    state = {"step": step, "micro_step": micro_step, "param_groups": opt_state["param_groups"],
             "optimizer_scalars": scalars, "scheduler": scheduler.state_dict(),
             "python_random": repr(random.getstate()), "global_batch": global_batch}  # fmt: skip
    with atomic_write(staging / "trainer_state.json", "w") as handle:  # last: the copy is complete
        json.dump(state, handle, default=str)
    fsync_directory(staging)  # the copy's file entries on disk before it is swapped in
    final, old = out / CHECKPOINT, out / CHECKPOINT_OLD
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    fsync_directory(out)  # the swap itself durable: a power loss now keeps the new checkpoint
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, model, optimizer, scheduler) -> tuple[int, int, dict]:
    """Restore what :func:`save_checkpoint` wrote; under FSDP each rank keeps its shard of the full tensors.

    Returns (step, micro_step, the saved JSON state). A checkpoint whose tensors do not fit the
    model (another rank, other target modules, another model) is a UsageError, before anything
    is copied.
    """
    import ast

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = out / CHECKPOINT
    try:
        tensors = load_file(directory / "trainer_state.safetensors")
        state = json.loads((directory / "trainer_state.json").read_text())
    except (OSError, SafetensorError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot resume: {directory} is incomplete or damaged ({first_line(exc)})") from None
    params = dict(model.named_parameters())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    saved = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    problems = [f"missing {n}" for n in trainable if n not in saved]
    problems += [f"unexpected {n}" for n in saved if n not in trainable]
    problems += [f"{n} is {tuple(saved[n].shape)}, the model needs {tuple(p.shape)}"  # a DTensor's shape is global
                 for n, p in trainable.items() if n in saved and saved[n].shape != p.shape]  # fmt: skip
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UsageError(
            f"cannot resume: {directory} does not fit this model and method: {'; '.join(problems[:3])}{more}"
        )
    with torch.no_grad():
        for key, tensor in tensors.items():
            if key.startswith("param."):
                param = params[key.removeprefix("param.")]
                param.copy_(distributed.shard_like(tensor, param))
    by_index = [p for group in optimizer.param_groups for p in group["params"]]
    opt_state: dict = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state["state"].setdefault(int(index), {})[name] = distributed.shard_like(value, by_index[int(index)])
    for index, values in state["optimizer_scalars"].items():
        opt_state["state"].setdefault(int(index), {}).update(values)
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    random.setstate(ast.literal_eval(state["python_random"]))
    return state["step"], state["micro_step"], state
