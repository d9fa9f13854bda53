"""Data parallelism for ``peft-fast train``: DDP, or FSDP2 with ``--fsdp``.

Under ``torchrun`` the model is wrapped in DDP (every rank holds every parameter) or, with
``--fsdp``, sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): one FSDP unit per
transformer block, then the root. Sharded parameters and their Adam moments are DTensors, so the
helpers here turn them into full tensors (checkpoints, the saved adapter) and back (resume):
the files on disk are the same whatever the parallelism, and a checkpoint of one resumes in another.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["AgreedInterrupt", "full_parameters", "full_tensor", "init", "shard_like", "transformer_blocks", "wrap"]


def init() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks (decoder / encoder layers), outermost ones only.

    Found by the class names in ``model._no_split_modules`` (transformers defines them), else as
    the children of every ``nn.ModuleList`` as long as ``config.num_hidden_layers`` (e.g. BERT).
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == layers]
        blocks = [child for m in lists for child in m]
    inner = {id(sub) for block in blocks for sub in block.modules() if sub is not block}
    return [block for block in blocks if id(block) not in inner]


def wrap(model: nn.Module, world: int, fsdp: bool) -> nn.Module:
    """The module to train: ``model`` itself (one process), DDP around it, or ``model`` sharded in place."""
    if world == 1:
        return model
    if not fsdp:
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    from peft_fast.train.args import UsageError

    try:
        for block in transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)
    except (AssertionError, NotImplementedError, RuntimeError, TypeError, ValueError) as exc:
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        what = f"--fsdp cannot shard this {type(model).__name__} ({message}); drop --fsdp to use DDP"
        raise UsageError(what) from None
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (sharded) DTensor; a plain tensor as it is. Collective for DTensors."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``full`` sharded as ``reference`` is (this rank's part, no communication); as it is if not a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(reference, DTensor) or full.shape != reference.shape:
        return full
    full = full.to(device=reference.device, dtype=reference.dtype)
    return distribute_tensor(full, reference.device_mesh, reference.placements, src_data_rank=None)


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """All ranks: inside, ``model``'s parameters are full, plain tensors (FSDP all-gathers them).

    Anything that reads parameters by name (``save_adapter``) can then run on rank 0 alone; a
    forward cannot (FSDP's hooks would reshard and gather again), so evaluation runs on every rank.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


class AgreedInterrupt:
    """Ctrl-C under FSDP: call the object once per step on every rank; True on all ranks alike.

    Under FSDP saving a checkpoint is collective, so a Ctrl-C raising KeyboardInterrupt wherever
    each rank happens to be (one inside an all-gather, another not) would hang or garble it. Here
    SIGINT only sets a flag; the ranks agree on it (all-reduce MAX) at the end of the step and stop
    together. torchrun sends SIGKILL 30 s after its own SIGINT, should a rank never get there.
    Disabled (always False, Ctrl-C untouched) for DDP and one process. ``close()`` restores Ctrl-C.
    """

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled, self.device, self.requested = enabled, device, False
        self._previous: object = None
        if enabled:
            with contextlib.suppress(ValueError):  # not the main thread: no handler, no Ctrl-C to catch
                self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        self.requested = True

    def __call__(self) -> bool:
        if not self.enabled:
            return False
        flag = torch.tensor([float(self.requested)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
