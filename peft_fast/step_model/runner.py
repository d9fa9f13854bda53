"""One traced training step of a stack, and the totals a reader needs: :func:`run`, :func:`compare`.

A step is what ``Trainer(bf16=True)`` runs per batch minus the optimizer: ``model(input_ids,
labels=input_ids)`` under ``torch.autocast("cuda", torch.bfloat16)``, the output object dropped
(Trainer keeps only the loss), then ``loss.backward()``. Batch × sequence tokens, labels = ids.

Depth: the model at full depth (default), or ``extrapolate=True``: runs at 2 and 3 layers and
``total(L) = run(3) + (L − 3)·(run(3) − run(2))`` for every additive figure (time, FLOPs, bytes,
kernels, ops, per-kind totals) and for the memory figures (parameters, gradients, bytes saved, the
peak). The peak is a maximum, not a sum: its extrapolation is right when the peak happens at the
same point of the step (the loss, a layer's backward) at every depth, which the result states
(``peak_at`` of both runs) and the tests check against direct runs. Not 1 and 2 layers: the
fused step keeps the last layer's activations under checkpointing (``keep_last_layer``), so a
1-layer model has no checkpointed layer at all, and its difference to 2 layers is not a layer's.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import time
from dataclasses import asdict, dataclass, field

import torch

from peft_fast.step_model.costs import BF16_FLOPS_PER_S, COPY_BYTES_PER_S, HopperReport
from peft_fast.step_model.memory import on_device
from peft_fast.step_model.stacks import STACKS, build_stack, llama3_8b_config
from peft_fast.step_model.trace import OpRecord, StepTrace, fake_cuda, trace_step

__all__ = ["KindTotals", "StepResult", "compare", "one_layer", "run"]


@dataclass
class KindTotals:
    """One op kind's share of the step (summed over its calls)."""

    calls: float = 0
    kernels: float = 0
    flops: float = 0.0
    bytes: float = 0.0
    roofline_ms: float = 0.0
    ms: float = 0.0


@dataclass
class StepResult:
    """A step's figures on the modelled H200. ``ms`` includes the Hopper report's ratios, ``roofline_ms`` does not."""

    stack: str
    model: str
    layers: int
    seq: int
    batch: int
    checkpointing: bool
    autocast: bool
    offload: bool
    ops: float  # device ops (views, allocations and host ops excluded); a custom op is one
    kernels: float  # launches: a custom op counts the kernels of its CUDA path
    flops: float
    bytes: float
    roofline_ms: float
    ms: float
    peak_bytes: float
    peak_at: str
    saved_bytes: float  # distinct activation storages autograd saved in the forward
    static_bytes: float  # alive before the step: weights, buffers, quantization states, inputs
    grad_bytes: float
    by_kind: dict[str, KindTotals] = field(default_factory=dict)
    by_phase: dict[str, KindTotals] = field(default_factory=dict)
    depth: str = "direct"  # or "extrapolated from 2 and 3 layers"
    notes: list[str] = field(default_factory=list)
    trace_seconds: float = 0.0  # wall time of building and tracing (this machine is shared)
    trace_cpu_seconds: float = 0.0
    records: list[OpRecord] | None = None

    @property
    def flop_floor_ms(self) -> float:
        return self.flops / BF16_FLOPS_PER_S * 1e3

    def to_dict(self, records: bool = False) -> dict:
        """Plain data for JSON (the op records only when asked: a 32-layer step has ~10⁴)."""
        data = asdict(self)
        if not records:
            data.pop("records")
        else:
            data["records"] = [asdict(r) for r in self.records or []]
        data["flop_floor_ms"] = self.flop_floor_ms
        return data


def _config_with(config, layers: int | None):
    config = copy.deepcopy(config if config is not None else llama3_8b_config())
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def _model_name(config) -> str:
    dims = f"h{config.hidden_size} i{config.intermediate_size} v{config.vocab_size}"
    return f"{type(config).__name__.removesuffix('Config')} {dims}"


def _totals(records: list[OpRecord], key) -> dict[str, KindTotals]:
    out: dict[str, KindTotals] = {}
    for r in records:
        if not r.device:
            continue
        t = out.setdefault(key(r), KindTotals())
        t.calls += 1
        t.kernels += r.kernels
        t.flops += r.flops
        t.bytes += r.bytes
        t.roofline_ms += r.roofline_s * 1e3
        t.ms += r.seconds * 1e3
    return dict(sorted(out.items(), key=lambda item: -item[1].ms))


def _step_fn(model, batch: int, seq: int, device: str, autocast: bool):
    ids = torch.zeros((batch, seq), dtype=torch.long, device=device)

    def step(recorder) -> None:
        amp = torch.autocast(device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with amp:
            out = model(input_ids=ids, labels=ids)
        loss = out["loss"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]
        del out  # as Trainer: only the loss survives the forward
        recorder.phase = "backward"
        loss.backward()

    return step


def _one_run(config, stack: str, seq: int, batch: int, checkpointing: bool, autocast: bool, offload: bool,
             fake: bool, device: str, report: HopperReport | None, kbit_prepare: bool, fused,
             keep_records: bool) -> StepResult:  # fmt: skip
    started, cpu_started = time.perf_counter(), time.process_time()
    # The step is traced eagerly: frames an earlier torch.compile left in Dynamo's cache (HF's
    # forwards are shared code objects) would otherwise run compiled, and the trace would record
    # the compiler's symbolic fake tensors instead of the step's ops.
    torch._dynamo.reset()
    # Real CPU runs count every CPU storage of the process: collect earlier garbage now, not mid-step.
    gc.collect()
    with fake_cuda() if fake else contextlib.nullcontext() as session:
        model = build_stack(config, stack, fake=fake, device=device, checkpointing=checkpointing, offload=offload,
                            kbit_prepare=kbit_prepare, fused=fused)  # fmt: skip
        step = _step_fn(model, batch, seq, device, autocast and device == "cuda")
        trace: StepTrace = trace_step(step, model, session, report.ratio if report else None, device)
        is_device = on_device(device)
        grads = {p.grad.untyped_storage()._cdata: p.grad.untyped_storage().nbytes() for p in model.parameters()
                 if p.grad is not None and is_device(p.grad)}  # fmt: skip
        del model
    device_records = [r for r in trace.records if r.device]
    memory = trace.memory
    return StepResult(
        stack=stack, model=_model_name(config), layers=config.num_hidden_layers, seq=seq, batch=batch,
        checkpointing=checkpointing, autocast=autocast, offload=offload, ops=len(device_records),
        kernels=sum(r.kernels for r in device_records), flops=sum(r.flops for r in device_records),
        bytes=sum(r.bytes for r in device_records), roofline_ms=sum(r.roofline_s for r in device_records) * 1e3,
        ms=sum(r.seconds for r in device_records) * 1e3, peak_bytes=memory.peak_bytes, peak_at=memory.peak_at,
        saved_bytes=trace.saved.bytes, static_bytes=memory.peak_static, grad_bytes=sum(grads.values()),
        by_kind=_totals(device_records, lambda r: r.name), by_phase=_totals(device_records, lambda r: r.phase),
        notes=list(trace.notes), trace_seconds=time.perf_counter() - started,
        trace_cpu_seconds=time.process_time() - cpu_started,
        records=trace.records if keep_records else None,
    )  # fmt: skip


_ADDITIVE = ("ops", "kernels", "flops", "bytes", "roofline_ms", "ms", "peak_bytes", "saved_bytes", "static_bytes",
             "grad_bytes")  # fmt: skip


BASE_DEPTHS = (2, 3)  # the depths an extrapolation is fitted to


def _extrapolated(one: StepResult, two: StepResult, layers: int) -> StepResult:
    """``two + (layers − two.layers)·(two − one)`` for every additive figure and per-kind / per-phase total.

    ``one`` and ``two`` are runs one layer apart.
    """
    steps = layers - two.layers
    result = copy.copy(two)
    for name in _ADDITIVE:
        setattr(result, name, getattr(two, name) + steps * (getattr(two, name) - getattr(one, name)))

    def grow(a: dict[str, KindTotals], b: dict[str, KindTotals]) -> dict[str, KindTotals]:
        out = {}
        for kind in dict.fromkeys([*b, *a]):
            x, y = a.get(kind, KindTotals()), b.get(kind, KindTotals())
            out[kind] = KindTotals(*(getattr(y, f) + steps * (getattr(y, f) - getattr(x, f))
                                     for f in KindTotals.__dataclass_fields__))  # fmt: skip
        return dict(sorted(out.items(), key=lambda item: -item[1].ms))

    result.by_kind, result.by_phase = grow(one.by_kind, two.by_kind), grow(one.by_phase, two.by_phase)
    result.depth = f"extrapolated from {one.layers} and {two.layers} layers"
    result.peak_at = f"{two.peak_at} ({two.layers} layers); {one.peak_at} ({one.layers} layers)"
    result.layers = layers
    result.notes = sorted(set(one.notes) | set(two.notes))
    result.trace_seconds = one.trace_seconds + two.trace_seconds
    result.trace_cpu_seconds = one.trace_cpu_seconds + two.trace_cpu_seconds
    result.records = None
    return result


def run(
    config=None,
    stack: str = "peft_fast",
    seq: int = 2048,
    batch: int = 1,
    checkpointing: bool = True,
    autocast: bool = True,
    offload: bool = False,
    layers: int | None = None,
    *,
    extrapolate: bool = False,
    fake: bool = True,
    device: str = "cuda",
    hopper_report: bool = True,
    kbit_prepare: bool = False,
    fused=None,
    keep_records: bool = False,
) -> StepResult:
    """Trace one training step of ``stack`` on ``config`` (default Llama-3-8B's dims) and price it on an H200.

    Args:
        config: a transformers causal-LM config (built from its dims: nothing is downloaded).
        stack: "peft_fast" (``peft_fast.patch`` QLoRA with its fused step), "peft_bnb" (PEFT over
            transformers' bitsandbytes 4-bit), or "none" (the plain model, every weight trained).
        seq, batch: tokens per row and rows.
        checkpointing: Hugging Face's non-reentrant gradient checkpointing.
        autocast: bf16 autocast on CUDA (as ``Trainer(bf16=True)``).
        offload: peft_fast's ``patch(..., offload_activations=True)`` (checkpointed inputs on the host).
        layers: the depth (default: the config's).
        extrapolate: run 2 and 3 layers (:data:`BASE_DEPTHS`) and extrapolate to ``layers`` (see the module docstring).
        fake: fake tensors (the H200 model); False runs real tensors (the checks' reference).
        device: "cuda" (the model; fake only) or "cpu" (the checks: real or fake CPU tensors, no autocast).
        hopper_report: scale peft_fast's QLoRA ops by the static Hopper report's ratios (``ms``).
        kbit_prepare: ``peft.prepare_model_for_kbit_training`` on the PEFT + bitsandbytes stack.
        fused: peft_fast's ``patch(..., fused=...)`` (default: patch's own default, every piece).
        keep_records: keep every op record on the result.
    """
    if stack not in (*STACKS, "none"):
        raise ValueError(f"unknown stack {stack!r}; choose from {', '.join(STACKS)} (or 'none')")
    config = _config_with(config, layers)
    if device == "cuda" and not fake:
        raise ValueError("real tensors run on the CPU here (device='cpu'); the CUDA model is fake=True")
    report = HopperReport.default() if hopper_report and device == "cuda" else None
    args = (stack, seq, batch, checkpointing, autocast, offload, fake, device, report, kbit_prepare, fused)
    depth = config.num_hidden_layers
    if not extrapolate or depth <= BASE_DEPTHS[1]:
        return _one_run(config, *args, keep_records)
    one, two = (_one_run(_config_with(config, d), *args, False) for d in BASE_DEPTHS)
    return _extrapolated(one, two, depth)


def one_layer(config=None, **kwargs) -> StepResult:
    """What one more decoder layer adds to the step: ``run(3 layers) − run(2 layers)``, every figure and kind.

    The peak is not additive; ``peak_bytes`` here is the difference of the two peaks (what a layer adds
    to the peak at this depth). ``kwargs`` go to :func:`run` (not ``layers`` / ``extrapolate``).
    """
    one, two = (run(config, layers=d, **kwargs) for d in BASE_DEPTHS)
    delta = _extrapolated(one, two, two.layers + 1)  # run(3) + (run(3) − run(2)): subtract run(3) again
    for name in _ADDITIVE:
        setattr(delta, name, getattr(delta, name) - getattr(two, name))
    for totals, base in ((delta.by_kind, two.by_kind), (delta.by_phase, two.by_phase)):
        for kind, t in totals.items():
            b = base.get(kind, KindTotals())
            for f in KindTotals.__dataclass_fields__:
                setattr(t, f, getattr(t, f) - getattr(b, f))
    delta.by_kind = {k: v for k, v in sorted(delta.by_kind.items(), key=lambda kv: -kv[1].ms) if v.calls}
    delta.layers, delta.depth = 1, "one layer: run(3 layers) − run(2 layers)"
    return delta


def compare(config=None, **kwargs) -> dict:
    """Both stacks on one setting: ``{"peft_bnb": StepResult, "peft_fast": StepResult, "ratios": {...}}``.

    Ratios are PEFT + bitsandbytes over peft_fast (above 1: peft_fast is faster / leaner).
    """
    theirs = run(config, stack="peft_bnb", **{k: v for k, v in kwargs.items() if k != "offload"})
    ours = run(config, stack="peft_fast", **kwargs)
    ratio = lambda a, b: a / b if b else float("nan")
    return {
        "peft_bnb": theirs,
        "peft_fast": ours,
        "ratios": {
            "ms": ratio(theirs.ms, ours.ms),
            "roofline_ms": ratio(theirs.roofline_ms, ours.roofline_ms),
            "kernels": ratio(theirs.kernels, ours.kernels),
            "peak_bytes": ratio(theirs.peak_bytes, ours.peak_bytes),
            "saved_bytes": ratio(theirs.saved_bytes, ours.saved_bytes),
        },
    }


__all__ += ["BF16_FLOPS_PER_S", "COPY_BYTES_PER_S"]
