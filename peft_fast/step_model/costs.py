"""What each op costs on an H200: FLOPs, device bytes, kernels and roofline time, by rules keyed by op name.

The roofline: every kernel takes ``max(FLOPs / 790e12, bytes / 4.3e12)`` seconds (H200 bf16 dense
GEMM ~790 TFLOP/s and device copy ~4.3 TB/s read + write, both measured on the device machines);
an op's time is the sum over its kernels. Launch gaps are not modelled: each record carries its
kernel count so a reader can add them.

The rules, in the order :func:`cost_op` applies them:

- **No kernel.** Views (every output shares an input's storage, nothing mutated), allocations
  (``empty*``), shape queries, and ops touching only host tensors cost nothing and launch nothing.
- **An op with a rule in** :data:`RULES` (keyed by the overload packet, ``aten.mm``): exact FLOPs for
  ``mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` / convolution (``matmul`` and ``linear`` reach the
  dispatcher as those), FlashAttention (forward ``4·B·H·Sq·Sk·D``, halved when causal; backward
  2.5× that; the backward's five kernels of FlashAttention-2's ``mha_bwd``), and byte rules where
  an op touches less than its operands (an embedding reads its rows, not its table; ``nll_loss``
  reads one log-probability per row; its backward writes its output and reads nothing big).
  peft_fast's and bitsandbytes' ops have rules of their CUDA paths in
  :mod:`peft_fast.step_model.custom_op_costs`.
- **Any other op**: bytes only (elementwise ops and reductions), one kernel. Bytes: every distinct
  storage read once and every distinct storage written once (an in-place op's storage is both);
  per storage the tensors' extents, at most the storage's size. Creation ops (``zeros_like``,
  ``fill_``, ``copy_``'s destination, an ``out=`` argument) are written, not read. A custom op with
  no rule is costed the same way, FLOPs from ``custom_op_costs.CUSTOM_FLOPS`` where it is listed.

No device op is costed at zero: a kernel moves at least one byte.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from peft_fast.step_model import custom_op_costs
from peft_fast.step_model.roofline import (
    BF16_FLOPS_PER_S,
    COPY_BYTES_PER_S,
    Cost,
    Kernel,
    OpCall,
    kernel_seconds,
    storage_bytes,
)

__all__ = ["BF16_FLOPS_PER_S", "COPY_BYTES_PER_S", "RULES", "HopperReport", "cost_op", "kernel_seconds"]

# -- which ops launch nothing --------------------------------------------------------------------

_NO_KERNEL = {
    "aten.empty", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided", "aten.empty_like",
    "aten.sym_size", "aten.sym_stride", "aten.sym_numel", "aten.sym_storage_offset", "aten.is_same_size",
    "aten.resize_", "aten.record_stream", "aten._has_compatible_shallow_copy_type", "aten.is_pinned",
    "aten.set_", "prim.device", "prims.device", "aten.lift_fresh",
}  # fmt: skip
# Creation ops: their tensor arguments give a shape, not data.
_CREATION = {
    "aten.zeros_like", "aten.ones_like", "aten.full_like", "aten.rand_like", "aten.randn_like", "aten.randint_like",
    "aten.new_zeros", "aten.new_ones", "aten.new_full", "aten.scalar_tensor", "aten.arange", "aten.full",
    "aten.zeros", "aten.ones", "aten.rand", "aten.randn", "aten.randint", "aten.linspace", "aten.eye",
}  # fmt: skip


# -- rules ---------------------------------------------------------------------------------------


def _generic(call: OpCall, label: str = "", flops: float = 0.0) -> list[Kernel]:
    read = 0 if call.name in _CREATION else call.read_bytes()
    return [Kernel(label or call.name, flops, read + call.write_bytes())]


def _mm_flops(a: torch.Tensor, b: torch.Tensor) -> float:
    return 2.0 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (math.prod(a.shape[:-2]) if a.dim() > 2 else 1)


def _mm(call: OpCall) -> list[Kernel]:
    return _generic(call, flops=_mm_flops(call.args[0], call.args[1]))


def _addmm(call: OpCall) -> list[Kernel]:
    a, b = call.arg("mat1", call.arg("batch1")), call.arg("mat2", call.arg("batch2"))
    flops = _mm_flops(a, b)
    if call.arg("beta", 1) != 0:
        flops += math.prod(call.returned()[0].shape)  # the addition of the input
    return _generic(call, flops=flops)


def _convolution(call: OpCall) -> list[Kernel]:
    out, weight = call.returned()[0], call.arg("weight")
    groups = call.arg("groups", 1) or 1
    per_output = 2.0 * (weight.shape[1]) * math.prod(weight.shape[2:])  # Cin/groups · kernel area
    del groups
    return _generic(call, flops=per_output * out.numel())


def _convolution_backward(call: OpCall) -> list[Kernel]:
    grad_out, weight = call.args[0], call.args[2]
    mask = call.arg("output_mask", [True, True, True])
    per_output = 2.0 * weight.shape[1] * math.prod(weight.shape[2:]) * grad_out.numel()
    return _generic(call, flops=per_output * (int(mask[0]) + int(mask[1])))


def _attention_flops(q: torch.Tensor, k: torch.Tensor, causal: bool) -> float:
    batch, heads, s_q, head_dim = q.shape
    flops = 4.0 * batch * heads * s_q * k.shape[-2] * head_dim
    return flops / 2 if causal else flops


def _flash_forward(call: OpCall) -> list[Kernel]:
    q, k = call.args[0], call.args[1]
    return _generic(call, "flash_fwd_kernel", _attention_flops(q, k, bool(call.arg("is_causal", False))))


def _flash_backward(call: OpCall) -> tuple[list[Kernel], int]:
    """FlashAttention-2's mha_bwd as torch vendors it: dot(dO, O) (+ zero dQ_acc), the main kernel, dQ
    convert, and for GQA the sums of the head-expanded dK and dV."""
    grad_out, q, k, v, out = call.args[:5]
    causal = bool(call.arg("is_causal", False))
    batch, heads, s_q, head_dim = q.shape
    kv_heads, s_k = k.shape[1], k.shape[2]
    dq_acc = batch * s_q * heads * head_dim * 4
    row_stat = batch * heads * s_q * 4
    act = grad_out.element_size()
    expanded = batch * s_k * heads * head_dim * act
    gqa = kv_heads != heads
    main_reads = call.read_bytes()
    main_writes = call.write_bytes() + (2 * expanded - 2 * batch * s_k * kv_heads * head_dim * act if gqa else 0)
    kernels = [
        Kernel("flash_bwd_dot_do_o", 0.0, 2 * grad_out.numel() * act + row_stat + dq_acc),
        Kernel("flash_bwd_dq_dk_dv", 2.5 * _attention_flops(q, k, causal), main_reads + row_stat + 2 * dq_acc
               + main_writes - q.numel() * act),
        Kernel("flash_bwd_convert_dq", 0.0, dq_acc + q.numel() * act),
    ]  # fmt: skip
    if gqa:
        small = batch * s_k * kv_heads * head_dim * act
        kernels += [
            Kernel("sum dK over groups", 0.0, expanded + small),
            Kernel("sum dV over groups", 0.0, expanded + small),
        ]
    scratch = dq_acc + row_stat + (2 * expanded if gqa else 0)
    del v, out
    return kernels, scratch


def _efficient_forward(call: OpCall) -> list[Kernel]:
    q, k = call.args[0], call.args[1]
    return _generic(call, "mem_efficient_fwd", _attention_flops(q, k, bool(call.arg("is_causal", False))))


def _efficient_backward(call: OpCall) -> list[Kernel]:
    q, k = call.args[1], call.args[2]
    return _generic(call, "mem_efficient_bwd", 2.5 * _attention_flops(q, k, bool(call.arg("is_causal", False))))


def _gather_rows(call: OpCall) -> list[Kernel]:
    """embedding / index_select: the indices and the rows gathered are read, the output written."""
    indices = [t for t in call.read_tensors() if not t.is_floating_point()]
    return [Kernel(call.name, 0.0, storage_bytes(indices) + 2 * call.write_bytes())]


def _nll_loss_forward(call: OpCall) -> list[Kernel]:
    target = call.arg("target")
    rows = target.numel()
    return [Kernel(call.name, 0.0, rows * (target.element_size() + call.arg("self").element_size()) + 8)]


def _nll_loss_backward(call: OpCall) -> list[Kernel]:
    target = call.arg("target")
    return [Kernel(call.name, 0.0, call.write_bytes() + storage_bytes([target]))]


def _embedding_backward(call: OpCall) -> list[Kernel]:
    grad, indices = call.args[0], call.args[1]
    return [Kernel(call.name, 0.0, storage_bytes([grad, indices]) + call.write_bytes())]


RuleResult = list[Kernel] | tuple[list[Kernel], int]

RULES: dict[str, Callable[[OpCall], RuleResult]] = {
    "aten.mm": _mm,
    "aten.bmm": _mm,
    "aten.mv": _mm,
    "aten.addmm": _addmm,
    "aten.addmm_": _addmm,
    "aten.baddbmm": _addmm,
    "aten.convolution": _convolution,
    "aten.convolution_backward": _convolution_backward,
    "aten._scaled_dot_product_flash_attention": _flash_forward,
    "aten._scaled_dot_product_flash_attention_backward": _flash_backward,
    "aten._scaled_dot_product_efficient_attention": _efficient_forward,
    "aten._scaled_dot_product_efficient_attention_backward": _efficient_backward,
    "aten.embedding": _gather_rows,
    "aten.index_select": _gather_rows,
    "aten.embedding_dense_backward": _embedding_backward,
    "aten.nll_loss_forward": _nll_loss_forward,
    "aten.nll_loss_backward": _nll_loss_backward,
}


def cost_op(call: OpCall) -> Cost:
    """The cost of one dispatched op (see the module docstring for the rules)."""
    if call.name in _NO_KERNEL or not call.touches_device():
        return Cost("no kernel: allocation, query or host op")
    rule = RULES.get(call.name) or custom_op_costs.RULES.get(call.name)
    if rule is not None:
        result = rule(call)
        kernels, scratch = result if isinstance(result, tuple) else (result, 0)
        return Cost(f"rule {call.name}", kernels, scratch)
    if call.is_view():
        return Cost("no kernel: view")
    if call.namespace in ("aten", "prims"):
        return Cost("bytes: inputs + outputs", _generic(call))
    custom_flops = custom_op_costs.CUSTOM_FLOPS
    flops = custom_flops[call.name](call) if call.name in custom_flops else 0.0
    basis = "FLOPs from CUSTOM_FLOPS, " if call.name in custom_flops else ""
    return Cost(f"custom op without a rule: {basis}bytes of inputs + outputs", _generic(call, flops=flops))


# -- the static Hopper report's ratios --------------------------------------------------------------

_REPORT_KINDS = {
    "peft_fast.lora_linear": lambda m: "qlora_decode" if m <= 16 else "qlora_forward",
    "peft_fast.lora_linear_backward": lambda m: "qlora_backward",
    "peft_fast.ia3_linear": lambda m: "ia3_forward",
    "peft_fast.bottleneck_adapter": lambda m: "adapter_forward",
}


def _meta_lora_call(entry: dict, backward: bool) -> OpCall:
    """A ``peft_fast::lora_linear`` (or its backward) call at a report entry's shape, on meta tensors."""
    m, n, k, r = entry["M"], entry["N"], entry["K"], entry["r"] or 16
    meta = {"device": "meta", "dtype": torch.bfloat16}
    numel = n * k
    blocks = -(-numel // 64)
    weight = (torch.empty(((numel + 1) // 2, 1), device="meta", dtype=torch.uint8),
              torch.empty(blocks, device="meta", dtype=torch.uint8),
              torch.empty(-(-blocks // 256), device="meta", dtype=torch.float32),
              torch.empty((), device="meta", dtype=torch.float32), 64)  # fmt: skip
    x, a, b = torch.empty(m, k, **meta), torch.empty(r, k, **meta), torch.empty(n, r, **meta)
    seed = torch.empty(1, dtype=torch.int64)
    if backward:
        func = torch.ops.peft_fast.lora_linear_backward.default
        args = (torch.empty(m, n, **meta), x, torch.empty(m, r, **meta), *weight, a, b, 2.0, entry["dropout"], seed,
                True, True, True)  # fmt: skip
        out = (torch.empty(m, k, **meta), torch.empty(r, k, **meta), torch.empty(n, r, **meta))
    else:
        func = torch.ops.peft_fast.lora_linear.default
        args = (x, *weight, a, b, None, 2.0, entry["dropout"], seed)
        out = (torch.empty(m, n, **meta), torch.empty(m, r, **meta))
    return OpCall(func, args, {}, out, lambda t: isinstance(t, torch.Tensor) and t.device.type == "meta")


class HopperReport:
    """Per-op-kind ratios from the static Hopper report (``bench/hopper/baseline-triton-3.9.json``).

    An op whose kind the report has (peft_fast's QLoRA forward, backward and decode, (IA)³ and
    bottleneck-adapter forwards) has its roofline scaled by the report's ratio at its nearest shape
    (least Σ |log| distance over M, N, K). For the QLoRA kinds the ratio is the report's predicted
    time over *this model's* roofline of the same op at that shape (every launch the report
    predicts is one this model prices), so at the report's shapes the two agree exactly; the
    report's own predicted / floor differs from it where the floor is not the op's roofline (the
    backward's floor is one dense GEMM). For (IA)³ and adapters it is predicted / floor.
    ``nf4_dequantize`` is at 1.00, so other ops (scratch dequantization among them) keep their roofline.
    """

    def __init__(self, path) -> None:
        import json
        from pathlib import Path

        self.path = Path(path)
        data = json.loads(self.path.read_text())
        self.entries: dict[str, list[dict]] = {}
        self._ratios: dict[tuple, float] = {}
        for op in data["ops"]:
            if op.get("floor_us"):
                self.entries.setdefault(op["op"], []).append(op)

    @classmethod
    def default(cls) -> HopperReport | None:
        """The committed Triton 3.9 baseline of this checkout, or None where it is not there."""
        from pathlib import Path

        import peft_fast

        path = Path(peft_fast.__file__).resolve().parents[1] / "bench" / "hopper" / "baseline-triton-3.9.json"
        return cls(path) if path.is_file() else None

    def ratio(self, call: OpCall) -> tuple[float, str]:
        kind_of = _REPORT_KINDS.get(call.name)
        if kind_of is None:
            return 1.0, ""
        x = call.args[1] if call.name == "peft_fast.lora_linear_backward" else call.args[0]
        m, k = x.numel() // x.shape[-1], x.shape[-1]
        outs = call.returned()
        n = outs[0].shape[-1] if call.name != "peft_fast.lora_linear_backward" else call.args[9].shape[0]
        kind = kind_of(m)
        entries = self.entries.get(kind)
        if not entries:
            return 1.0, ""
        log = lambda a, b: abs(math.log(max(a, 1) / max(b, 1)))
        best = min(entries, key=lambda e: log(m, e["M"]) + log(n, e["N"]) + log(k, e["K"]))
        key = (kind, best["M"], best["N"], best["K"])
        if key not in self._ratios:
            if kind.startswith("qlora"):
                meta_call = _meta_lora_call(best, kind == "qlora_backward")
                result = custom_op_costs.RULES[meta_call.name](meta_call)
                kernels = result[0] if isinstance(result, tuple) else result
                ours = sum(kernel.seconds for kernel in kernels) * 1e6
                self._ratios[key] = best["predicted_us"] / ours
            else:
                self._ratios[key] = best["predicted_us"] / best["floor_us"]
        ratio = self._ratios[key]
        return ratio, f"× {ratio:.3f}: Hopper report {kind} M={best['M']} N={best['N']} K={best['K']}"
