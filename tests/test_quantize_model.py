"""Whole-model NF4 quantization: equal to transformers + bitsandbytes, streaming, bounded memory."""

from __future__ import annotations

import pytest
import torch
import transformers

from peft_fast import NF4Linear, quantize_model
from peft_fast.io import atomic_write, iter_safetensors


def tiny_llama(**overrides) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, architectures=["LlamaForCausalLM"], **overrides,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def bnb_config(double_quant: bool) -> transformers.BitsAndBytesConfig:
    # BitsAndBytesConfig defaults to fp4 / no DQ / fp32 compute: spell everything out.
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip


def load_with_bitsandbytes(path, double_quant: bool):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config(double_quant), device_map="cpu", dtype=torch.float32
    )


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(path)
    return path


@pytest.mark.parametrize("double_quant", [True, False])
def test_checkpoint_quantization_equals_transformers_bitsandbytes(llama_checkpoint, double_quant):
    theirs = load_with_bitsandbytes(llama_checkpoint, double_quant)
    ours = quantize_model(llama_checkpoint, double_quant=double_quant, progress=False)

    assert isinstance(ours.model.layers[0].mlp.down_proj, NF4Linear)
    assert isinstance(ours.lm_head, torch.nn.Linear)  # the head stays in full precision, as in bnb
    their_state, our_state = theirs.state_dict(), ours.state_dict()
    assert list(our_state) == list(their_state) or set(our_state) == set(their_state)
    for key, value in their_state.items():
        assert our_state[key].dtype == value.dtype, key
        assert torch.equal(our_state[key], value), key

    # bitsandbytes' CPU inference path (eval, no grad) computes in bf16 on AVX512-BF16 machines;
    # with autograd on it dequantizes and multiplies in fp32, like our torch path: equal logits.
    ids = torch.randint(0, 128, (2, 9))
    theirs.train(), ours.train()
    assert torch.equal(theirs(ids).logits, ours(ids).logits)


def test_in_memory_quantization_equals_checkpoint_quantization(llama_checkpoint):
    from_path = quantize_model(llama_checkpoint, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32)
    in_memory = quantize_model(model, progress=False)
    assert in_memory is model
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        assert torch.equal(in_memory(ids).logits, from_path(ids).logits)
    assert not any(isinstance(m, torch.nn.Linear) for n, m in in_memory.named_modules() if "layers" in n)


def test_bitsandbytes_checkpoint_loads_into_peft_fast_and_back(llama_checkpoint, tmp_path):
    theirs = load_with_bitsandbytes(llama_checkpoint, True)
    theirs.save_pretrained(tmp_path)
    ours = quantize_model(tmp_path, progress=False)  # already 4-bit: loaded as is
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    # ... and back: our state dict, written beside bitsandbytes' config, loads in transformers.
    from safetensors.torch import save_file

    back = tmp_path / "back"
    back.mkdir()
    (back / "config.json").write_text((tmp_path / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, back / "model.safetensors")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, device_map="cpu", dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 6))
    reloaded.train(), ours.train(), theirs.train()
    assert torch.equal(reloaded(ids).logits, ours(ids).logits)
    assert torch.equal(theirs(ids).logits, ours(ids).logits)


def test_nf4_linear_state_dict_round_trip_and_mismatch():
    weight = torch.randn(24, 64)
    layer = NF4Linear(quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 24)), progress=False)[0].nf4)
    state = layer.state_dict()
    other = NF4Linear(layer.nf4)
    other.load_state_dict(state)
    assert torch.equal(other.dequantized_weight(), layer.dequantized_weight())
    wrong = NF4Linear(quantize_model(torch.nn.Sequential(torch.nn.Linear(32, 24)), progress=False)[0].nf4)
    with pytest.raises(RuntimeError, match="does not match the layer"):
        wrong.load_state_dict(state)
    del weight


def test_gpt2_conv1d_is_quantized_with_transposed_weight():
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        reference = model(ids).logits
    c_attn = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # [in, out]
    quantize_model(model, progress=False)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, NF4Linear) and (layer.out_features, layer.in_features) == (192, 64)
    restored = layer.dequantized_weight(torch.float32)
    assert (restored - c_attn.t()).norm() / c_attn.norm() < 0.12
    with torch.no_grad():
        out = model(ids).logits
    assert (out - reference).norm() / reference.norm() < 0.1


def test_unknown_checkpoint_tensor_is_a_clear_error(llama_checkpoint, tmp_path):
    from safetensors.torch import save_file

    for file in llama_checkpoint.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    tensors = dict(iter_safetensors(llama_checkpoint))
    tensors["model.bogus.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.bogus\.weight"):
        quantize_model(tmp_path, progress=False)


def test_missing_checkpoint_tensor_is_a_clear_error(llama_checkpoint, tmp_path):
    from safetensors.torch import save_file

    for file in llama_checkpoint.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    tensors = dict(iter_safetensors(llama_checkpoint))
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        quantize_model(tmp_path, progress=False)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "file.bin"
    with atomic_write(target) as handle:
        handle.write(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write(b"half of the new")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


@pytest.mark.slow
def test_streaming_quantization_peak_memory(tmp_path):
    """~100M parameters in fp32 (~400 MB on disk): peak stays near 4-bit model + one layer."""
    from peft_fast.benchmark import quantize_peak_rss, write_random_llama_checkpoint

    torch.manual_seed(0)
    n_params = write_random_llama_checkpoint(tmp_path, layers=12)
    assert 90e6 < n_params < 110e6

    peak = quantize_peak_rss(tmp_path)  # a fresh process: its peak RSS over the post-import baseline
    model = quantize_model(tmp_path, progress=False)
    result = {"peak": peak, "final": 0, "largest_fp32": 0}
    for module in model.modules():
        if isinstance(module, NF4Linear):
            result["final"] += module.nf4.nbytes
            result["largest_fp32"] = max(result["largest_fp32"], module.in_features * module.out_features * 4)
    result["final"] += sum(p.numel() * p.element_size() for p in model.parameters())  # kept in full precision
    margin = 64 * 2**20  # interpreter, allocator and transformers' own set-up
    bound = 1.3 * (result["final"] + result["largest_fp32"]) + margin
    full_precision = n_params * 4
    mib = {k: round(v / 2**20) for k, v in {"peak": result["peak"], "bound": bound, "fp32": full_precision}.items()}
    print(f"quantize_model peak memory (MiB): {mib}")
    assert result["peak"] < bound
    assert result["peak"] < 0.6 * full_precision  # never the whole model in full precision
