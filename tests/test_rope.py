"""``peft_fast.ops.rope.apply_rope`` (and its kernels) against Hugging Face's ``apply_rotary_pos_emb``.

cos / sin come from HF's own rotary modules: ``LlamaRotaryEmbedding`` for every rope type it
computes (default, linear, dynamic, llama3, yarn, longrope) at positions past the original
context, and ``Phi3RotaryEmbedding`` with a partial rotary factor (Phi-3's function is the
reference there). q and k are what HF's attention makes: transposed views of the projections'
outputs, GQA, odd sequence lengths and head counts, per-row positions. Both backends
(``PEFT_FAST_BACKEND=torch``; ``triton``: the kernels, under the interpreter without a GPU):
fp64 / fp32 bit for bit, bf16 within 1e-2 relative Frobenius norm, values and gradients. Also
the in-place contract (the projection's buffer holds the result, nothing around it is touched),
gradients autograd shares between consumers, leaves, fallbacks, autocast, gradient
checkpointing, ``torch.compile``, gradcheck, opcheck and NaN-poisoned buffers.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig, Phi3Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply

from peft_fast.kernels import rope as kernels
from peft_fast.ops.rope import _rope_inplace_op, _rope_op, apply_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
# Original context 16, max 32; positions 40.. are past both (dynamic NTK rescales there).
ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
        "rope_theta": 500000.0,
    },
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.05 * i for i in range(8)],
        "long_factor": [1.5 + 0.25 * i for i in range(8)],
        "factor": 2.0,
        "original_max_position_embeddings": 16,
        "rope_theta": 10000.0,
    },
}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("PEFT_FAST_BACKEND", request.param)
    return request.param


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def llama_cos_sin(rope_type: str, dtype: torch.dtype, position_ids: torch.Tensor, head_dim: int = 16):
    """cos / sin from HF's LlamaRotaryEmbedding for ``rope_type``, in ``dtype`` (as HF casts them to x's)."""
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32, rope_parameters=dict(ROPE_PARAMETERS[rope_type]))  # fmt: skip
    module = LlamaRotaryEmbedding(config).to(DEVICE)
    return module(torch.zeros(1, device=DEVICE, dtype=dtype), position_ids.to(DEVICE))


def projections(batch, seq, q_heads, kv_heads, head_dim, dtype):
    """Leaf projection outputs [B, S, H·D] and q / k as HF's attention views them: ``view(B, S, H, D).transpose(1, 2)``.

    The views are taken of ``leaf * 1`` (a non-leaf, as a projection's output is), fresh each call.
    """
    q_out = torch.randn(batch, seq, q_heads * head_dim, device=DEVICE, dtype=torch.float64).to(dtype)
    k_out = torch.randn(batch, seq, kv_heads * head_dim, device=DEVICE, dtype=torch.float64).to(dtype)
    q_out.requires_grad_()
    k_out.requires_grad_()

    def views():
        q = (q_out * 1).view(batch, seq, q_heads, head_dim).transpose(1, 2)
        k = (k_out * 1).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        return q, k

    return q_out, k_out, views


def rotate_and_backprop(fn, leaves, views, cos, sin, **kwargs):
    """(q_embed, k_embed, grads of the leaves) of ``fn(q, k, cos, sin)`` for a fixed random output gradient."""
    for leaf in leaves:
        leaf.grad = None
    q, k = views()
    q_embed, k_embed = fn(q, k, cos, sin, **kwargs)
    generator = torch.Generator().manual_seed(1)
    grads = [
        torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device, t.dtype) for t in (q_embed, k_embed)
    ]
    torch.autograd.backward([q_embed, k_embed], grads)
    return q_embed.detach().clone(), k_embed.detach().clone(), *(leaf.grad.clone() for leaf in leaves)


def assert_matches(actual, expected, dtype):
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        if dtype in (torch.float64, torch.float32):
            assert torch.equal(a, e), float((a - e).abs().max())
        else:
            assert rel_err(a, e) <= 1e-2, rel_err(a, e)


# -- parity with HF --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rope_type", list(ROPE_PARAMETERS))
def test_matches_hf_for_every_llama_rope_type(backend, rope_type, dtype):
    """Values and gradients of q and k equal HF's (fp64 / fp32 bit for bit): GQA 4 / 2 heads, past the context."""
    position_ids = torch.arange(40, 51)[None]  # 11 positions past max_position_embeddings = 32
    cos, sin = llama_cos_sin(rope_type, dtype, position_ids)
    q_out, k_out, views = projections(1, 11, 4, 2, 16, dtype)
    expected = rotate_and_backprop(hf_apply, (q_out, k_out), views, cos, sin)
    actual = rotate_and_backprop(apply_rope, (q_out, k_out), views, cos, sin)
    assert_matches(actual, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_odd_shapes_gqa_and_per_row_positions(backend, dtype):
    """3 rows with their own positions (cos [B, S, rd]), S = 7, 9 q heads over 3 kv heads, head_dim 24 (half 12)."""
    position_ids = torch.stack([torch.arange(7), torch.arange(30, 37), torch.tensor([0, 0, 1, 2, 3, 4, 5])])
    cos, sin = llama_cos_sin("llama3", dtype, position_ids, head_dim=24)
    assert cos.shape == (3, 7, 24)
    q_out, k_out, views = projections(3, 7, 9, 3, 24, dtype)
    expected = rotate_and_backprop(hf_apply, (q_out, k_out), views, cos, sin)
    actual = rotate_and_backprop(apply_rope, (q_out, k_out), views, cos, sin)
    assert_matches(actual, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_phi3_partial_rotary(backend, dtype):
    """Phi-3, partial_rotary_factor 0.5: the first 16 of 32 features rotate, the rest pass through (values, grads)."""
    config = Phi3Config(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                        partial_rotary_factor=0.5, pad_token_id=0)  # fmt: skip
    cos, sin = Phi3RotaryEmbedding(config).to(DEVICE)(torch.zeros(1, device=DEVICE, dtype=dtype), torch.arange(5)[None])
    assert cos.shape == (1, 5, 16)
    q_out, k_out, views = projections(2, 5, 4, 2, 32, dtype)
    expected = rotate_and_backprop(phi3_apply, (q_out, k_out), views, cos, sin)
    actual = rotate_and_backprop(apply_rope, (q_out, k_out), views, cos, sin)
    assert_matches(actual, expected, dtype)
    # The out-of-place form (a leaf that autograd forbids to modify) copies the pass-through features.
    q = torch.randn(2, 4, 5, 32, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 5, 32, device=DEVICE, dtype=dtype, requires_grad=True)
    leaf_actual = rotate_and_backprop(apply_rope, (q, k), lambda: (q, k), cos, sin)
    leaf_expected = rotate_and_backprop(phi3_apply, (q, k), lambda: (q, k), cos, sin)
    assert_matches(leaf_actual, leaf_expected, dtype)


def test_seq_major_layout_unsqueeze_dim_2(backend):
    """q / k as [B, S, H, D] with ``unsqueeze_dim=2`` (HF's other documented layout)."""
    cos, sin = llama_cos_sin("yarn", torch.float64, torch.arange(33, 38)[None])
    q_out, k_out, _ = projections(2, 5, 4, 2, 16, torch.float64)
    views = lambda: ((q_out * 1).view(2, 5, 4, 16), (k_out * 1).view(2, 5, 2, 16))
    expected = rotate_and_backprop(hf_apply, (q_out, k_out), views, cos, sin, unsqueeze_dim=2)
    actual = rotate_and_backprop(apply_rope, (q_out, k_out), views, cos, sin, unsqueeze_dim=2)
    assert_matches(actual, expected, torch.float64)


# -- the in-place contract --------------------------------------------------------------------------------


def test_in_place_in_the_projection_buffer_and_nothing_around_it(backend):
    """q and k come back as themselves, the fused qkv buffer holds the rotations, v and padding are untouched."""
    cos, sin = llama_cos_sin("default", torch.float32, torch.arange(6)[None])
    sentinel = 12345.0
    qkv = torch.full((2, 6, 4 * 16 + 2 * 2 * 16 + 3), sentinel, device=DEVICE)  # q | k | v | 3 padding columns
    qkv[..., :-3] = torch.randn(2, 6, 128, device=DEVICE)
    before = qkv.clone()
    q = qkv[..., :64].view(2, 6, 4, 16).transpose(1, 2)
    k = qkv[..., 64:96].view(2, 6, 2, 16).transpose(1, 2)
    expected = hf_apply(q.clone(), k.clone(), cos, sin)
    version = qkv._version
    q_embed, k_embed = apply_rope(q, k, cos, sin)
    assert q_embed is q and k_embed is k
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])
    assert torch.equal(qkv[..., 96:], before[..., 96:])  # v and the padding
    assert qkv._version > version  # autograd sees the mutation


def test_inference_mode_and_no_grad(backend):
    cos, sin = llama_cos_sin("default", torch.float64, torch.arange(4)[None])
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            q, k = (
                torch.randn(1, 4, 4, 16, device=DEVICE, dtype=torch.float64),
                torch.randn(1, 2, 4, 16, device=DEVICE, dtype=torch.float64),
            )
            expected = hf_apply(q, k, cos, sin)
            actual = apply_rope(q, k, cos, sin)
            assert actual[0] is q and torch.equal(q, expected[0]) and torch.equal(k, expected[1])


def test_shared_incoming_gradient_is_never_overwritten(backend):
    """``q_embed[:, :2] + k_embed`` makes autograd pass one gradient tensor to both: a backward that wrote into it
    would corrupt the other consumer's gradient."""
    cos, sin = llama_cos_sin("default", torch.float64, torch.arange(5)[None])
    q_out, k_out, views = projections(1, 5, 4, 2, 16, torch.float64)

    def fn(q, k, cos, sin):
        q_embed, k_embed = (apply_rope if fn.ours else hf_apply)(q, k, cos, sin)
        shared = q_embed[:, :2] + k_embed
        return shared * 1, shared.sin()

    results = []
    for fn.ours in (False, True):
        results.append(rotate_and_backprop(fn, (q_out, k_out), views, cos, sin))
    assert_matches(results[1], results[0], torch.float64)


def test_leaves_and_q_is_k_get_new_tensors(backend):
    """A leaf that requires grad (or a view of one) cannot be modified in place: the functional kernel serves it."""
    cos, sin = llama_cos_sin("linear", torch.float64, torch.arange(3)[None])
    q = torch.randn(1, 4, 3, 16, device=DEVICE, dtype=torch.float64, requires_grad=True)
    k_base = torch.randn(1, 3, 2, 16, device=DEVICE, dtype=torch.float64, requires_grad=True)
    before = q.detach().clone()
    expected = rotate_and_backprop(hf_apply, (q, k_base), lambda: (q, k_base.transpose(1, 2)), cos, sin)
    actual = rotate_and_backprop(apply_rope, (q, k_base), lambda: (q, k_base.transpose(1, 2)), cos, sin)
    assert_matches(actual, expected, torch.float64)
    assert torch.equal(q.detach(), before)
    x = torch.randn(1, 2, 3, 16, device=DEVICE, dtype=torch.float64)
    q_embed, k_embed = apply_rope(x, x, cos, sin)
    assert torch.equal(q_embed, hf_apply(x, x, cos, sin)[0]) and torch.equal(k_embed, q_embed)


def test_fallbacks_and_autocast(backend):
    """Mixed dtypes outside autocast and cos / sin that require grad take HF's expression; under autocast bf16 q
    with fp32 cos stays bf16 in place: HF's fp32 result rounded once."""
    cos, sin = llama_cos_sin("default", torch.float32, torch.arange(5)[None])
    q = torch.randn(1, 4, 5, 16, device=DEVICE).bfloat16()
    k = torch.randn(1, 2, 5, 16, device=DEVICE).bfloat16()
    expected = hf_apply(q, k, cos, sin)
    promoted = apply_rope(q.clone(), k.clone(), cos, sin)
    assert promoted[0].dtype == torch.float32 and all(
        torch.equal(a, e) for a, e in zip(promoted, expected, strict=True)
    )
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        q_in, k_in = q.clone(), k.clone()
        actual = apply_rope(q_in, k_in, cos, sin)
    assert actual[0] is q_in and actual[0].dtype == torch.bfloat16
    for a, e in zip(actual, expected, strict=True):
        # Within one bf16 ulp of HF's fp32 result (the interpreter's fp32 -> bf16 cast truncates; a GPU rounds).
        assert ((a.float() - e).abs() <= e.abs() * 2**-7).all()
    cos64 = cos.double().requires_grad_()
    q64, k64 = q.double(), k.double()
    actual_grad = torch.autograd.grad(
        sum(t.sum() for t in apply_rope(q64.clone(), k64.clone(), cos64, sin.double())), cos64
    )
    expected_grad = torch.autograd.grad(sum(t.sum() for t in hf_apply(q64, k64, cos64, sin.double())), cos64)
    assert torch.equal(actual_grad[0], expected_grad[0])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gradient_checkpointing(backend, compiled):
    """use_reentrant=False recomputes the layer: rope is applied again to fresh q / k, and the gradients equal HF's."""
    cos, sin = llama_cos_sin("dynamic", torch.float64, torch.arange(30, 36)[None])
    q_out, k_out, _ = projections(2, 6, 4, 2, 16, torch.float64)
    w = torch.randn(16, 16, device=DEVICE, dtype=torch.float64)

    def layer(q_out, k_out, rope):
        q = (q_out * 1).view(2, 6, 4, 16).transpose(1, 2)
        k = (k_out * 1).view(2, 6, 2, 16).transpose(1, 2)
        q_embed, k_embed = rope(q, k, cos, sin)
        return ((q_embed @ w).tanh().sum() + (k_embed @ w).sin().sum()) * 1

    def loss(rope):
        q_out.grad = k_out.grad = None
        step = lambda: checkpoint(layer, q_out, k_out, rope, use_reentrant=False)
        value = (torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step)()
        value.backward()
        return value.detach(), q_out.grad.clone(), k_out.grad.clone()

    assert_matches(loss(apply_rope), loss(hf_apply), torch.float64)


def test_torch_compile_fullgraph(backend):
    """An attention-like block, compiled with fullgraph under aot_eager: values and gradients as eager HF's."""
    torch._dynamo.reset()
    cos, sin = llama_cos_sin("longrope", torch.float64, torch.arange(30, 35)[None])
    q_out, k_out, views = projections(1, 5, 4, 2, 16, torch.float64)

    def block(fn):
        def run(q, k, cos, sin):
            q_embed, k_embed = fn(q, k, cos, sin)
            scores = q_embed @ k_embed.repeat_interleave(2, dim=1).transpose(-1, -2)
            return scores.softmax(-1), k_embed * 1

        return run

    expected = rotate_and_backprop(block(hf_apply), (q_out, k_out), views, cos, sin)
    compiled = torch.compile(block(apply_rope), fullgraph=True, backend="aot_eager")
    actual = rotate_and_backprop(compiled, (q_out, k_out), views, cos, sin)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


# -- custom ops, gradcheck, poisoned buffers, errors -------------------------------------------------------


def test_gradcheck_in_place_and_functional_paths(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")
    cos, sin = llama_cos_sin("yarn", torch.float64, torch.arange(18, 21)[None], head_dim=8)
    q = torch.randn(1, 3, 3, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 3, 1, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    in_place = lambda q, k: apply_rope(q * 1, (k * 1).transpose(1, 2), cos, sin)
    functional = lambda q, k: apply_rope(q, k.transpose(1, 2), cos, sin)
    assert torch.autograd.gradcheck(in_place, (q, k))
    assert torch.autograd.gradcheck(functional, (q, k))
    assert torch.autograd.gradgradcheck(functional, (q, k))


def test_opcheck(backend):
    cos, sin = llama_cos_sin("default", torch.float32, torch.arange(3)[None])
    q = torch.randn(2, 4, 3, 16, device=DEVICE)
    k = torch.randn(2, 3, 2, 16, device=DEVICE).transpose(1, 2)
    torch.library.opcheck(_rope_inplace_op, (q, k, cos, sin, 1))
    torch.library.opcheck(_rope_inplace_op, (k, None, cos, sin, 1))
    torch.library.opcheck(_rope_op, (q.requires_grad_(), k.requires_grad_(), cos, sin, 1, False))
    torch.library.opcheck(_rope_op, (k, None, cos[..., :8], sin[..., :8], 1, True))


def test_poisoned_buffers(backend, monkeypatch):
    """Every buffer the kernels write (the functional forward, every backward) comes NaN-filled: results unchanged."""
    config = Phi3Config(hidden_size=96, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                        partial_rotary_factor=0.5, pad_token_id=0)  # fmt: skip
    cos, sin = Phi3RotaryEmbedding(config).to(DEVICE)(torch.zeros(1, device=DEVICE), torch.arange(4)[None])
    q_out, k_out, views = projections(1, 4, 4, 2, 24, torch.float32)
    leaf = torch.randn(1, 4, 4, 24, device=DEVICE, requires_grad=True)
    clean = rotate_and_backprop(apply_rope, (q_out, k_out), views, cos, sin)
    clean_leaf = rotate_and_backprop(apply_rope, (leaf,), lambda: (leaf, views()[1]), cos, sin)
    # Both backends allocate their outputs through this hook.
    monkeypatch.setattr(kernels, "_empty_like", lambda t: torch.full_like(t, float("nan")))
    poisoned = rotate_and_backprop(apply_rope, (q_out, k_out), views, cos, sin)
    poisoned_leaf = rotate_and_backprop(apply_rope, (leaf,), lambda: (leaf, views()[1]), cos, sin)
    for a, e in zip((*poisoned, *poisoned_leaf), (*clean, *clean_leaf), strict=True):
        assert torch.equal(a, e)


def test_bad_inputs():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    cos = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="must be even"):
        apply_rope(q, k, cos[..., :5], cos[..., :5])
    with pytest.raises(ValueError, match="<= head_dim"):
        apply_rope(q, k, torch.randn(1, 3, 10), torch.randn(1, 3, 10))
    with pytest.raises(ValueError, match="one shape"):
        apply_rope(q, k, cos, cos[..., :4])
    with pytest.raises(ValueError, match="broadcast"):
        apply_rope(q, k, cos, cos, unsqueeze_dim=3)
    with pytest.raises(ValueError, match="broadcast"):
        apply_rope(q, k, torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    with pytest.raises(TypeError, match="float"):
        apply_rope(q.long(), k, cos, cos)
