"""Data parallelism: DDP, or FSDP2 (``--fsdp``, or :func:`shard` in a loop of your own).

Under ``torchrun`` the model is wrapped in DDP (every rank holds every parameter) or, with
``--fsdp``, sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): one FSDP unit per
transformer block, then the root. The NF4 base of a QLoRA model is sharded too: its packed codes
and both levels of scales become frozen parameters (``NF4Linear.make_shardable``), so each rank
keeps 1/world of the 4-bit model and a block's base is all-gathered, byte for byte, right before
its forward and its backward and freed after (``reshard_after_forward``). ``--fsdp-offload``
(``offload=True``) keeps the shards in host memory (FSDP2's ``CPUOffloadPolicy``).

Sharded parameters and their Adam moments are DTensors, so the helpers here turn them into full
tensors (checkpoints, the saved adapter) and back (resume): the files on disk are the same
whatever the parallelism, and a checkpoint of one resumes in another.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "AgreedInterrupt",
    "ShardingError",
    "check_shardable",
    "full_parameters",
    "full_tensor",
    "init",
    "nf4_resident_bytes",
    "shard",
    "shard_like",
    "transformer_blocks",
    "wrap",
]


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


class ShardingError(ValueError):
    """A model FSDP cannot shard as asked (said before anything is sharded)."""


def _nf4_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft_fast.layers import NF4Linear

    return [(name, module) for name, module in model.named_modules() if isinstance(module, NF4Linear)]


def check_shardable(model: nn.Module, world: int) -> None:
    """A :class:`ShardingError` if ``model``'s NF4 base cannot be sharded over ``world`` ranks; else nothing.

    - One NF4 format per model (block size, double quantization): a transformers + bitsandbytes
      4-bit model has one quantization config, and the sharded base must stay byte-exact with it.
    - Every NF4 layer (ours, or bitsandbytes' ``Linear4bit``) needs at least one output row per rank.
    """
    if world < 1:
        raise ShardingError(f"world size must be positive, got {world}")
    layers = _nf4_layers(model)
    formats: dict[tuple[int, bool], list[str]] = {}
    for name, layer in layers:
        formats.setdefault((layer.blocksize, layer.weight_nested_absmax is not None), []).append(name)
    if len(formats) > 1:
        listed = "; ".join(
            f"block size {bs}{', double quant' if dq else ''}: {names[0]}"
            + (f" (+{len(names) - 1} more)" if len(names) > 1 else "")
            for (bs, dq), names in sorted(formats.items())
        )
        raise ShardingError(
            f"the NF4 layers mix formats ({listed}); FSDP shards one NF4 format per model, as a "
            "bitsandbytes 4-bit checkpoint has: quantize every layer with one block size"
        )
    # bitsandbytes' Linear4bit too (a PEFT model over it, patched: FSDP2 shards its packed weight).
    four_bit = layers + [(n, m) for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    too_small = [(name, layer.out_features) for name, layer in four_bit if layer.out_features < world]
    if too_small:
        name, rows = min(too_small, key=lambda item: item[1])
        raise ShardingError(
            f"world size {world} is above the {rows} output rows of NF4 layer {name!r}"
            + (f" (and {len(too_small) - 1} more layers)" if len(too_small) > 1 else "")
            + f": FSDP shards each layer's rows over the ranks; use at most {rows} ranks"
        )


def shard(
    model: nn.Module,
    *,
    mesh=None,
    offload: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard a patched model in place with FSDP2, its NF4 base included; returns ``model``.

    For a training loop of your own, after ``torch.distributed.init_process_group`` and
    ``peft_fast.patch``, on every rank::

        model = peft_fast.shard(model)                      # one FSDP unit per transformer block
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    Each block's frozen NF4 base (packed codes, per-block scales, their double-quantized scales)
    is sharded along dim 0 like any parameter: resident 4-bit bytes per rank are ~1/world of the
    model plus the block being computed. ``offload=True`` keeps the shards (and the LoRA
    parameters' shards, gradients and Adam state) in host memory (``CPUOffloadPolicy``).
    ``mesh``: a 1-D ``DeviceMesh`` (default: every rank of the default group). Raises
    :class:`ShardingError` before anything is sharded when the base cannot be (:func:`check_shardable`).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise ShardingError("peft_fast.shard needs a process group: call torch.distributed.init_process_group first")
    world = mesh.size() if mesh is not None else torch.distributed.get_world_size()
    check_shardable(model, world)
    for _, layer in _nf4_layers(model):
        layer.make_shardable()
    options: dict = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        options["mesh"] = mesh
    if offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in transformer_blocks(model):
        fully_shard(block, **options)
    root_options = {k: v for k, v in options.items() if k != "reshard_after_forward"}
    fully_shard(model, **root_options)
    return model


def nf4_resident_bytes(model: nn.Module, device_type: str | None = None) -> int:
    """Bytes of the NF4 base this rank holds now: its distinct storages (local shards and any unsharded copies).

    A storage is counted once, at its allocated size (FSDP2 frees an all-gathered copy by resizing
    it to 0); ``device_type`` ("cuda", "cpu") counts only storages there.
    """
    from torch.distributed.tensor import DTensor

    from peft_fast.layers import NF4_FIELDS

    seen: dict[int, int] = {}
    for _, layer in _nf4_layers(model):
        for name in NF4_FIELDS:
            tensor = getattr(layer, f"weight_{name}")
            if tensor is None:
                continue
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            if device_type is not None and local.device.type != device_type:
                continue
            storage = local.untyped_storage()
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values())


def wrap(model: nn.Module, world: int, fsdp: bool, offload: bool = False) -> nn.Module:
    """The module to train: ``model`` itself (one process), DDP around it, or ``model`` sharded in place."""
    if world == 1:
        return model
    if not fsdp:
        return nn.parallel.DistributedDataParallel(model)
    from peft_fast.train.args import UsageError

    try:
        check_shardable(model, world)
    except ShardingError as exc:
        raise UsageError(f"--fsdp: {exc}") from None
    try:
        shard(model, offload=offload)
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
