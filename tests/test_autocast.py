"""Mixed precision (issue 16): every custom op under ``torch.autocast`` behaves as ``nn.Linear`` + PEFT.

Under ``torch.autocast("cpu", torch.bfloat16)`` the patched model must compute in bf16 and give each
parameter its gradient in the parameter's own dtype (fp32 adapters: fp32 gradients), as PEFT's
layers over ``nn.Linear`` (and bitsandbytes' ``Linear4bit`` for QLoRA) do. Compared, on tiny fp32
models in train mode (dropout 0) and with and without gradient checkpointing:

* LoRA against PEFT, QLoRA against PEFT + bitsandbytes 4-bit, (IA)³ against PEFT's (IA)³, under the
  same autocast: logits, loss and every adapter gradient;
* bottleneck adapters (no PEFT reference) against the same model whose fused op is replaced by plain
  autograd (``F.linear`` / ``F.layer_norm``, which autocast handles itself);
* each op against its torch reference with the same casts, in bf16 and fp16 (autocast's dtype is
  followed, not fixed), with backward both outside and inside the autocast region;
* ``Trainer(bf16=True)``, which used to stop in backward, and ``torch.compile(fullgraph=True)``.

LoRA and QLoRA run on both backends (the Triton kernels under the interpreter on CPU).
Tolerances are relative Frobenius errors at bf16's level (its unit roundoff is 2**-8 ≈ 4e-3).
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import transformers

import peft_fast
from peft_fast import ops as adapter_ops
from peft_fast.adapters import BottleneckAdapter, bottleneck_adapters
from peft_fast.ia3 import IA3Linear, ia3_layers
from peft_fast.layers import LoraLinear, NF4Linear
from peft_fast.lora import lora_layers
from peft_fast.nf4 import dequantize_nf4, quantize_nf4
from peft_fast.ops import base_linear, lora_linear

peft = pytest.importorskip("peft")

VOCAB = 128
BF16 = torch.bfloat16
# A whole model against its reference under the same autocast: (logits, all gradients together, each
# parameter's gradient). Two bf16 pipelines differ about as much as each differs from fp32. Measured
# on the tiny Llama below: logits 0.9-1.2% from fp32 on either side; ours from PEFT's 0 (LoRA) and
# 0.9% (QLoRA) on the torch backend, 1.2% under the Triton interpreter (which rounds fp32 -> bf16
# toward zero, where a GPU rounds to nearest); gradients 0.4-1.1% (torch) and 1.4-1.6% (interpreter)
# together, at most 1.5% / 2.0% for one parameter.
MODEL_TOL = {"torch": (1.5e-2, 2e-2, 3e-2), "triton": (2e-2, 3e-2, 4e-2)}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error, computed in fp64."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch, kernel_device) -> str:
    monkeypatch.setenv("PEFT_FAST_BACKEND", request.param)
    return request.param


@pytest.fixture
def torch_backend(monkeypatch) -> None:
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


def tiny_llama() -> transformers.LlamaForCausalLM:
    """Hidden 64: every in_features a multiple of 64, so NF4 blocks align with rows (bitsandbytes' CPU path)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).float().eval()


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (2, 8), generator=generator), torch.randint(0, VOCAB, (2, 8), generator=generator)


def autocast_step(model, ids, labels, checkpointing: bool, dtype: torch.dtype = BF16):
    """(logits, loss, {trainable name: grad}) of one forward under autocast, backward after it (as Trainer)."""
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with torch.autocast("cpu", dtype):
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten())
    loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters() if param.requires_grad}
    return logits.detach(), loss.detach(), grads


def assert_matches(ours, theirs, names: dict[str, str], what: str, backend: str = "torch") -> None:
    """Ours and the reference's (logits, loss, grads) agree; ``names`` maps our param names to theirs.

    Every gradient is fp32, the dtype of the parameter, and the reference's are non-zero.
    """
    logit_tol, grads_tol, grad_tol = MODEL_TOL[backend]
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = ours, theirs
    assert logits.dtype == ref_logits.dtype == BF16, (logits.dtype, ref_logits.dtype)
    assert rel_err(logits, ref_logits) <= logit_tol, f"{what}: logits off by {rel_err(logits, ref_logits):.3g}"
    assert torch.isfinite(loss) and abs(loss - ref_loss) <= logit_tol * abs(ref_loss), (what, loss, ref_loss)
    assert names and set(names) == set(grads), sorted(set(grads) ^ set(names))[:4]
    for ours_name, their_name in names.items():
        grad, ref = grads[ours_name], ref_grads[their_name]
        assert grad is not None and grad.dtype == torch.float32, f"{what}: {ours_name} grad {grad and grad.dtype}"
        assert ref.abs().max() > 0, f"{what}: {their_name} got no gradient in the reference"
        err = rel_err(grad, ref)
        assert err <= grad_tol, f"{what}: {ours_name} grad off by {err:.3g}"
    flat = lambda table, keys: torch.cat([table[key].flatten() for key in keys])
    err = rel_err(flat(grads, names), flat(ref_grads, names.values()))
    assert err <= grads_tol, f"{what}: gradients off by {err:.3g}"


@contextlib.contextmanager
def layers_checked(model):
    """Checks every LoRA / (IA)³ layer's output under autocast: computed in bf16 (its values are bf16
    numbers), returned in bf16 over a dense base (as nn.Linear) and in x's dtype over NF4 (as
    bitsandbytes' Linear4bit). Before the fix the Triton backend ran these layers in fp32."""
    problems, seen = [], []

    def hook(module, args, output):
        want = args[0].dtype if isinstance(module.base_layer, NF4Linear) else BF16
        seen.append(type(module).__name__)
        if output.dtype != want or not torch.equal(output, output.to(BF16).to(output.dtype)):
            problems.append((type(module).__name__, args[0].dtype, output.dtype, want))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (LoraLinear, IA3Linear))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    assert seen and not problems, problems[:4]


def assert_low_precision(model, ids, autocast_logits) -> None:
    """The autocast run really was in bf16: its logits are off the model's fp32 logits by bf16's error."""
    with torch.no_grad():
        fp32_logits = model(input_ids=ids).logits
    assert 2e-3 < rel_err(autocast_logits, fp32_logits) < 3e-2, rel_err(autocast_logits, fp32_logits)


# -- the regression: backward used to fail -----------------------------------------------------------


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_issue16_backward_under_bf16_autocast_no_longer_fails(quantize, backend):
    """The quoted failure: ``ops._torch_backward`` raised ``expected m1 and m2 to have the same dtype,
    but got: c10::BFloat16 != float`` for LoRA and QLoRA under ``torch.autocast("cpu", torch.bfloat16)``."""
    model = peft_fast.patch(
        tiny_llama(), peft_fast.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", quantize=quantize)
    )
    ids, _ = make_batch()
    with torch.autocast("cpu", torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()  # raised the RuntimeError
    assert torch.isfinite(out.loss)
    for _, layer in lora_layers(model):
        for param in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            assert param.grad is not None and param.grad.dtype == torch.float32
    # B starts at zero, so A's gradient is zero; B's must not be.
    assert all(layer.lora_B["default"].weight.grad.abs().sum() > 0 for _, layer in lora_layers(model))


# -- LoRA against PEFT, QLoRA against PEFT + bitsandbytes ---------------------------------------------


def bnb_quantized(base: torch.nn.Module, tmp_path) -> torch.nn.Module:
    """``base`` loaded by transformers + bitsandbytes in 4-bit NF4 (double quant, fp32 compute dtype)."""
    base.save_pretrained(tmp_path / "base")
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=bnb_config, device_map="cpu", dtype=torch.float32
    )


def lora_pair(quantize: str | None, tmp_path):
    """(PEFT model, ours, {our param name: PEFT's}) with the same non-zero A and B on every Linear."""
    base = tiny_llama()
    kwargs = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    reference = bnb_quantized(base, tmp_path) if quantize else copy.deepcopy(base)
    theirs = peft.get_peft_model(reference, peft.LoraConfig(init_lora_weights=False, **kwargs))
    ours = peft_fast.patch(copy.deepcopy(base), peft_fast.LoraConfig(quantize=quantize, double_quant=True, **kwargs))
    names = {}
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            other = theirs.base_model.model.get_submodule(name)
            for part in ("lora_A", "lora_B"):
                getattr(layer, part)["default"].weight.copy_(getattr(other, part)["default"].weight)
                names[f"{name}.{part}.default.weight"] = f"base_model.model.{name}.{part}.default.weight"
    return theirs, ours, names


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["lora", "qlora"])
def test_lora_and_qlora_match_peft_under_bf16_autocast(quantize, checkpointing, backend, tmp_path):
    theirs, ours, names = lora_pair(quantize, tmp_path)
    ids, labels = make_batch()
    expected = autocast_step(theirs, ids, labels, checkpointing)
    with layers_checked(ours):
        actual = autocast_step(ours, ids, labels, checkpointing)
    assert_matches(actual, expected, names, f"{quantize or 'lora'} ({backend})", backend)
    assert_low_precision(ours, ids, actual[0])
    # The comparison can fail: the adapter moves the logits far beyond the tolerance.
    with torch.no_grad(), torch.autocast("cpu", BF16), peft_fast.disable_adapters(ours):
        assert rel_err(ours(input_ids=ids).logits, expected[0]) > 0.2


# -- (IA)³ against PEFT -----------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["dense", "nf4"])
def test_ia3_matches_peft_under_bf16_autocast(quantize, checkpointing, torch_backend, tmp_path):
    """Against PEFT's (IA)³, over bitsandbytes 4-bit layers for NF4 bases."""
    base = tiny_llama()
    reference = bnb_quantized(base, tmp_path) if quantize else copy.deepcopy(base)
    theirs = peft.get_peft_model(reference, peft.IA3Config(init_ia3_weights=False))
    ours = peft_fast.patch_ia3(copy.deepcopy(base), peft_fast.IA3Config(quantize=quantize))
    names = {}
    for name, layer in ia3_layers(ours):
        layer.ia3_l["default"].data.copy_(theirs.get_submodule(f"base_model.model.{name}").ia3_l["default"])
        names[f"{name}.ia3_l.default"] = f"base_model.model.{name}.ia3_l.default"
    assert any(layer.is_feedforward for _, layer in ia3_layers(ours))  # both input and output scaling
    ids, labels = make_batch()
    expected = autocast_step(theirs, ids, labels, checkpointing)
    with layers_checked(ours):
        actual = autocast_step(ours, ids, labels, checkpointing)
    assert_matches(actual, expected, names, "(IA)³")
    assert_low_precision(ours, ids, actual[0])


# -- bottleneck adapters against plain autograd ------------------------------------------------------


def autograd_adapter(x, down_weight, down_bias, up_weight, up_bias, *, residual=None, ln_weight=None, ln_bias=None,
                     ln_eps=1e-5, scale=1.0, activation="relu", dropout_p=0.0, training=True, seed=None):  # fmt: skip
    """An AdapterHub-style adapter of plain torch layers, which autocast handles op by op."""
    assert dropout_p == 0.0 or not training
    h = x if ln_weight is None else F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, ln_eps)
    act = {"relu": torch.relu, "gelu": F.gelu, "swish": F.silu}[activation]
    u = F.linear(act(F.linear(h, down_weight, down_bias)), up_weight, up_bias)
    return (x if residual is None else residual) + scale * u


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize(
    "settings",
    [
        {"placement": "houlsby", "ln_before": True, "non_linearity": "gelu"},
        {"placement": "parallel", "non_linearity": "swish", "locations": ["attention", "ffn"]},
    ],
    ids=["houlsby-ln-gelu", "parallel-swish"],
)
def test_bottleneck_adapters_under_bf16_autocast_match_plain_autograd(settings, checkpointing, monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")
    model = peft_fast.patch_adapters(tiny_llama(), peft_fast.AdapterConfig(bottleneck_size=8, **settings))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and ("adapter_up" in name or "adapter_norm" in name):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)  # the adapters matter
    ids, labels = make_batch()
    names = {name: name for name, param in model.named_parameters() if param.requires_grad}
    actual = autocast_step(model, ids, labels, checkpointing)
    model.zero_grad()
    with monkeypatch.context() as patched:
        patched.setattr(adapter_ops, "bottleneck_adapter", autograd_adapter)
        expected = autocast_step(model, ids, labels, checkpointing)
    assert_matches(actual, expected, names, f"adapters {settings['placement']}")
    assert_low_precision(model, ids, actual[0])
    assert len(list(bottleneck_adapters(model))) > 0


# -- each op against its torch reference with the same casts ----------------------------------------

# (output, gradient) tolerances of an op against the same math in plain torch, by autocast dtype. The
# fp16 ones are below bf16's rounding error, so they also show that autocast's dtype is followed.
# The Triton interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest), which roughly
# doubles its bf16 error; these tolerances hold for it too.
OP_TOL = {torch.bfloat16: (1.5e-2, 2.5e-2), torch.float16: (2e-3, 4e-3)}
CAST_DTYPES = [torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _leaf(*shape, device: str, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return (offset + torch.randn(*shape) * scale).to(device).requires_grad_(True)


def _grads(output: torch.Tensor, grad_out: torch.Tensor, inputs) -> list[torch.Tensor]:
    return list(torch.autograd.grad(output, inputs, grad_out.to(output.dtype)))


def _check_against(actual, expected, inputs, dtype, grad_out, inside: bool, what: str) -> None:
    """Output in the autocast dtype and close to the reference; grads in each input's own dtype, close too."""
    out_tol, grad_tol = OP_TOL[dtype]
    assert actual.dtype == expected.dtype == dtype, (what, actual.dtype, expected.dtype)
    assert rel_err(actual, expected) <= out_tol, f"{what}: output off by {rel_err(actual, expected):.3g}"
    with torch.autocast(actual.device.type, dtype, enabled=inside):  # backward inside the region (some loops)
        grads = _grads(actual, grad_out, inputs)
    for i, (grad, ref, leaf) in enumerate(zip(grads, _grads(expected, grad_out, inputs), inputs, strict=True)):
        assert grad.dtype == leaf.dtype, (what, i, grad.dtype, leaf.dtype)
        assert rel_err(grad, ref) <= grad_tol, f"{what}: grad {i} off by {rel_err(grad, ref):.3g}"


def _base(base_kind: str, device: str):
    """(the op's base: dense fp32 or NF4, the same weight dense in fp32)."""
    weight = (torch.randn(32, 64) / 8).to(device)
    if base_kind == "dense":
        return weight, weight
    nf4 = quantize_nf4(weight, 64)
    return nf4, dequantize_nf4(nf4, torch.float32)


@pytest.mark.parametrize("inside", [False, True], ids=["backward-after", "backward-inside"])
@pytest.mark.parametrize("dtype", CAST_DTYPES, ids=str)
@pytest.mark.parametrize("base_kind", ["dense", "nf4"])
@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_op_under_autocast(device, base_kind, dtype, inside, backend):
    """fp32 x, A, B and bias: the op computes in the autocast dtype (bf16 or fp16, whichever is asked)."""
    x, a, b = _leaf(2, 6, 64, device=device), _leaf(8, 64, device=device, scale=0.1), _leaf(32, 8, device=device)
    bias = _leaf(32, device=device)
    base, dense = _base(base_kind, device)
    with torch.autocast(device, dtype):
        y = lora_linear(x, base, a, b, bias, scale=2.0)
        y_base = base_linear(x, base, bias)  # adapters disabled
    c = lambda t: t.to(dtype)
    expected = F.linear(c(x), c(dense), c(bias)) + 2.0 * ((c(x) @ c(a).t()) @ c(b).t())
    grad_out = torch.randn(2, 6, 32).to(device)
    _check_against(y, expected, (x, a, b, bias), dtype, grad_out, inside, f"lora_linear {base_kind}")
    _check_against(y_base, F.linear(c(x), c(dense), c(bias)), (x, bias), dtype, grad_out, inside, "base_linear")


@pytest.mark.parametrize("inside", [False, True], ids=["backward-after", "backward-inside"])
@pytest.mark.parametrize("dtype", CAST_DTYPES, ids=str)
@pytest.mark.parametrize("scale_input", [False, True], ids=["output-scaling", "input-scaling"])
@pytest.mark.parametrize("base_kind", ["dense", "nf4"])
@pytest.mark.parametrize("device", DEVICES)
def test_ia3_linear_op_under_autocast(device, base_kind, scale_input, dtype, inside, backend):
    x, bias = _leaf(2, 6, 64, device=device), _leaf(32, device=device)
    ia3 = _leaf(64 if scale_input else 32, device=device, scale=0.5, offset=1.0)
    base, dense = _base(base_kind, device)
    with torch.autocast(device, dtype):
        y = adapter_ops.ia3_linear(x, base, ia3, bias, scale_input=scale_input)
    c = lambda t: t.to(dtype)
    # PEFT's (IA)³ under autocast: l applied in fp32 and the product rounded, the Linear in the autocast dtype.
    if scale_input:
        expected = F.linear((c(x).float() * ia3).to(dtype), c(dense), c(bias))
    else:
        expected = (F.linear(c(x), c(dense), c(bias)).float() * ia3).to(dtype)
    grad_out = torch.randn(2, 6, 32).to(device)
    _check_against(y, expected, (x, ia3, bias), dtype, grad_out, inside, f"ia3 {base_kind}")


@pytest.mark.parametrize("dtype", CAST_DTYPES, ids=str)
@pytest.mark.parametrize("residual_kind", ["serial", "parallel"])
@pytest.mark.parametrize("device", DEVICES)
def test_bottleneck_adapter_op_under_autocast(device, residual_kind, dtype, backend):
    """Computed in the autocast dtype; an fp32 residual keeps its precision (the output is fp32:
    residual + the adapter's update, as ``residual + adapter(x)`` under autocast)."""
    x, residual = _leaf(2, 6, 64, device=device), _leaf(2, 6, 64, device=device)
    params = (_leaf(8, 64, device=device, scale=0.1), _leaf(8, device=device), _leaf(64, 8, device=device, scale=0.3),
              _leaf(64, device=device))  # fmt: skip
    ln_w, ln_b = _leaf(64, device=device, scale=0.1, offset=1.0), _leaf(64, device=device, scale=0.1)
    kwargs = dict(ln_weight=ln_w, ln_bias=ln_b, scale=0.5, activation="gelu")
    if residual_kind == "parallel":
        kwargs["residual"] = residual
    with torch.autocast(device, dtype):
        y = adapter_ops.bottleneck_adapter(x, *params, **kwargs)
        y_low = adapter_ops.bottleneck_adapter(x.to(dtype), *params, **{**kwargs, "residual": None})
    assert y.dtype == torch.float32  # the fp32 residual (x itself for a serial adapter) is not rounded
    assert y_low.dtype == dtype  # a low-precision x: all in the autocast dtype
    c = lambda t: t.to(dtype)
    h = F.layer_norm(x, (64,), ln_w, ln_b).to(dtype)  # LayerNorm statistics in fp32, as the op's
    update = F.linear(F.gelu(F.linear(h, c(params[0]), c(params[1]))), c(params[2]), c(params[3]))
    wide = residual if residual_kind == "parallel" else x
    inputs = (x, *params, ln_w, ln_b) + ((residual,) if residual_kind == "parallel" else ())
    grad_out = torch.randn(2, 6, 64).to(device)
    _check_against(y.to(dtype), (wide + 0.5 * update).to(dtype), inputs, dtype, grad_out, False, "adapter")
    # The update is at the autocast dtype's precision; the residual passes through exactly.
    assert rel_err(y - wide, 0.5 * update) <= OP_TOL[dtype][0]


# -- Trainer(bf16=True) and torch.compile ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "checkpointing"), [("lora", False), ("qlora", True), ("ia3", True), ("adapter", False)]
)
def test_trainer_bf16_trains(method, checkpointing, torch_backend, tmp_path):
    """``Trainer(bf16=True)`` (autocast on CPU), as SFTTrainer's default config also with gradient
    checkpointing: it used to stop in backward. Now the loss is finite and only adapters move."""
    model = tiny_llama()
    if method in ("lora", "qlora"):
        config = peft_fast.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                      quantize="nf4" if method == "qlora" else None)  # fmt: skip
        model = peft_fast.patch(model, config)
    elif method == "ia3":
        model = peft_fast.patch_ia3(model, peft_fast.IA3Config())
    else:
        model = peft_fast.patch_adapters(model, peft_fast.AdapterConfig(bottleneck_size=8, placement="houlsby"))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    ids = torch.randint(0, VOCAB, (8, 10), generator=torch.Generator().manual_seed(3))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, bf16=True,
        gradient_checkpointing=checkpointing, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable, sorted(changed - trainable)[:4]
    assert all(param.dtype == torch.float32 for name, param in model.named_parameters() if name in trainable)


class _Stack(torch.nn.Module):
    """LoRA over a dense and over an NF4 base, (IA)³ and a bottleneck adapter (LayerNorm, gelu), with
    every trainable parameter randomised so that each matters."""

    def __init__(self) -> None:
        super().__init__()
        lora = dict(r=4, lora_alpha=8, target_modules=["0"])
        self.lora = peft_fast.patch(torch.nn.Sequential(torch.nn.Linear(64, 64)), peft_fast.LoraConfig(**lora))[0]
        quantized = torch.nn.Sequential(torch.nn.Linear(64, 64))
        self.qlora = peft_fast.patch(quantized, peft_fast.LoraConfig(**lora, quantize="nf4"))[0]
        ia3 = peft_fast.IA3Config(target_modules=["0"], feedforward_modules=[])
        self.ia3 = peft_fast.patch_ia3(torch.nn.Sequential(torch.nn.Linear(64, 64)), ia3)[0]
        config = peft_fast.AdapterConfig(bottleneck_size=8, ln_before=True, non_linearity="gelu")
        self.adapter = BottleneckAdapter(64, 8, config)
        with torch.no_grad():
            for param in self.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.1)

    def forward(self, x):
        # The adapter on fp32 x keeps x's precision in its residual (fp32 out); the rest is bf16.
        return self.adapter(x) * self.ia3(self.qlora(self.lora(x)))


def test_compiled_model_under_autocast_matches_eager(backend):
    """Every op in one module compiled with fullgraph=True under autocast: the casts are traced and
    the results equal eager; outside autocast the compiled module recompiles and runs in fp32."""
    stack = _Stack().train()
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(stack, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (stack, compiled):
        stack.zero_grad()
        with torch.autocast("cpu", BF16):
            y = fn(x)
        y.float().square().mean().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in stack.named_parameters() if p.requires_grad}))
    (eager, eager_grads), (compiled_y, compiled_grads) = results
    assert eager.dtype == compiled_y.dtype == torch.float32  # fp32 (adapter) * bf16 (the rest)
    torch.testing.assert_close(compiled_y, eager, rtol=1e-3, atol=1e-3)
    assert len(eager_grads) == 11 and all(grad.dtype == torch.float32 for grad in eager_grads.values())  # 2+2+1+6
    for name, grad in eager_grads.items():
        assert grad.abs().sum() > 0 and rel_err(compiled_grads[name], grad) < 1e-3, name
    with torch.no_grad():  # the graph traced under autocast is not reused without it
        torch.testing.assert_close(compiled(x), stack(x), rtol=1e-5, atol=1e-5)
        assert rel_err(compiled(x), eager) > 1e-3
