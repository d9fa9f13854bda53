"""Bottleneck adapters in models: identity at insertion, parameter counts, gradients against plain
autograd, training, NF4 hosts, files, unpatching, the op's registration, and errors.

Tiny randomly initialised fp32 models (hidden 64, two transformer layers) of the four supported
families; the torch backend unless a test says otherwise (the kernels' float64 checks are in
test_kernel_adapter.py).
"""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
import transformers
from safetensors import safe_open
from tiny_models import ARCHS, HIDDEN, VOCAB, batch, build, logits, loss_of

import peft_fast
from peft_fast import ops as adapter_ops
from peft_fast.adapters import bottleneck_adapters
from peft_fast.ops.adapter import _bottleneck_adapter_op


def randomize(model: torch.nn.Module, std: float = 0.1) -> None:
    """Non-zero up-projections (and LayerNorms off their init), so adapters change the output."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters." in name and ("adapter_up" in name or "adapter_norm" in name):
                param.add_(torch.randn(param.shape, generator=generator).to(param.device) * std)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


CONFIGS = {
    "houlsby": {"placement": "houlsby"},
    "pfeiffer-ln-gelu": {"placement": "pfeiffer", "ln_before": True, "non_linearity": "gelu"},
    "parallel-swish-dropout": {"placement": "parallel", "non_linearity": "swish", "dropout": 0.1},
}


# -- insertion ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "variant"), list(itertools.product(ARCHS, CONFIGS)))
def test_fresh_adapters_leave_outputs_bit_identical(arch, variant):
    """Zero-initialised up-projections: the patched model computes exactly the unpatched one,
    in train mode too (the adapters' dropout acts on an exact zero)."""
    base = build(arch).train()
    inputs = batch(arch)
    expected = logits(base, inputs)
    model = peft_fast.patch_adapters(
        copy.deepcopy(base), peft_fast.AdapterConfig(bottleneck_size=8, **CONFIGS[variant])
    )
    assert len(list(bottleneck_adapters(model))) > 0
    assert torch.equal(logits(model, inputs), expected)
    randomize(model)
    assert rel_err(logits(model, inputs), expected) > 1e-3  # and the adapters are really in the path


@pytest.mark.parametrize(
    ("arch", "settings", "sites_per_layer"),
    [
        ("llama", {"placement": "houlsby", "bottleneck_size": 8}, 2),
        ("llama", {"placement": "pfeiffer", "reduction_factor": 16}, 1),
        ("gpt2", {"placement": "parallel", "locations": ["attention", "ffn"], "bottleneck_size": 8}, 2),
        ("t5", {"placement": "houlsby", "bottleneck_size": 1, "ln_before": True}, 2),
        ("bert", {"placement": "parallel"}, 1),
    ],
)
def test_trainable_parameter_count_matches_the_formula(arch, settings, sites_per_layer, capsys):
    config = peft_fast.AdapterConfig(**settings)
    model = peft_fast.patch_adapters(build(arch), config)
    d, m, layers = HIDDEN, config.bottleneck_for(HIDDEN), 2  # T5: one encoder and one decoder block
    per_adapter = 2 * d * m + d + m + (2 * d if config.ln_before else 0)
    expected = layers * sites_per_layer * per_adapter  # Houlsby: 2·L·(2·d·m + d + m)
    peft_fast.print_trainable_parameters(model)
    printed = capsys.readouterr().out
    assert f"trainable params: {expected:,d}" in printed, printed
    assert peft_fast.trainable_parameters(model)[0] == expected
    leave_out = peft_fast.patch_adapters(build(arch), peft_fast.AdapterConfig(**settings, leave_out=[1]))
    assert peft_fast.trainable_parameters(leave_out)[0] == expected // 2


# -- gradients ----------------------------------------------------------------------------------


def autograd_adapter(x, down_weight, down_bias, up_weight, up_bias, *, residual=None, ln_weight=None, ln_bias=None,
                     ln_eps=1e-5, scale=1.0, activation="relu", dropout_p=0.0, training=True, seed=None):  # fmt: skip
    """The adapter in plain torch autograd: what the custom op's gradients must equal."""
    assert dropout_p == 0.0 or not training
    h = x if ln_weight is None else torch.nn.functional.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, ln_eps)
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "swish": torch.nn.functional.silu}[activation]
    u = torch.nn.functional.linear(act(torch.nn.functional.linear(h, down_weight, down_bias)), up_weight, up_bias)
    return (x if residual is None else residual) + scale * u


@pytest.mark.parametrize(
    ("arch", "settings", "backend"),
    [
        ("llama", {"placement": "houlsby", "ln_before": True, "non_linearity": "gelu"}, "torch"),
        ("bert", {"placement": "parallel", "non_linearity": "swish", "locations": ["attention", "ffn"]}, "torch"),
        ("t5", {"placement": "pfeiffer"}, "torch"),
        ("llama", {"placement": "parallel", "ln_before": True}, "triton"),
        ("gpt2", {"placement": "houlsby", "non_linearity": "gelu"}, "triton"),
    ],
)
def test_gradients_equal_plain_autograd(arch, settings, backend, monkeypatch):
    """Loss and every trainable gradient of the patched model equal the same model computed with
    plain torch autograd in place of the fused op (on the Triton backend: the kernels, on the GPU
    when there is one, else under the interpreter)."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    inputs = {k: v.to(device) for k, v in batch(arch).items()}
    model = peft_fast.patch_adapters(build(arch), peft_fast.AdapterConfig(bottleneck_size=8, **settings))
    model = model.to(device).train()
    randomize(model)
    results = {}
    for name in ("fused", "autograd"):
        with monkeypatch.context() as patched:
            patched.setenv("PEFT_FAST_BACKEND", backend)
            if name == "autograd":
                patched.setattr(adapter_ops, "bottleneck_adapter", autograd_adapter)
            model.zero_grad()
            loss = loss_of(model, inputs)
            loss.backward()
        results[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results["fused"][0], results["autograd"][0], rtol=1e-5, atol=1e-5)
    grads = results["autograd"][1]
    assert grads and all(grad.abs().sum() > 0 for grad in grads.values())
    for name, grad in grads.items():
        assert rel_err(results["fused"][1][name], grad) < 1e-4, name


def test_gradient_checkpointing_replays_the_dropout_masks():
    inputs = batch("llama")
    grads = []
    for checkpointing in (False, True):
        config = peft_fast.AdapterConfig(bottleneck_size=8, dropout=0.3, non_linearity="gelu")
        model = peft_fast.patch_adapters(build("llama"), config).train()
        randomize(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        torch.manual_seed(5)  # the same dropout seeds in both runs
        loss_of(model, inputs).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


# -- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "variant", "lr", "ratio"),
    [
        ("llama", "houlsby", 3e-2, 0.92),
        ("llama", "pfeiffer-ln-gelu", 3e-2, 0.85),
        ("llama", "parallel-swish-dropout", 1e-2, 0.85),
        ("bert", "parallel-swish-dropout", 3e-2, 0.9),
        ("t5", "pfeiffer-ln-gelu", 3e-2, 0.5),
        # GPT-2's 0.02-std initialisation gives a sharply curved loss: small steps, slow but steady.
        ("gpt2", "houlsby", 3e-3, 0.98),
    ],
)
def test_training_reduces_the_loss(arch, variant, lr, ratio):
    """15 Adam steps: the loss curve and the trained adapters equal those of the same model run
    through plain torch autograd (the same dropout masks, from the same seeds), and the loss falls.

    PEFT has no bottleneck adapters, so the reference is autograd over the adapter's formula: a
    wrong or missing gradient in the op's backward (e.g. the down-projection's, which a falling
    loss alone does not reveal: the up-projection still learns) moves the curve off it.
    """
    from peft_fast.ops._common import dropout_mask, seed_tensor

    def plain_autograd(x, down_weight, down_bias, up_weight, up_bias, *, residual=None, ln_weight=None,
                       ln_bias=None, ln_eps=1e-5, scale=1.0, activation="relu", dropout_p=0.0, training=True,
                       seed=None):  # fmt: skip
        p = float(dropout_p) if training else 0.0
        seed = int(seed_tensor(seed if seed is not None or p > 0.0 else 0))  # the op's draw from torch's generator
        h = x if ln_weight is None else torch.nn.functional.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, ln_eps)
        act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "swish": torch.nn.functional.silu}[activation]
        u = torch.nn.functional.linear(act(torch.nn.functional.linear(h, down_weight, down_bias)), up_weight, up_bias)
        if p > 0.0:
            keep = dropout_mask(seed, u.numel() // u.shape[-1], u.shape[-1], p, u.device).reshape(u.shape)
            u = torch.where(keep, u / (1.0 - p), 0.0)
        return (x if residual is None else residual) + scale * u

    def train(through_autograd: bool):
        model = peft_fast.patch_adapters(build(arch), peft_fast.AdapterConfig(bottleneck_size=8, **CONFIGS[variant]))
        model.train()
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        losses = []
        torch.manual_seed(7)  # the dropout seeds
        with pytest.MonkeyPatch.context() as patched:
            if through_autograd:
                patched.setattr(adapter_ops, "bottleneck_adapter", plain_autograd)
            for _ in range(15):
                optimizer.zero_grad()
                loss = loss_of(model, inputs)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        for name, param in model.named_parameters():
            if name in frozen:
                assert torch.equal(param, frozen[name]), name
        return losses, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    inputs = batch(arch)
    (losses, trained), (expected, reference) = train(through_autograd=False), train(through_autograd=True)
    for step, (ours, theirs) in enumerate(zip(losses, expected, strict=True)):
        assert abs(ours - theirs) <= 1e-4 * theirs, (step, losses, expected)
    assert trained.keys() == reference.keys() and trained
    for name, weight in reference.items():
        assert rel_err(trained[name], weight) < 1e-3, (name, rel_err(trained[name], weight))
    assert all(b < a for a, b in itertools.pairwise(losses[:5])), losses
    assert losses[-1] < ratio * losses[0], losses


def test_nf4_host_weights_keep_working():
    inputs = batch("llama")
    quantized = peft_fast.quantize_model(build("llama"), progress=False)
    expected = logits(quantized, inputs)
    model = peft_fast.patch_adapters(build("llama"), peft_fast.AdapterConfig(bottleneck_size=8, quantize="nf4"))
    assert isinstance(model.model.layers[0].mlp.down_proj, peft_fast.NF4Linear)
    assert torch.equal(logits(model, inputs), expected)  # the same NF4 bytes, and a zero adapter
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_of(model, inputs)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses


def test_adapters_on_top_of_qlora_train_both():
    inputs = batch("llama")
    lora = peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], quantize="nf4")
    model = peft_fast.patch(build("llama"), lora)
    model = peft_fast.patch_adapters(model, peft_fast.AdapterConfig(placement="pfeiffer", bottleneck_size=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in trainable) and any(".adapters." in n for n in trainable)
    model.train()
    loss_of(model, inputs).backward()
    # Both methods start as the identity through a zero factor (lora_B, adapter_up), which alone
    # gets a non-zero gradient at the first step; every trainable tensor gets a gradient.
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            if ".lora_B." in name or ".adapter_up." in name:
                assert param.grad.abs().sum() > 0, name


# -- files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "variant", "example_key"),
    [
        ("llama", "pfeiffer-ln-gelu", "model.layers.1.output_adapters.adapters.default.adapter_norm_before.weight"),
        ("bert", "houlsby", "bert.encoder.layer.0.attention.output.adapters.default.adapter_down.0.weight"),
        ("t5", "parallel-swish-dropout", "decoder.block.0.layer.2.adapters.default.adapter_up.bias"),
    ],
)
def test_save_and_load_round_trip(arch, variant, example_key, tmp_path):
    inputs = batch(arch)
    model = peft_fast.patch_adapters(build(arch), peft_fast.AdapterConfig(bottleneck_size=8, **CONFIGS[variant]))
    randomize(model)
    expected = logits(model, inputs)
    peft_fast.save_adapters(model, tmp_path)
    with safe_open(tmp_path / "adapter.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert example_key in keys
    assert keys == {n for n, _ in model.named_parameters() if ".adapters.default." in n}
    document = json.loads((tmp_path / "adapter_config.json").read_text())
    assert document["name"] == "default" and document["hidden_size"] == HIDDEN
    assert document["config"]["bottleneck_size"] == 8 and document["config"]["architecture"] == "bottleneck"

    loaded = peft_fast.load_adapters(build(arch), tmp_path)
    assert torch.equal(logits(loaded, inputs), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    renamed = peft_fast.load_adapters(build(arch), tmp_path, adapter_name="task", is_trainable=True)
    assert torch.equal(logits(renamed, inputs), expected)
    assert all(".adapters.task." in n for n, p in renamed.named_parameters() if p.requires_grad)


def test_a_file_for_another_model_is_refused_before_the_model_changes(tmp_path):
    model = peft_fast.patch_adapters(build("llama"), peft_fast.AdapterConfig(bottleneck_size=8))
    peft_fast.save_adapters(model, tmp_path)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)  # fmt: skip
    deeper = transformers.LlamaForCausalLM(config)
    keys = deeper.state_dict().keys()
    with pytest.raises(ValueError, match=r"missing model\.layers\.2\.attention_adapters"):
        peft_fast.load_adapters(deeper, tmp_path)
    assert deeper.state_dict().keys() == keys and not hasattr(deeper, "peft_fast_adapter_state")


def test_unpatch_removes_every_trace_and_a_second_adapter_stacks():
    base = build("gpt2")
    inputs = batch("gpt2")
    keys = base.state_dict().keys()
    expected = logits(base, inputs)
    model = peft_fast.patch_adapters(copy.deepcopy(base), peft_fast.AdapterConfig(bottleneck_size=8))
    model = peft_fast.patch_adapters(model, peft_fast.AdapterConfig(placement="pfeiffer", bottleneck_size=4), "second")
    randomize(model)
    assert peft_fast.trainable_parameters(model)[0] == 2 * 2 * (2 * 64 * 8 + 72) + 2 * (2 * 64 * 4 + 68)
    adapted = logits(model, inputs)
    # A deep copy carries its own hooks: unpatching the copy leaves the original adapted.
    assert torch.equal(logits(peft_fast.unpatch_adapters(copy.deepcopy(model)), inputs), expected)
    assert torch.equal(logits(model, inputs), adapted)
    restored = peft_fast.unpatch_adapters(model)
    assert restored.state_dict().keys() == keys
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in restored.modules())
    assert torch.equal(logits(restored, inputs), expected)


def test_bf16_model_fresh_adapters_are_bit_identical_and_train():
    base = build("llama").to(torch.bfloat16)
    inputs = batch("llama")
    expected = logits(base, inputs)
    config = peft_fast.AdapterConfig(bottleneck_size=8, ln_before=True, non_linearity="gelu")
    model = peft_fast.patch_adapters(copy.deepcopy(base), config)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.equal(logits(model, inputs), expected)
    model.train()
    loss_of(model, inputs).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)


def test_torch_compile_sees_the_ops_and_hooks_without_graph_breaks():
    """Adapters (hooks + custom op, with dropout) and (IA)³ in one model, compiled with fullgraph=True."""
    inputs = batch("llama")
    config = peft_fast.AdapterConfig(bottleneck_size=8, non_linearity="gelu", ln_before=True, dropout=0.1)
    model = peft_fast.patch_ia3(peft_fast.patch_adapters(build("llama"), config), peft_fast.IA3Config())
    randomize(model)
    model.train()
    torch.manual_seed(3)  # the dropout seeds are drawn in the graph from torch's generator
    eager_loss = loss_of(model, inputs)
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.manual_seed(3)
    loss = loss_of(compiled, inputs)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


# -- the op's registration, bad input ---------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "gelu", "swish"])
def test_torch_backend_gradients_pass_gradcheck_in_float64(activation):
    generator = torch.Generator().manual_seed(4)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator).requires_grad_()

    x, residual = leaf(2, 3, 12), leaf(2, 3, 12)
    tensors = (x, leaf(4, 12), leaf(4), leaf(12, 4), leaf(12), leaf(12), leaf(12), residual)

    def serial(x, down_w, down_b, up_w, up_b, ln_w, ln_b, residual):
        return peft_fast.bottleneck_adapter(x, down_w, down_b, up_w, up_b, ln_weight=ln_w, ln_bias=ln_b, scale=0.7,
                                            activation=activation)  # fmt: skip

    def parallel_with_dropout(x, down_w, down_b, up_w, up_b, ln_w, ln_b, residual):
        return peft_fast.bottleneck_adapter(x, down_w, down_b, up_w, up_b, residual=residual, scale=1.5,
                                            activation=activation, dropout_p=0.3, seed=11)  # fmt: skip

    assert torch.autograd.gradcheck(serial, tensors)
    assert torch.autograd.gradcheck(parallel_with_dropout, tensors)


def test_the_custom_op_passes_opcheck():
    x = torch.randn(6, 24, requires_grad=True)
    weights = [torch.randn(4, 24), torch.randn(4), torch.randn(24, 4), torch.randn(24)]
    weights = [w.requires_grad_() for w in weights]
    ln = [torch.randn(24, requires_grad=True), torch.randn(24, requires_grad=True)]
    seed = torch.tensor([3])
    for residual, norm in ((None, [None, None]), (torch.randn(6, 24, requires_grad=True), ln)):
        args = (x, residual, *norm, *weights, 0.5, "gelu", 1e-5, 0.2, seed)
        torch.library.opcheck(_bottleneck_adapter_op, args)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"bottleneck_size": 96}, "bottleneck_size 96 is larger than the model's hidden size 64"),
        ({"non_linearity": "tanh"}, "unknown non_linearity 'tanh'; valid choices: relu, gelu, swish"),
        ({"placement": "lora"}, "unknown placement 'lora'; valid choices: houlsby, pfeiffer, parallel"),
        ({"reduction_factor": 0.5}, "reduction_factor must be >= 1"),
        ({"placement": "houlsby", "locations": ["ffn"]}, "locations can only be chosen for placement='parallel'"),
        ({"locations": ["mlp"], "placement": "parallel"}, "unknown location 'mlp'; valid choices: attention, ffn"),
        ({"leave_out": [7]}, r"leave_out \[7\] is outside the model's layers 0..1"),
    ],
)
def test_bad_settings_are_clear_errors_and_change_nothing(settings, message):
    model = build("llama")
    keys = model.state_dict().keys()
    with pytest.raises(ValueError, match=message):
        peft_fast.patch_adapters(model, peft_fast.AdapterConfig(**settings))
    assert model.state_dict().keys() == keys and not hasattr(model, "peft_fast_adapter_state")


def test_unsupported_models_and_repeated_names_are_clear_errors():
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=1,
                                                             num_attention_heads=4, vocab_size=VOCAB,
                                                             word_embed_proj_dim=64))  # fmt: skip
    with pytest.raises(ValueError, match=r"found no transformer layers in OPTForCausalLM; .*Llama-family"):
        peft_fast.patch_adapters(opt, peft_fast.AdapterConfig())
    model = peft_fast.patch_adapters(build("t5"), peft_fast.AdapterConfig())
    with pytest.raises(ValueError, match="already has a bottleneck adapter named 'default'"):
        peft_fast.patch_adapters(model, peft_fast.AdapterConfig())
    with pytest.raises(ValueError, match="valid choices: relu, gelu, swish"):
        peft_fast.bottleneck_adapter(torch.randn(2, 8), *[torch.randn(s) for s in ((2, 8), (2,), (8, 2), (8,))],
                                     activation="elu")  # fmt: skip
