"""Pieces every GEMM kernel module shares: run-time config pruning (GPU list everywhere), dot, tile order, epilogue."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import triton
import triton.language as tl

# Set when the kernels were defined under the Triton interpreter (TRITON_INTERPRET=1 at import):
# they are then plain Python functions, so CPU tensors are accepted. Launch *policies* (configs,
# tiles, splits) never read it: they are the GPU's everywhere (see :func:`autotune`).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# fp32 inputs must not be rounded to TF32 on the tensor cores (the fp32 tolerance is 1e-5).
_DOT_PRECISION = {torch.float32: "ieee", torch.float16: "tf32", torch.bfloat16: "tf32"}


# -- autotuning -------------------------------------------------------------------------------

MIN_DOT_BLOCK = 16  # tl.dot's smallest M, N and K


def _cfg(num_warps: int = 4, num_stages: int = 3, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def interpreted(args: Iterable[object]) -> bool:
    """Whether a launch with these arguments runs under the Triton interpreter, decided at call time.

    True when ``TRITON_INTERPRET=1`` now or a tensor argument is not on a CUDA device; the static
    Hopper report's fake CUDA tensors count as a GPU.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return any(isinstance(a, torch.Tensor) and a.device.type != "cuda" for a in args)


def fitted_block(block: int, dim: int) -> int:
    """``block`` shrunk to the power of two that covers ``dim`` (never below tl.dot's 16)."""
    return min(block, max(MIN_DOT_BLOCK, triton.next_power_of_2(max(int(dim), 1))))


def fitted_config(config: triton.Config, args: Mapping[str, object], dims: Mapping[str, str]) -> triton.Config:
    """``config`` with each of its blocks named in ``dims`` (block -> argument holding its dimension) fitted to it."""
    fitted = copy.copy(config)
    fitted.kwargs = dict(config.kwargs)
    for block, dim in dims.items():
        if block in config.kwargs:
            fitted.kwargs[block] = fitted_block(config.kwargs[block], args[dim])
    return fitted


def _within_caps(config: triton.Config, args: Mapping[str, object], caps: Mapping[str, str]) -> bool:
    return all(config.kwargs[block] <= int(args[cap]) for block, cap in caps.items())


def _interpreter_safe_bench(kernel_call: Callable[[], object], quantiles: Sequence[float]) -> list[float]:
    """Triton's benchmarker on a GPU; nothing under the interpreter, where one config is left to run.

    (Triton 3.6 benchmarks even a single config, and its benchmarker needs a GPU driver.)
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [0.0] * len(quantiles)
    from triton.runtime import driver

    return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def autotune(
    configs: list[triton.Config],
    key: list[str],
    dims: Mapping[str, str],
    caps: Mapping[str, str] | None = None,
    **kwargs,
):
    """``triton.autotune`` over the GPU's config list, pruned at each call from the launch's arguments.

    On a GPU every config satisfying ``caps`` (block name -> argument it may not exceed, e.g. the
    NF4 row loaders' BLOCK_K <= BLOCKSIZE) is kept, so the autotuner and the static Hopper report
    see the whole list. Under the interpreter (:func:`interpreted`) one config is kept, the
    list's first, with each block of ``dims`` (block name -> the argument holding its dimension)
    shrunk only as far as that dimension demands (:func:`fitted_block`): the CPU tests run the
    tiles, splits and code paths a GPU runs, not a separate small config. The autotuning ``key``
    must determine the fitted config (every dimension in ``dims`` is in the key, M through its
    power-of-two bucket).
    """
    caps = dict(caps or {})

    def prune(candidates: list[triton.Config], named_args: dict, **meta) -> list[triton.Config]:
        args = {**named_args, **meta}
        allowed = [c for c in candidates if _within_caps(c, args, caps)]
        if not allowed:
            limits = {cap: args[cap] for cap in caps.values()}
            raise ValueError(f"no autotune config satisfies {caps} for {limits}")
        if not interpreted(named_args.values()):
            return allowed
        return [fitted_config(allowed[0], args, dims)]

    return triton.autotune(
        configs=configs,
        key=key,
        prune_configs_by={"early_config_prune": prune},
        do_bench=_interpreter_safe_bench,
        **kwargs,
    )


def smallest_block(configs: Sequence[triton.Config], block: str, dim: int) -> int:
    """The smallest ``block`` a launch over ``dim`` may get from :func:`autotune` (to size per-block partials)."""
    return min(fitted_block(c.kwargs[block], dim) for c in configs)


# LoRA ranks are handled in chunks of at most this many columns (padded to >= 16 for tl.dot).
_MAX_BLOCK_R = 64


def _m_bucket(m: int) -> int:
    """Autotuning key for M: its power-of-two bucket, so every batch size does not retune."""
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def _block_r(rank: int) -> int:
    """Rank chunk for tl.dot: a power of two >= 16 (the MMA minimum), at most _MAX_BLOCK_R."""
    return min(max(MIN_DOT_BLOCK, triton.next_power_of_2(rank)), _MAX_BLOCK_R)


# -- device helpers ---------------------------------------------------------------------------

# The interpreter keeps bf16 tensors as raw uint16 and its tl.dot would multiply those bits.
_BF16_DOT_IN_FP32 = tl.constexpr(_INTERPRET)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a·b with fp32 accumulation (tl.dot; see _BF16_DOT_IN_FP32 for the interpreter)."""
    if _BF16_DOT_IN_FP32 and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _grouped_tile(pid, n_rows, n_cols, GROUP: tl.constexpr):
    """(row, col) tile of program ``pid``: programs sweep GROUP row tiles per column tile, so
    neighbours in launch order share column (weight) tiles while those are still in L2."""
    tiles_per_group = GROUP * n_cols
    first_row = (pid // tiles_per_group) * GROUP
    rows_in_group = tl.minimum(n_rows - first_row, GROUP)
    within = pid % tiles_per_group
    return first_row + within % rows_in_group, within // rows_in_group


@triton.jit
def _add_bias_and_lora_up(
    acc, offs_m, offs_n, M, N, R, scale, h_ptr, lora_b_ptr, bias_ptr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """acc + b + s·H·Bᵀ for the [BLOCK_M, BLOCK_N] tile at (offs_m, offs_n), in fp32."""
    lora = tl.zeros_like(acc)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        h_mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
        h = tl.load(h_ptr + offs_m[:, None].to(tl.int64) * R + offs_r[None, :], mask=h_mask, other=0.0)
        b_mask = (offs_r[:, None] < R) & (offs_n[None, :] < N)
        b_t = tl.load(lora_b_ptr + offs_n[None, :].to(tl.int64) * R + offs_r[:, None], mask=b_mask, other=0.0)
        lora = _dot(h, b_t, lora, DOT_PRECISION)
    acc += scale * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return acc


# -- arrival counters (a last-arriving program reduces the partials) ------------------------------

_COUNTERS: dict[tuple, torch.Tensor] = {}


def _stream_key(device: torch.device) -> tuple:
    if device.type == "cuda" and torch.cuda.is_initialized():
        return (str(device), torch.cuda.current_stream(device).stream_id)
    return (str(device), 0)


def arrival_counters(count: int, device: torch.device) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``count`` arrival counters for this device and stream.

    For kernels whose last-arriving program reduces the others' partials (the decode kernel, dA):
    launches on one stream never overlap, so they share it.

    Each launch leaves its counters zero again, so the buffer is zeroed once, when it is made.
    """
    key = _stream_key(device)
    buffer = _COUNTERS.get(key)
    if buffer is None or buffer.numel() < count:
        buffer = torch.zeros(max(count, 256), dtype=torch.int32, device=device)
        _COUNTERS[key] = buffer
    return buffer
