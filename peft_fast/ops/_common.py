"""What every custom op shares: the backend choice, autocast, seeds, dropout, and the base weight as plain tensors.

Backends, chosen per call from the input's device (:func:`backend_name`):

- ``cuda``: the Triton kernels of ``peft_fast/kernels/``;
- ``triton-interpreter``: the same kernels on CPU tensors when ``PEFT_FAST_BACKEND=triton``
  (or ``TRITON_INTERPRET=1``), which is how the tests run them without a GPU;
- ``torch-cpu``: each op's torch reference (beside its kernels), the same math and the same
  dropout semantics (the mask is regenerated from the seed in backward).

Under ``torch.autocast`` every op behaves as ``nn.Linear`` does: its floating inputs (never the
NF4 scales) are cast to the autocast dtype, so the op computes and returns that dtype, and each
parameter's gradient comes back through the cast in its own dtype. The op bodies run with
autocast off (:func:`no_autocast`), so their outputs always have the dtypes their fake
implementations promise.
"""

from __future__ import annotations

import contextlib
import numbers
import os

import torch

from peft_fast.nf4 import NF4Weight, dequantize_nf4

SEED_BOUND = 2**31 - 1

# The dtypes autocast recasts (it leaves float64, and every non-float tensor, alone).
AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# What an op's activations may be (float64 on the torch backend only: gradcheck).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def backend_name(device: torch.device | str | None = None) -> str:
    """The backend used for tensors on ``device``: ``cuda``, ``triton-interpreter`` or ``torch-cpu``.

    Read at every call, so tests can switch with ``PEFT_FAST_BACKEND`` (``triton`` or ``torch``).
    """
    device = torch.device("cuda" if device is None and torch.cuda.is_available() else device or "cpu")
    requested = os.environ.get("PEFT_FAST_BACKEND", "")
    if device.type == "cuda" and requested != "torch":
        return "cuda"
    if device.type == "cpu" and requested == "triton":
        return "triton-interpreter"
    return "torch-cpu"


def uses_kernels(where: torch.device | torch.Tensor) -> bool:
    """Whether ops on ``where`` (a device, or a tensor: its device and dtype) run the Triton kernels.

    On the GPU or under the interpreter they do, except for float64 tensors: the kernels compute in
    fp32 / bf16 / fp16, so float64 (gradcheck, float64 references) runs the torch reference of the
    same math on every backend, as the public input checks promise.
    """
    if isinstance(where, torch.Tensor):
        return where.dtype != torch.float64 and backend_name(where.device) != "torch-cpu"
    return backend_name(where) != "torch-cpu"


# -- torch.autocast -----------------------------------------------------------------------


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes a linear layer of ``x`` in, or None where it casts nothing.

    None when autocast is off for ``x``'s device type or ``x`` is not fp32 / fp16 / bf16 (autocast
    leaves fp64 alone). Works under ``torch.compile``, which guards on the autocast state.
    """
    device_type = x.device.type
    if x.dtype not in AUTOCAST_DTYPES or not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_inputs(dtype: torch.dtype | None, *tensors):
    """``tensors`` with every fp32 / fp16 / bf16 tensor cast to ``dtype`` (all unchanged when None).

    The cast is differentiable: a parameter's gradient flows back through it in its own dtype.
    """
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in AUTOCAST_DTYPES else t for t in tensors)


def no_autocast(device: torch.device):
    """A context in which autocast is off for ``device``: op bodies compute in their inputs' dtypes."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of statistics and elementwise math: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- the base weight travels through a custom op as plain tensors --------------------------


def base_to_args(base: torch.Tensor | NF4Weight) -> tuple:
    """(weight, absmax, nested_absmax, nested_offset, blocksize); blocksize 0 means dense."""
    if isinstance(base, NF4Weight):
        return base.packed, base.absmax, base.nested_absmax, base.nested_offset, base.blocksize
    if not isinstance(base, torch.Tensor):
        raise TypeError(f"base must be a torch.Tensor or an NF4Weight, got {type(base).__name__}")
    return base, None, None, None, 0


def args_to_base(weight, absmax, nested_absmax, nested_offset, blocksize: int, out_features: int, in_features: int):
    """The frozen weight back from :func:`base_to_args`'s tensors."""
    if blocksize == 0:
        return weight
    # dtype only names the default dequantization dtype; every caller passes one explicitly.
    return NF4Weight(
        weight, absmax, (out_features, in_features), torch.float32, blocksize, nested_absmax, nested_offset
    )


def dense_weight(base: torch.Tensor | NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a dense tensor of ``dtype`` (NF4 dequantized, on the backend's path)."""
    if not isinstance(base, NF4Weight):
        return base.to(dtype)
    if not uses_kernels(base.device) or dtype == torch.float64:
        return dequantize_nf4(base, dtype)
    from peft_fast.kernels.nf4_dequant import dequantize_nf4_triton

    return dequantize_nf4_triton(base, dtype)


# -- seeds and dropout ----------------------------------------------------------------------


def seed_tensor(seed: int | None) -> torch.Tensor:
    """The dropout seed as a CPU int64 tensor, drawn from torch's generator when None.

    Drawn in-graph, so ``torch.compile`` does not recompile per seed, and from the global
    generator, so gradient checkpointing (which restores the RNG state) replays the same mask.
    """
    if seed is None:
        return torch.randint(0, SEED_BOUND, (1,), dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {seed!r}")  # int(1.5) would quietly give seed 1
    if not 0 <= int(seed) <= SEED_BOUND:
        raise ValueError(f"seed must be in [0, 2**31 - 1], got {seed}")
    return torch.tensor([int(seed)], dtype=torch.int64)


def dropout_mask(seed: int, rows: int, cols: int, p: float, device: torch.device | str) -> torch.Tensor:
    """The keep-mask (bool [rows, cols]) the ops use for ``seed`` on ``device``'s backend.

    The Triton backends draw Philox numbers (:mod:`peft_fast.kernels.dropout`, replayed here in
    torch bit for bit); the torch backend draws from a ``torch.Generator`` seeded with ``seed``,
    ~100x cheaper on a CPU than emulating Philox. Either way the mask is a pure function of the
    seed, so backward regenerates exactly the forward's mask and nothing is stored.
    """
    if uses_kernels(torch.device(device)):
        from peft_fast.kernels.dropout import dropout_mask as philox_mask

        return philox_mask(seed, rows, cols, p, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(rows, cols, generator=generator, device=device) >= p


def keep_mask(t: torch.Tensor, p: float, seed: int) -> torch.Tensor | None:
    """The keep-mask for a 2-D ``t`` under dropout ``p`` (None when p is 0)."""
    return None if p == 0.0 else dropout_mask(seed, t.shape[0], t.shape[1], p, t.device)


# -- inputs -----------------------------------------------------------------------------------


def check_input(x, in_features: int) -> None:
    """The checks every layer's forward makes on its input: a float tensor [..., in_features]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [..., {in_features}], got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must be a tensor of shape [..., in_features], got a 0-d tensor")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a float tensor (float32, float16, bfloat16 or float64), got {x.dtype}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features but the base weight expects {in_features}")
