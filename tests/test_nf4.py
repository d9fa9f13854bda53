"""NF4 format: byte-exact with bitsandbytes 0.50.2 on CPU, the Triton kernel bit-exact with torch."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_f
import pytest
import torch
from bitsandbytes.backends.default import ops as bnb_default_ops

from peft_fast.kernels.nf4_dequant import dequantize_nf4_triton
from peft_fast.nf4 import NF4_CODE, NF4Weight, dequantize_nf4, dynamic_map, nf4_code, quantize_nf4

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# [5, 33]: 165 elements, an odd count and a partial last block for every blocksize.
SHAPES = [(1, 64), (17, 96), (256, 4096), (5, 33)]


def bnb_quantize(weight: torch.Tensor, blocksize: int, double_quant: bool):
    return bnb_f.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def bnb_reference_dequantize(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' own pure-torch dequantization (its 'default' backend).

    bitsandbytes 0.50.2's CPU C++ kernel reads blocks per row on AVX-512 machines, which is wrong
    when in_features is not a multiple of the blocksize (errors of the size of the weight itself),
    so for such shapes we compare with this reference implementation of the same op instead.
    """
    absmax = state.absmax
    if state.nested:
        absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    compute = getattr(bnb_default_ops._dequantize_4bit_compute, "__wrapped__", bnb_default_ops._dequantize_4bit_compute)
    return compute(packed.reshape(-1), absmax, nf4_code("cpu"), state.blocksize, state.shape, dtype)


def random_weight(shape, dtype, generator=None) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def test_codebooks_match_bitsandbytes():
    assert torch.equal(nf4_code("cpu"), bnb_f.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map("cpu"), bnb_f.create_dynamic_map())
    assert len(NF4_CODE) == 16 and NF4_CODE[7] == 0.0


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_bitsandbytes(shape, dtype, blocksize, double_quant):
    weight = random_weight(shape, dtype)
    packed, state = bnb_quantize(weight, blocksize, double_quant)
    ours = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)

    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)
    assert ours.double_quant == double_quant
    if double_quant:
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.nested_offset, state.offset)
    assert ours.shape == weight.shape and ours.dtype == dtype

    for out_dtype in DTYPES:
        state.dtype = out_dtype
        ours_out = dequantize_nf4(ours, out_dtype)
        assert torch.equal(ours_out, bnb_reference_dequantize(packed, state, out_dtype))
        if shape[1] % blocksize == 0:  # where bitsandbytes' C++ kernel is right, match it too
            assert torch.equal(ours_out, bnb_f.dequantize_4bit(packed, state))


@pytest.mark.parametrize("blocksize", [32, 128, 512, 1024, 2048, 4096])
def test_other_blocksizes_match_bitsandbytes(blocksize):
    weight = random_weight((37, 200), torch.bfloat16)
    for double_quant in (True, False):
        packed, state = bnb_quantize(weight, blocksize, double_quant)
        ours = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
        assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax)
        assert torch.equal(dequantize_nf4(ours), bnb_reference_dequantize(packed, state, torch.bfloat16))


def test_double_quant_many_random_scales():
    """Many blocks of scales with a wide spread: every nested code equals bitsandbytes'."""
    generator = torch.Generator().manual_seed(1)
    for trial in range(20):
        rows = int(torch.randint(1, 64, (1,), generator=generator))
        weight = torch.randn(rows, 1024, generator=generator) * torch.rand(rows, 1, generator=generator) * 10
        _, state = bnb_quantize(weight, 64, True)
        ours = quantize_nf4(weight, 64, True)
        assert torch.equal(ours.absmax, state.absmax), trial
        assert torch.equal(ours.nested_absmax, state.state2.absmax), trial


def test_dequantize_error_is_nf4_sized():
    weight = torch.randn(128, 256)
    restored = dequantize_nf4(quantize_nf4(weight), torch.float32)
    relative = (restored - weight).norm() / weight.norm()
    assert 0.05 < relative < 0.12  # 4 bits: never exact, never far


def test_zero_and_huge_blocks_match_bitsandbytes():
    weight = torch.randn(4, 256) * 0.02
    weight[0] = 0.0  # four all-zero blocks
    weight[1, 3] = 3.0e38  # one block dominated by a huge value
    weight[2, 70] = -1.0e-38  # a block with a tiny absmax
    weight[2, 64:70] = 0.0
    weight[2, 71:128] = 0.0
    for double_quant in (True, False):
        packed, state = bnb_quantize(weight, 64, double_quant)
        ours = quantize_nf4(weight, 64, double_quant)
        assert torch.equal(ours.packed, packed)
        assert torch.equal(ours.absmax, state.absmax)
        restored = dequantize_nf4(ours, torch.float32)
        assert torch.isfinite(restored).all()
        assert torch.equal(restored[0], torch.zeros(256))  # code 7 is exactly 0.0
    assert (quantize_nf4(weight, 64, False).packed[:128] == 0x77).all()


def test_all_zero_weight_and_partial_zero_tail_match_bitsandbytes():
    for shape in [(1, 64), (3, 7), (2, 100)]:
        weight = torch.zeros(shape)
        for double_quant in (True, False):
            packed, state = bnb_quantize(weight, 64, double_quant)
            ours = quantize_nf4(weight, 64, double_quant)
            assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax)
            if double_quant:
                assert torch.equal(ours.nested_absmax, state.state2.absmax)
            assert torch.equal(dequantize_nf4(ours), torch.zeros(shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(bad):
    weight = torch.randn(8, 64)
    weight[5, 17] = bad
    with pytest.raises(ValueError, match=r"non-finite.*\[5, 17\]"):
        quantize_nf4(weight)


@pytest.mark.parametrize(
    ("weight", "kwargs", "error", "match"),
    [
        (torch.randn(4, 4, 4), {}, ValueError, "2-D"),
        (torch.randn(64), {}, ValueError, "2-D"),
        (torch.randint(0, 5, (4, 64)), {}, TypeError, "float32, float16 or bfloat16"),
        (torch.randn(4, 64, dtype=torch.float64), {}, TypeError, "float32, float16 or bfloat16"),
        (torch.randn(4, 64), {"blocksize": 48}, ValueError, "power of two"),
        (torch.randn(4, 64), {"blocksize": 16}, ValueError, "power of two"),
        (torch.randn(4, 64), {"blocksize": 8192}, ValueError, "power of two"),
        (torch.randn(0, 64), {}, ValueError, "empty"),
    ],
)
def test_bad_input_is_a_clear_error(weight, kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize_nf4(weight, **kwargs)


def test_not_a_tensor():
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        quantize_nf4([[1.0, 2.0]])


# -- Triton kernel ------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (17, 96), (5, 33), (64, 200)])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_triton_dequant_bit_exact(kernel_device, shape, blocksize, double_quant):
    nf4 = quantize_nf4(torch.randn(shape, device=kernel_device) * 3, blocksize, double_quant)
    for dtype in DTYPES:
        expected = dequantize_nf4(nf4, dtype)
        poisoned = torch.full_like(expected, float("nan"))
        del poisoned  # a freed NaN buffer the kernel's output may be placed on
        got = dequantize_nf4_triton(nf4, dtype)
        assert got.dtype == dtype and got.shape == expected.shape
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


def test_triton_dequant_default_dtype_and_large_values(kernel_device):
    weight = torch.randn(33, 128, device=kernel_device, dtype=torch.bfloat16) * 1e30
    nf4 = quantize_nf4(weight, 64, True)
    assert torch.equal(dequantize_nf4_triton(nf4), dequantize_nf4(nf4))
    assert dequantize_nf4_triton(nf4).dtype == torch.bfloat16


def test_triton_dequant_rejects_bad_dtype(kernel_device):
    nf4 = quantize_nf4(torch.randn(4, 64, device=kernel_device))
    with pytest.raises(TypeError):
        dequantize_nf4_triton(nf4, torch.int8)


# -- bitsandbytes state dicts -------------------------------------------------------------


def bnb_linear4bit(in_features: int, out_features: int, double_quant: bool, dtype=torch.float32):
    dense = torch.nn.Linear(in_features, out_features, bias=True, dtype=dtype)
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=True, compute_dtype=dtype, compress_statistics=double_quant, quant_type="nf4"
    )
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu"), dense


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bnb_state_dict_round_trip(double_quant, dtype):
    layer, dense = bnb_linear4bit(128, 40, double_quant, dtype)
    state = layer.state_dict()
    weight_state = {k: v for k, v in state.items() if k.startswith("weight")}
    nf4 = NF4Weight.from_bnb_state_dict(weight_state, "weight")
    again = nf4.to_bnb_state_dict("weight")
    assert list(again) == list(weight_state)  # same keys, same order
    for key, value in weight_state.items():
        assert again[key].dtype == value.dtype and again[key].shape == value.shape, key
        assert torch.equal(again[key], value), key
    assert torch.equal(nf4.dequantize(), bnb_f.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    # and our quantizer, from the layer's original weight, gives the same state (the layer
    # records the dtype of the parameter it was loaded into, fp32, not the bf16 of the source)
    source = dense.weight.detach().to(layer.weight.quant_state.dtype)
    ours = quantize_nf4(source, 64, double_quant).to_bnb_state_dict("weight")
    assert all(torch.equal(ours[k], weight_state[k]) for k in weight_state)


def test_quant_state_json_is_bnb_format():
    layer, _ = bnb_linear4bit(64, 8, True)
    state = layer.state_dict()
    key = "weight.quant_state.bitsandbytes__nf4"
    ours = NF4Weight.from_bnb_state_dict(state, "weight").quant_state_json()
    assert ours == bytes(state[key].tolist())
    parsed = json.loads(ours)
    assert parsed["quant_type"] == "nf4" and parsed["shape"] == [8, 64] and parsed["nested_blocksize"] == 256


def _weight_state(double_quant=True):
    layer, _ = bnb_linear4bit(64, 8, double_quant)
    return {k: v.clone() for k, v in layer.state_dict().items() if k.startswith("weight")}


def _with_json(state: dict, **changes) -> dict:
    key = "weight.quant_state.bitsandbytes__nf4"
    parsed = json.loads(bytes(state[key].tolist()))
    parsed.update(changes)
    state = dict(state)
    state[key] = torch.tensor(list(json.dumps(parsed).encode()), dtype=torch.uint8)
    return state


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda s: {k: v for k, v in s.items() if k != "weight.absmax"}, "missing key 'weight.absmax'"),
        (lambda s: {k: v for k, v in s.items() if k != "weight"}, "missing key 'weight'"),
        (lambda s: {k: v for k, v in s.items() if "quant_state" not in k}, "quant_state"),
        (lambda s: {**s, "weight.absmax": s["weight.absmax"][:-1]}, "absmax must have"),
        (lambda s: {**s, "weight": s["weight"][:-3]}, "packed must be uint8"),
        (lambda s: _with_json(s, quant_type="fp4"), "only 'nf4'"),
        (lambda s: _with_json(s, shape=[8, 128]), "packed must be uint8"),
        (lambda s: _with_json(s, blocksize=100), "power of two"),
        (lambda s: _with_json(s, dtype="int8"), "unsupported dtype"),
        (lambda s: {**s, "weight.quant_map": s["weight.quant_map"] * 2}, "not the NF4 codebook"),
        (lambda s: {**s, "weight.quant_state.bitsandbytes__nf4": torch.tensor([123, 34], dtype=torch.uint8)}, "JSON"),
    ],
)
def test_corrupt_state_dict_is_a_clear_error(corrupt, match):
    with pytest.raises(ValueError, match=match):
        NF4Weight.from_bnb_state_dict(corrupt(_weight_state()), "weight")


def test_fp4_key_is_named():
    state = _weight_state()
    state["weight.quant_state.bitsandbytes__fp4"] = state.pop("weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match="fp4 quantization is not supported"):
        NF4Weight.from_bnb_state_dict(state, "weight")
