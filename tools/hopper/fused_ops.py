"""Report and sweep entries: the fused training-step ops (RMSNorm, RoPE, GLU, cross-entropy), DoRA, mixed batches.

Shapes are Llama-3-8B's at two sequences of 2048 tokens (M = 4096 rows, hidden 4096, 32 query and
8 key/value heads of 128, MLP 14336, vocabulary 128,256), bf16. RMSNorm, RoPE and the GLU are
bandwidth-bound: floor = their fewest bytes at the HBM rate, goal ≥ 85 % of the copy rate. The
linear cross-entropy is GEMM-bound: floor = its FLOPs at the bf16 rate, no goal stated yet.
"""

from __future__ import annotations

import torch

from tools.hopper.cases import BLOCKSIZE, DTYPES, Goal, OpCase, OpEntry, element_size, fake, fake_base, weight_bytes

TOKENS, HIDDEN, MLP, VOCAB = 4096, 4096, 14336, 128256
BATCH, SEQ, HEADS, KV_HEADS, HEAD_DIM = 2, 2048, 32, 8, 128
COPY_GOAL = Goal("copy_fraction_min", 0.85)
BANDWIDTH_NOTE = "bandwidth-bound: floor = the fewest bytes at the HBM rate"
MIXED_ADAPTERS = (8, 64, 512)  # distinct adapters in a mixed batch (issue 27)


def _bandwidth_case(op: str, m: int, n: int, k: int, run, nbytes: float, dtype: str, note: str = "",
                    goal: Goal | None = COPY_GOAL) -> OpCase:  # fmt: skip
    return OpCase(op, m, n, k, 0, "dense", 0.0, run, flops=0.0, bytes=nbytes, goal=goal,
                  note=note or BANDWIDTH_NOTE, dtype=dtype, bandwidth="copy")  # fmt: skip


def rms_norm_forward(m: int = TOKENS, d: int = HIDDEN, *, dtype: str = "bf16", residual: bool = True) -> OpCase:
    """``rms_norm_forward`` (Llama casting), with the residual add fused: reads x (+ residual), writes y (+ s)."""
    t = DTYPES[dtype]

    def run() -> None:
        from peft_fast.kernels.rms_norm import rms_norm_forward as launch

        launch(fake(m, d, dtype=t), fake(d, dtype=t), fake(m, d, dtype=t) if residual else None, 1e-5, 0.0, "llama")

    tensors = 4 if residual else 2  # x, residual in; y, s out
    nbytes = element_size(dtype) * (tensors * m * d + d) + 4 * m  # + weight, fp32 rstd
    return _bandwidth_case("rms_norm_forward", m, d, d, run, nbytes, dtype)


def rms_norm_backward(m: int = TOKENS, d: int = HIDDEN, *, dtype: str = "bf16", residual: bool = True) -> OpCase:
    """``rms_norm_backward``: dY (+ dS), the norm input and rstd in; dX out (dw summed on the side)."""
    t = DTYPES[dtype]

    def run() -> None:
        from peft_fast.kernels.rms_norm import rms_norm_backward as launch

        launch(
            fake(m, d, dtype=t), fake(m, d, dtype=t) if residual else None, fake(m, d, dtype=t), fake(d, dtype=t),
            fake(m, dtype=torch.float32), 0.0, "llama", True, True,
        )  # fmt: skip

    tensors = 4 if residual else 3
    nbytes = element_size(dtype) * (tensors * m * d + 2 * d) + 4 * m
    return _bandwidth_case("rms_norm_backward", m, d, d, run, nbytes, dtype)


def rope_forward(*, dtype: str = "bf16") -> OpCase:
    """``rope_rotate_`` of q and k in place ([B, H, S, D], GQA): q and k read and written once, cos / sin read."""
    t = DTYPES[dtype]

    def run() -> None:
        from peft_fast.kernels.rope import rope_rotate_

        q = fake(BATCH, HEADS, SEQ, HEAD_DIM, dtype=t)
        k = fake(BATCH, KV_HEADS, SEQ, HEAD_DIM, dtype=t)
        rope_rotate_(q, k, fake(BATCH, SEQ, HEAD_DIM, dtype=t), fake(BATCH, SEQ, HEAD_DIM, dtype=t))

    qk = BATCH * SEQ * (HEADS + KV_HEADS) * HEAD_DIM
    nbytes = element_size(dtype) * (2 * qk + 2 * BATCH * SEQ * HEAD_DIM)
    # The cost model charges each tensor argument once, so an in-place kernel's prediction counts q
    # and k read but not written: below this floor, and its copy fraction overstated (about 2x).
    # No goal is judged: a copy fraction near 200 % would read as "met" while it only shows the gap.
    note = f"{BANDWIDTH_NOTE}; in place: the model charges q and k once (read, not written), so it predicts below it"
    return _bandwidth_case(
        "rope_forward", BATCH * SEQ, (HEADS + KV_HEADS) * HEAD_DIM, HEAD_DIM, run, nbytes, dtype, note, goal=None
    )


def glu_forward(m: int = TOKENS, i: int = MLP, *, dtype: str = "bf16", activation: str = "silu") -> OpCase:
    """``glu_forward`` (SwiGLU): gate and up in, act(gate)·up out."""
    t = DTYPES[dtype]

    def run() -> None:
        from peft_fast.kernels.glu import glu_forward as launch

        launch(fake(m, i, dtype=t), fake(m, i, dtype=t), activation)

    return _bandwidth_case("glu_forward", m, i, i, run, element_size(dtype) * 3 * m * i, dtype)


def glu_backward(m: int = TOKENS, i: int = MLP, *, dtype: str = "bf16", activation: str = "silu") -> OpCase:
    """``glu_backward``: dY, gate and up in; d_gate and d_up out."""
    t = DTYPES[dtype]

    def run() -> None:
        from peft_fast.kernels.glu import glu_backward as launch

        launch(fake(m, i, dtype=t), fake(m, i, dtype=t), fake(m, i, dtype=t), activation)

    return _bandwidth_case("glu_backward", m, i, i, run, element_size(dtype) * 5 * m * i, dtype)


def linear_cross_entropy(n: int = TOKENS, h: int = HIDDEN, v: int = VOCAB, *, dtype: str = "bf16") -> OpCase:
    """``linear_cross_entropy_forward`` over a frozen head (QLoRA): the loss and dHidden, no logits kept."""
    t = DTYPES[dtype]

    def run() -> None:
        from peft_fast.kernels.cross_entropy import linear_cross_entropy_forward

        linear_cross_entropy_forward(
            fake(n, h, dtype=t), fake(v, h, dtype=t), None, fake(n, dtype=torch.int64), None, -100, None, 0,
            True, False, False,
        )  # fmt: skip

    # logits = hidden·Wᵀ and dHidden = dlogits·W: two N×H×V GEMMs
    nbytes = element_size(dtype) * (2 * n * h + v * h) + 8 * n
    note = "logits and dHidden GEMMs (2·2·N·H·V at the bf16 rate); the head is frozen"
    return OpCase("linear_cross_entropy", n, v, h, 0, "dense", 0.0, run, flops=4.0 * n * h * v, bytes=nbytes,
                  note=note, dtype=dtype)  # fmt: skip


def dora_weight_norm(
    n: int = HIDDEN, k: int = HIDDEN, r: int = 16, *, dtype: str = "bf16", base: str = "nf4dq"
) -> OpCase:
    """``dora_weight_norm_triton``: ‖deq(W) + s·B·A‖ per row; W, A, B read once, N norms written."""
    t = DTYPES[dtype]

    def run() -> None:
        from peft_fast.kernels.dora import dora_weight_norm_triton

        dora_weight_norm_triton(fake_base(base, n, k, t), fake(r, k, dtype=t), fake(n, r, dtype=t), 2.0)

    nbytes = weight_bytes(base, n, k, dtype) + element_size(dtype) * (r * k + n * r + n)
    note = f"{BANDWIDTH_NOTE}; B·A (2·N·K·r FLOPs) is computed per tile, never stored"
    return OpCase("dora_weight_norm", 0, n, k, r, base, 0.0, run, flops=2.0 * n * k * r, bytes=nbytes,
                  goal=COPY_GOAL, note=note, dtype=dtype, bandwidth="copy")  # fmt: skip


def dora_forward(m: int, n: int = HIDDEN, k: int = HIDDEN, r: int = 16, *, dtype: str = "bf16", base: str = "nf4dq",
                 blocksize: int = BLOCKSIZE) -> OpCase:  # fmt: skip
    """DoRA's layer without dropout over NF4: what ``peft_fast.ops.dora_linear`` launches (``peft_fast::dora_linear``).

    ``dora_linear_forward``, its choice's static head: above decode sizes one pass over the NF4
    codes writes deq(W) and the norm's fp32 partials, then H = X·Aᵀ, cuBLAS over deq(W) and the
    LoRA term, then m/‖·‖ and the bias in one pass over Y0 finishing the norm from the partials.
    The floor is the LoRA forward's (2·M·N·K at the bf16 rate); README compares its prediction with
    qlora_forward's at the same shape (issue goal: DoRA ≤ 1.15 × our LoRA layer).
    """
    t = DTYPES[dtype]

    def run() -> None:
        from peft_fast.kernels.dora import dora_linear_forward

        dora_linear_forward(fake(m, k, dtype=t), fake_base(base, n, k, t, blocksize), fake(r, k, dtype=t),
                            fake(n, r, dtype=t), fake(n, dtype=torch.float32), None, 2.0)  # fmt: skip

    activations = element_size(dtype) * (m * k + m * n + 2 * r * (n + k))
    nbytes = weight_bytes(base, n, k, dtype, blocksize) + activations + 4 * n
    flops = 2.0 * m * n * k + 2.0 * m * r * (n + k)
    return OpCase("dora_forward", m, n, k, r, base, 0.0, run, flops=flops, bytes=nbytes, dtype=dtype,
                  floor_flops=2.0 * m * n * k, note="DoRA layer, no dropout; compare with qlora_forward")  # fmt: skip


def dora_backward(m: int, n: int = HIDDEN, k: int = HIDDEN, r: int = 16, *, dtype: str = "bf16") -> OpCase:
    """DoRA's layer backward without dropout over NF4: what autograd runs through ``dora_linear``.

    ``dora_scale``'s backward (one pass over dY and Y: dY scaled per column and Σ_rows dY·Y per row
    block; dm = their sum / ‖·‖), then ``lora_linear_backward`` with every gradient (dX, dA, dB, dH) of the scaled
    dY. Compare with qlora_backward at the same shape (no dropout there: 0.1).
    """
    t = DTYPES[dtype]

    def run() -> None:
        from peft_fast.kernels.dora import dora_scale_backward_triton
        from peft_fast.kernels.lora_linear import lora_linear_backward

        f32 = torch.float32
        grad_out, y, norm, magnitude = fake(m, n, dtype=t), fake(m, n, dtype=t), fake(n, dtype=f32), fake(n, dtype=f32)
        grad_y, column_sums = dora_scale_backward_triton(grad_out, y, magnitude, norm)
        column_sums / norm
        lora_linear_backward(grad_y, fake(m, k, dtype=t), fake(m, r, dtype=t), fake_base("nf4dq", n, k, t),
                             fake(r, k, dtype=t), fake(n, r, dtype=t), 2.0, 0.0, 0, True, True, True)  # fmt: skip

    size = element_size(dtype)
    nbytes = size * (3 * m * n + 2 * m * k + m * r + 2 * r * (n + k)) + weight_bytes("nf4dq", n, k, dtype) + 8 * n
    flops = 2.0 * m * n * k + 4.0 * m * n * r + 4.0 * m * k * r
    note = "DoRA layer backward, no dropout; compare with qlora_backward"
    return OpCase("dora_backward", m, n, k, r, "nf4dq", 0.0, run, flops=flops, bytes=nbytes, dtype=dtype,
                  floor_flops=2.0 * m * n * k, note=note)  # fmt: skip


def _mixed_stacks(adapters: int, n: int, k: int, r: int, t: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The batch's adapters stacked as ``peft_fast.ops.lora_mixed`` stacks them: A [L, r, K], B [L, N, r], s [L]."""
    return fake(adapters, r, k, dtype=t), fake(adapters, n, r, dtype=t), fake(adapters, dtype=torch.float32)


def _mixed_case(op: str, m: int, adapters: int, n: int, k: int, r: int, dtype: str, run, note: str) -> OpCase:
    # The LoRA term alone (the base GEMM runs once for the whole batch, whichever method): X read,
    # Y read and written (the term is added in place), every adapter's A and B read once.
    elem = element_size(dtype)
    nbytes = elem * (m * k + 2 * m * n + adapters * r * (n + k))
    return OpCase(op, m, n, k, r, "dense", 0.0, run, flops=2.0 * m * r * (n + k), bytes=nbytes, note=note,
                  dtype=dtype, bandwidth="hbm")  # fmt: skip


def lora_mixed_forward(
    adapters: int, m: int = 512, n: int = HIDDEN, k: int = HIDDEN, r: int = 16, *, dtype: str = "bf16"
) -> OpCase:
    """A mixed-adapter batch's LoRA term (``adapter_names=[...]``): ``lora_mixed_forward``'s two gathered kernels.

    M rows (one decode token per sequence) spread evenly over ``adapters`` adapters; the op's name
    carries the adapter count (a case's id is its op and M, N, K). Compare with ``peft_mixed_loop``.
    """
    t = DTYPES[dtype]

    def run() -> None:
        from peft_fast.kernels.lora_mixed import group_rows
        from peft_fast.kernels.lora_mixed import lora_mixed_forward as launch

        slots = [row * adapters // m for row in range(m)]  # sorted, even segments
        launch(fake(m, n, dtype=t), fake(m, k, dtype=t), *_mixed_stacks(adapters, n, k, r, t), None,
               group_rows(slots, 1, "cuda"))  # fmt: skip

    note = f"{adapters} adapters x {m // adapters} rows; the LoRA term only, floor = its fewest bytes at the HBM rate"
    return _mixed_case(f"lora_mixed_forward_{adapters}", m, adapters, n, k, r, dtype, run, note)


def peft_mixed_loop(
    adapters: int, m: int = 512, n: int = HIDDEN, k: int = HIDDEN, r: int = 16, *, dtype: str = "bf16"
) -> OpCase:
    """PEFT's ``_mixed_batch_forward`` at the same shapes: per adapter, gather rows, lora_A, lora_B, scale, add.

    The torch ops PEFT's LoRA layer runs per adapter (``x[idx]``, two ``F.linear``, ``* scaling``,
    ``result[idx] += ...``), costed by the report's library-call rules and launch gaps: the baseline
    for :func:`lora_mixed_forward`, as tools/hopper/peft_bnb.py is for the single-adapter layer.
    """
    t = DTYPES[dtype]

    def run() -> None:
        result, x = fake(m, n, dtype=t), fake(m, k, dtype=t)
        rows = m // adapters
        for i in range(adapters):
            index = torch.arange(i * rows, (i + 1) * rows, device="cuda")
            sub = x[index]
            out = torch.nn.functional.linear(torch.nn.functional.linear(sub, fake(r, k, dtype=t)), fake(n, r, dtype=t))
            result[index] += out * 2.0

    note = f"{adapters} adapters x {m // adapters} rows: PEFT's loop over adapters (its launches at roofline + gaps)"
    return _mixed_case(f"peft_mixed_loop_{adapters}", m, adapters, n, k, r, dtype, run, note)


ENTRIES: list[OpEntry] = [
    OpEntry(
        "rms_norm",
        lambda: [rms_norm_forward(), rms_norm_backward()],
        lambda dtype: [
            f(dtype=dtype, residual=res) for f in (rms_norm_forward, rms_norm_backward) for res in (True, False)
        ],
    ),
    OpEntry("rope", lambda: [rope_forward()], lambda dtype: [rope_forward(dtype=dtype)]),
    OpEntry(
        "glu",
        lambda: [glu_forward(), glu_backward()],
        lambda dtype: [
            f(dtype=dtype, activation=a) for f in (glu_forward, glu_backward) for a in ("silu", "gelu_tanh")
        ],
    ),
    OpEntry("cross_entropy", lambda: [linear_cross_entropy()], lambda dtype: [linear_cross_entropy(dtype=dtype)]),
    OpEntry(
        "dora",
        lambda: [dora_weight_norm(), dora_forward(512), dora_forward(4096), dora_backward(512), dora_backward(4096)],
        lambda dtype: (
            [dora_weight_norm(dtype=dtype, base=b, r=r) for b in ("dense", "nf4", "nf4dq") for r in (16, 64)]
            # decode: the standalone norm; mid: the dequant + norm pass, row-scaled and general NF4 loaders
            + [dora_forward(m, dtype=dtype, base=b) for m in (13, 300) for b in ("nf4", "nf4dq")]
            + [dora_forward(300, dtype=dtype, blocksize=32)]
        ),
    ),
    OpEntry(
        "lora_mixed",
        # issue 27: the mixed-adapter batch at 8, 64 and 512 distinct adapters, ours and PEFT's loop
        lambda: [case(a) for a in MIXED_ADAPTERS for case in (lora_mixed_forward, peft_mixed_loop)],
        # one row per adapter, a few rows each, and a long segment (BLOCK_M 16 ... 64), every dtype
        lambda dtype: [lora_mixed_forward(a, m=m, dtype=dtype) for a, m in ((13, 13), (4, 100), (2, 300))],
    ),
]
