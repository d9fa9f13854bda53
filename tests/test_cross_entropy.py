"""``peft_fast.ops.cross_entropy.linear_cross_entropy`` (and its kernels) against Hugging Face's own loss path.

The reference is what a causal LM's forward computes with labels: ``F.linear`` + Gemma 2's
softcap ops + ``transformers.loss.loss_utils.ForCausalLMLoss``, with autograd through it. Both
backends (``PEFT_FAST_BACKEND=torch``, and ``triton``: the kernels under the interpreter here),
fp64 / fp32 / bf16, padding, all-ignored batches, ``num_items_in_batch``, ``shift_labels``,
softcap, odd vocabularies, many chunks, a trainable lm_head, autocast; NaN-poisoned buffers,
determinism, opcheck, ``torch.compile``, and the live memory of the chunk loop.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import ForCausalLMLoss

from peft_fast.kernels import cross_entropy as kernels
from peft_fast.ops.cross_entropy import _linear_cross_entropy_op, linear_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# fp64 / fp32: max |error| relative to max |expected|; bf16: ‖error‖ / ‖expected‖.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("PEFT_FAST_BACKEND", request.param)
    return request.param


@pytest.fixture
def keep_fp64(monkeypatch):
    """ForCausalLMLoss upcasts with ``logits.float()``: keep fp64 logits fp64, so HF's own code is an fp64 reference."""
    upcast = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda t: t if t.dtype == torch.float64 else upcast(t))


def hf_loss(hidden, weight, labels, bias=None, softcap=None, **loss_kwargs) -> torch.Tensor:
    """The loss of a Hugging Face causal LM (Gemma2ForCausalLM.forward's softcap), op for op."""
    logits = F.linear(hidden, weight, bias)
    if softcap is not None:
        logits = logits / softcap
        logits = torch.tanh(logits)
        logits = logits * softcap
    return ForCausalLMLoss(logits, labels, weight.shape[0], **loss_kwargs)


def hf_loss_of_logits(logits, labels, softcap=None) -> torch.Tensor:
    """HF's loss of [N, V] logits whose labels are already shifted."""
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return ForCausalLMLoss(logits, None, logits.shape[-1], shift_labels=labels)


def make_inputs(batch, seq, hidden_size, vocab, dtype, *, logit_scale=1.0, bias=False, train_head=False):
    """Inputs whose logits have standard deviation ~``logit_scale``; labels with padding and a prompt."""
    hidden = torch.randn(batch, seq, hidden_size, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=DEVICE) * logit_scale / hidden_size**0.5).to(dtype)
    b = torch.randn(vocab, device=DEVICE).to(dtype) if bias else None
    if train_head:
        weight.requires_grad_()
        b = None if b is None else b.requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), device=DEVICE)
    labels[0, :3] = -100  # a prompt
    labels[-1, -4:] = -100  # right padding
    return hidden, weight, b, labels


def chunk_loop(backend: str):
    """The op's body on ``backend``: the chunk loop with the Triton row kernel or the torch rows."""
    if backend == "triton":
        return kernels.linear_cross_entropy_forward
    return kernels.linear_cross_entropy_reference_forward


def assert_near(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    actual, expected = actual.detach().double(), expected.detach().double()
    if dtype == torch.bfloat16:
        error = float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
    else:
        error = float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.3g} > {TOLERANCE[dtype]:g}"


def compare_with_hf(hidden, weight, bias, labels, *, softcap=None, chunk_rows=None, compute_dtype=None, **loss_kwargs):
    """Loss and gradients (every operand that requires grad) of the op vs HF's path; returns the op's."""
    dtype = compute_dtype or hidden.dtype
    operands = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    expected = hf_loss(hidden, weight, labels, bias, softcap, **loss_kwargs)
    expected_grads = torch.autograd.grad(expected, operands)
    actual = linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=softcap, chunk_rows=chunk_rows,
                                  **loss_kwargs)  # fmt: skip
    actual_grads = torch.autograd.grad(actual, operands)
    assert actual.dtype == expected.dtype and actual.shape == ()
    assert_near(actual, expected, dtype, "loss")
    for i, (a, e) in enumerate(zip(actual_grads, expected_grads, strict=True)):
        assert_near(a, e, dtype, f"gradient {i}")
    return actual, actual_grads


# -- against Hugging Face ---------------------------------------------------------------------------

CASES = {
    # name: (batch, seq, hidden, vocab, make_inputs options, loss options)
    "padding": (2, 12, 32, 1000, {}, {}),
    "num_items_int": (2, 9, 16, 1000, {}, {"num_items_in_batch": 23}),
    "num_items_tensor": (2, 9, 16, 1000, {}, {"num_items_in_batch": "tensor"}),
    "shift_labels": (2, 9, 16, 1000, {}, {"shift_labels": True}),
    "softcap_trained_head": (2, 8, 16, 1000, {"logit_scale": 40.0, "bias": True, "train_head": True},
                             {"softcap": 30.0}),
    # 26 rows in chunks of 7 (the last one 5 rows), a vocabulary no power of two divides.
    "chunks_odd_vocab": (2, 13, 24, 2999, {"logit_scale": 4.0, "bias": True, "train_head": True},
                         {"chunk_rows": 7}),
}  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_hugging_face(backend, dtype, case, request):
    if dtype == torch.float64:
        request.getfixturevalue("keep_fp64")
    batch, seq, hidden_size, vocab, input_options, loss_options = CASES[case]
    hidden, weight, bias, labels = make_inputs(batch, seq, hidden_size, vocab, dtype, **input_options)
    loss_options = dict(loss_options)
    if loss_options.get("num_items_in_batch") == "tensor":
        loss_options["num_items_in_batch"] = torch.tensor(23, device=DEVICE)
    if loss_options.pop("shift_labels", False):
        shift = torch.randint(0, vocab, labels.shape, device=DEVICE)
        shift[:, ::4] = -100
        loss_options["shift_labels"] = shift
        labels = None
    _, (grad_hidden, *_) = compare_with_hf(hidden, weight, bias, labels, **loss_options)
    if "shift_labels" not in loss_options:
        ignored = F.pad(labels, (0, 1), value=-100)[..., 1:] == -100
        assert (grad_hidden[ignored] == 0).all()  # padding and prompt positions get exactly no gradient


def test_two_dimensional_hidden(backend):
    hidden, weight, bias, labels = make_inputs(1, 21, 16, 1000, torch.float32, bias=True, train_head=True)
    compare_with_hf(hidden[0].detach().requires_grad_(), weight, bias, labels[0], chunk_rows=4)


@pytest.mark.parametrize("num_items", [None, 5], ids=["mean", "sum"])
def test_all_tokens_ignored(backend, num_items):
    """HF's mean over zero tokens is 0/0 = NaN (and every gradient 0); its sum / num_items is 0."""
    hidden, weight, bias, labels = make_inputs(2, 6, 16, 1000, torch.float32, bias=True, train_head=True)
    labels.fill_(-100)
    operands = (hidden, weight, bias)
    expected = hf_loss(hidden, weight, labels, bias, num_items_in_batch=num_items)
    expected_grads = torch.autograd.grad(expected, operands)
    actual = linear_cross_entropy(hidden, weight, labels, bias=bias, num_items_in_batch=num_items)
    actual_grads = torch.autograd.grad(actual, operands)
    assert torch.isnan(expected) == torch.isnan(actual) == (num_items is None)
    if num_items is not None:
        assert actual == expected == 0
    for a, e in zip(actual_grads, expected_grads, strict=True):
        assert torch.equal(a, e) and (a == 0).all()


def test_under_autocast_with_fp32_parameters(backend):
    """torch.autocast(bf16) over fp32 parameters: bf16 logits as nn.Linear's, gradients back in fp32."""
    hidden, weight, bias, labels = make_inputs(2, 10, 32, 1000, torch.float32, logit_scale=40.0, bias=True,
                                               train_head=True)  # fmt: skip
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        _, grads = compare_with_hf(
            hidden, weight, bias, labels, softcap=30.0, chunk_rows=8, compute_dtype=torch.bfloat16
        )
    assert all(g.dtype == torch.float32 for g in grads)


def test_gradient_is_scaled_by_the_loss_gradient(backend, keep_fp64):
    hidden, weight, bias, labels = make_inputs(2, 7, 16, 1000, torch.float64, bias=True, train_head=True)
    operands = (hidden, weight, bias)
    expected = torch.autograd.grad(-2.5 * hf_loss(hidden, weight, labels, bias), operands)
    actual = torch.autograd.grad(-2.5 * linear_cross_entropy(hidden, weight, labels, bias=bias), operands)
    for a, e in zip(actual, expected, strict=True):
        assert_near(a, e, torch.float64, "gradient")


def test_no_grad_computes_the_loss_only(backend):
    hidden, weight, bias, labels = make_inputs(2, 9, 16, 1000, torch.float32, bias=True, train_head=True)
    with_grad = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_rows=5)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_rows=5)
    assert torch.equal(loss, with_grad.detach()) and not loss.requires_grad
    # The custom op is one call here; its body's GEMMs are counted on the chunk loop below.
    hidden_rows = hidden.detach().reshape(-1, 16)
    targets = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    with _LiveBytes() as recorder:
        _, *grads = chunk_loop(backend)(hidden_rows, weight.detach(), bias.detach(), targets, None, -100, None, 5,
                                        False, False, False)  # fmt: skip
    assert grads == [None, None, None]
    assert recorder.calls.get("aten.addmm.out", 0) == 4 and "aten.mm.out" not in recorder.calls  # 18 rows: 4 chunks


def test_bad_inputs_are_refused():
    hidden, weight, _, labels = make_inputs(2, 5, 16, 100, torch.float32)
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy(hidden, weight, labels[:, :4])
    with pytest.raises(TypeError, match="dtype"):
        linear_cross_entropy(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="features"):
        linear_cross_entropy(hidden, weight[:, :8], labels)
    with pytest.raises(TypeError, match="integer"):
        linear_cross_entropy(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(hidden, weight, labels, softcap=0.0)


def test_a_label_out_of_range_gives_nan(backend):
    """HF raises on such a label; the op cannot without a host sync, so the loss is NaN (both backends)."""
    hidden, weight, _, labels = make_inputs(1, 6, 16, 100, torch.float32)
    labels[0, 2] = 100
    assert torch.isnan(linear_cross_entropy(hidden, weight, labels))
    labels[0, 2] = -7
    assert torch.isnan(linear_cross_entropy(hidden, weight, labels))


# -- the row kernel -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "vocab", "block_v", "softcap"),
    [
        (torch.float32, 1000, 128, None),  # 8 blocks, the last 104 wide
        (torch.float32, 2999, 512, 10.0),
        (torch.bfloat16, 1000, 256, 10.0),
        (torch.bfloat16, 2999, None, None),  # the launcher's block: one, 4096 wide
    ],
    ids=str,
)
def test_row_kernel_against_the_torch_rows(dtype, vocab, block_v, softcap):
    """Several vocabulary blocks with a ragged last one; NaN-poisoned ignored rows are never read."""
    rows = 6
    logits = (torch.randn(rows, vocab, device=DEVICE) * 8).to(dtype)
    labels = torch.randint(0, vocab, (rows,), device=DEVICE)
    labels[[1, 4]] = -100
    labels[3] = vocab - 1  # the last entry of the ragged block
    logits[[1, 4]] = float("nan")
    scale = torch.tensor([1 / 9], device=DEVICE)
    losses = torch.full((rows,), float("nan"), device=DEVICE)
    grads = logits.clone()
    kernels.cross_entropy_rows_(grads, labels, losses, scale, -100, softcap, True, block_v)
    expected_losses = torch.empty(rows, device=DEVICE)
    expected_grads = torch.where(labels[:, None] == -100, 0.0, logits.float()).to(dtype)
    kernels.cross_entropy_rows_reference_(expected_grads, labels, expected_losses, scale, -100, softcap, True)
    assert torch.allclose(losses, expected_losses, rtol=1e-6, atol=1e-5)
    assert (grads[[1, 4]] == 0).all() and (losses[[1, 4]] == 0).all()
    # fp32: exp(z − lse) with lse a few ulps apart; bf16: a rounding or two apart (three under the cap).
    rtol = 1e-5 if dtype == torch.float32 else 2**-6
    torch.testing.assert_close(grads.float(), expected_grads.float(), rtol=rtol, atol=1e-12)
    # Without write_grad the logits are only read.
    losses_only = torch.empty(rows, device=DEVICE)
    kernels.cross_entropy_rows_(logits, labels, losses_only, scale, -100, softcap, False, block_v)
    assert torch.equal(losses_only, losses) and torch.isnan(logits[[1, 4]]).all()


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("rows_fn", [kernels.cross_entropy_rows_, kernels.cross_entropy_rows_reference_],
                         ids=["triton", "torch"])  # fmt: skip
def test_bf16_logit_gradients_have_hf_bits(rows_fn, softcap):
    """d(loss)/d(logits) rounds to bf16 where autograd rounds HF's (the softcap's backward too): the bits
    agree but for the odd last-ulp case of a differently rounded exp (and fp32 denormals, where the
    interpreter's exp flushes)."""
    rows, vocab = 8, 1000
    logits = (torch.randn(rows, vocab, device=DEVICE) * 40).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (rows,), device=DEVICE)
    labels[3] = -100
    leaf = logits.clone().requires_grad_()
    (expected,) = torch.autograd.grad(hf_loss_of_logits(leaf, labels, softcap), leaf)
    grads, losses = logits.clone(), torch.empty(rows, device=DEVICE)
    rows_fn(grads, labels, losses, torch.tensor([1 / 7], device=DEVICE), -100, softcap, True)
    normal = torch.maximum(grads.float().abs(), expected.float().abs()) >= 2**-126
    assert ((grads != expected) & normal).float().mean() <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_poisoned_buffers(backend, dtype, monkeypatch):
    """Every buffer the GEMMs and the row kernel write comes NaN-filled: results are bit-identical."""
    hidden, weight, bias, labels = make_inputs(2, 7, 16, 1000, dtype, bias=True, train_head=True)
    clean = linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=30.0, chunk_rows=4)
    clean_grads = torch.autograd.grad(clean, (hidden, weight, bias))
    nan_filled = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(kernels, "_empty", nan_filled)
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=30.0, chunk_rows=4)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert torch.equal(loss, clean)
    for a, e in zip(grads, clean_grads, strict=True):
        assert torch.equal(a, e)


def test_deterministic(backend):
    hidden, weight, bias, labels = make_inputs(2, 7, 16, 1000, torch.bfloat16, bias=True, train_head=True)
    runs = []
    for _ in range(2):
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=30.0, chunk_rows=5)
        runs.append([loss, *torch.autograd.grad(loss, (hidden, weight, bias))])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# -- custom op, compile ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend_name", "trained_head"), [("torch", False), ("torch", True), ("triton", True)])
def test_opcheck(backend_name, trained_head, monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", backend_name)
    hidden, weight, bias, labels = make_inputs(1, 10, 16, 300, torch.float32, bias=trained_head,
                                               train_head=trained_head)  # fmt: skip
    targets = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    num_items = None if trained_head else torch.tensor(7, device=DEVICE)
    softcap = 30.0 if trained_head else None
    needs = (True, trained_head, trained_head)
    args = (hidden.reshape(-1, 16), weight, bias, targets, num_items, -100, softcap, 4, *needs)
    torch.library.opcheck(_linear_cross_entropy_op, args)


def test_torch_compile_fullgraph(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")
    hidden, weight, bias, labels = make_inputs(2, 9, 16, 1000, torch.float32, logit_scale=40.0, bias=True,
                                               train_head=True)  # fmt: skip

    def loss_fn(hidden, weight, bias, labels, num_items):
        return linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=30.0, num_items_in_batch=num_items,
                                    chunk_rows=4)  # fmt: skip

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for num_items in (None, torch.tensor(11, device=DEVICE)):
        expected = loss_fn(hidden, weight, bias, labels, num_items)
        actual = compiled(hidden, weight, bias, labels, num_items)
        assert torch.equal(actual, expected)
        for a, e in zip(torch.autograd.grad(actual, (hidden, weight, bias)),
                        torch.autograd.grad(expected, (hidden, weight, bias)), strict=True):  # fmt: skip
            assert torch.equal(a, e)


# -- memory ----------------------------------------------------------------------------------------------


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages allocated under the mode that are still alive (tracked by storage,
    released when the last tensor viewing it dies), their peak, and a count of every aten call."""

    def __init__(self, *inputs: torch.Tensor) -> None:
        super().__init__()
        # Storages by their StorageImpl address (``_cdata``), which fake tensors have too.
        self.external = {t.untyped_storage()._cdata for t in inputs}
        self.storages: dict[int, list[int]] = {}  # storage -> [bytes, tensors alive]
        self.live = self.peak = 0
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func)] = self.calls.get(str(func), 0) + 1
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, nbytes = storage._cdata, storage.nbytes()
        if nbytes == 0 or key in self.external:
            return
        entry = self.storages.setdefault(key, [nbytes, 0])
        if entry[1] == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[key]


@pytest.mark.parametrize(
    ("backend_name", "dtype", "softcap"),
    [("triton", torch.bfloat16, None), ("torch", torch.float32, None), ("torch", torch.bfloat16, None),
     ("torch", torch.bfloat16, 30.0)],
    ids=str,
)  # fmt: skip
def test_peak_memory_is_one_chunk_of_logits(backend_name, dtype, softcap):
    """The chunk loop's peak of extra live memory, beyond the returned gradients: one chunk of logits in
    the compute dtype (on the torch backend + an fp32 working copy, and the softcap's tanh and one
    more), never N·V."""
    n, h, v, chunk = 64, 32, 1000, 4  # V = 1000: rows padded to 1024, the GEMMs write through the stride
    hidden = torch.randn(n, h, device=DEVICE).to(dtype)
    weight = (torch.randn(v, h, device=DEVICE) / h**0.5).to(dtype)
    bias = torch.randn(v, device=DEVICE).to(dtype)
    labels = torch.randint(0, v, (n,), device=DEVICE)
    labels[::5] = -100
    triton_rows = backend_name == "triton"
    with _LiveBytes(hidden, weight, bias, labels) as recorder:
        outputs = chunk_loop(backend_name)(hidden, weight, bias, labels, None, -100, softcap, chunk, True, True, True)
    returned = sum(t.untyped_storage().nbytes() for t in outputs)
    extra = recorder.peak - returned
    chunk_bytes = chunk * 1024 * hidden.element_size()
    # Per-token losses, the bias's fp32 accumulator and its per-chunk sum, labels' mask: O(N + V).
    small = 4 * (2 * n + 2 * v) + 1024
    budget = chunk_bytes
    if not triton_rows:
        budget += (chunk * v * 4 if dtype != torch.float32 else 0) + (2 * chunk_bytes if softcap else 0)
    assert extra <= budget + small, (extra, budget, small)
    assert extra < n * v * 4 / 2  # the fp32 logits of all tokens: 16 fp32 chunks here
    assert recorder.live <= returned + 4096  # nothing left behind but the results


@pytest.mark.parametrize("weight_trains", [False, True], ids=["frozen_head", "trained_head"])
def test_llama3_8b_peak_memory_with_fake_tensors(weight_trains, monkeypatch):
    """Llama-3-8B (N = 2048, H = 4096, V = 128256, bf16) traced with fake tensors: the chunk loop keeps
    one [256, V] bf16 logits chunk (512 rows when W trains) beyond its results, 6.25% (12.5%) of
    the 1.05 GB of fp32 logits. The row kernel, which allocates nothing (above), is stubbed out: fake
    tensors cannot be launched."""
    monkeypatch.setattr(kernels, "cross_entropy_rows_", lambda *args: None)
    n, h, v = 2048, 4096, 128256
    with FakeTensorMode():
        hidden = torch.empty(n, h, dtype=torch.bfloat16)
        weight = torch.empty(v, h, dtype=torch.bfloat16)
        labels = torch.zeros(n, dtype=torch.int64)
        with _LiveBytes(hidden, weight, labels) as recorder:
            outputs = kernels.linear_cross_entropy_forward(
                hidden, weight, None, labels, None, -100, None, 0, True, weight_trains, False
            )
        returned = sum(t.untyped_storage().nbytes() for t in outputs if t is not None)
    chunk_rows = 512 if weight_trains else 256
    extra = recorder.peak - returned
    assert chunk_rows * v * 2 <= extra <= chunk_rows * v * 2 + 4 * n + 1024
    assert extra / (n * v * 4) < (0.126 if weight_trains else 0.063)  # 65.7 MB (131 MB) of 1.05 GB
