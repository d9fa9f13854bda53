"""LoRA on ``nn.Parameter``s (``target_parameters``) against PEFT 0.21's ``lora.ParamWrapper``.

Models: a tiny custom module holding a 3-D experts parameter (PEFT's [experts, out, in] layout, and
GPT-OSS's ``is_transposed`` [experts, in, out]) and a 2-D parameter its own forward uses (the two
nest on one module), and two tiny MoE models built from transformers configs: Qwen3-MoE
(``gate_up_proj`` [E, 2·I, H], ``down_proj`` [E, H, I]) and GPT-OSS (transposed). Each compares,
with PEFT's adapter weights copied in: outputs, gradients of every adapter tensor, trainable
parameters, files both ways (same keys and shapes), merge, disable, unpatch, two adapters, and the
refusals (model untouched).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

import peft_fast

PREFIX = "base_model.model."
TOL = 1e-5
MERGE_TOL = 1e-4


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


class Block(nn.Module):
    """``experts`` [3, 6, 8] ([E, out, in]) or, with ``is_transposed``, [3, 8, 6]; ``mix`` [4, 6] read by F.linear."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.experts = nn.Parameter(torch.randn((3, 8, 6) if transposed else (3, 6, 8)) * 0.3)
        self.mix = nn.Parameter(torch.randn(4, 6) * 0.3)
        self.is_transposed = transposed

    def forward(self, x):
        per_expert = self.experts if self.is_transposed else self.experts.transpose(-2, -1)  # [E, in, out]
        hidden = torch.einsum("ni,eio->neo", x, per_expert).relu()
        gates = torch.softmax(x[:, :3], dim=-1)  # a fixed mix of the experts per token
        return nn.functional.linear((gates[..., None] * hidden).sum(1), self.mix)


class Custom(nn.Module):
    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.block = Block(transposed)
        self.out = nn.Linear(4, 3)

    def forward(self, X):
        return self.out(self.block(self.inp(X)))


def _qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=1, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config)


def _gpt_oss():
    config = transformers.GptOssConfig(
        vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        layer_types=["full_attention"], rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config)


EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# id -> (model builder, config kwargs, input builder)
CASES = {
    "custom-both": (Custom, {"target_modules": ["inp"], "target_parameters": ["block.experts", "block.mix"]}),
    "custom-experts": (Custom, {"target_modules": [], "target_parameters": ["experts"], "r": 2}),
    "custom-transposed": (lambda: Custom(True), {"target_parameters": ["block.experts", "mix"], "lora_alpha": 16}),
    "custom-2d-rslora": (Custom, {"target_modules": ["out"], "target_parameters": ["block.mix"], "use_rslora": True}),
    "qwen3_moe": (_qwen3_moe, {"target_modules": ["q_proj"], "target_parameters": EXPERTS, "r": 4}),
    "gpt_oss": (_gpt_oss, {"target_modules": [], "target_parameters": EXPERTS, "r": 4}),
}
CASE_IDS = list(CASES)


def build(case_id: str) -> nn.Module:
    torch.manual_seed(0)
    model = CASES[case_id][0]().eval()
    for param in model.parameters():  # MoE configs may start experts at zero: random values make them count
        if param.dim() == 3 and not param.abs().sum():
            nn.init.normal_(param, std=0.3)
    return model


def inputs(case_id: str) -> dict:
    generator = torch.Generator().manual_seed(1)
    if case_id.startswith("custom"):
        return {"X": torch.randn(7, 5, generator=generator)}
    return {"input_ids": torch.randint(0, 64, (2, 6), generator=generator)}


def output(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out


def run(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return output(model, batch).detach().clone()


def configs(case_id: str, **overrides):
    kwargs = {**CASES[case_id][1], **overrides}
    return peft.LoraConfig(**copy.deepcopy(kwargs)), peft_fast.LoraConfig(**copy.deepcopy(kwargs))


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n.removeprefix(PREFIX): p for n, p in model.named_parameters() if ".lora_" in n}


def pair(case_id: str, **overrides):
    """(base, PEFT model, ours), PEFT's (random: init_lora_weights=False) adapter copied into ours."""
    overrides.setdefault("init_lora_weights", False)
    base = build(case_id)
    theirs_config, ours_config = configs(case_id, **overrides)
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_config)
    ours = peft_fast.patch(copy.deepcopy(base), ours_config)
    their_adapter, our_adapter = adapter_params(theirs), adapter_params(ours)
    assert their_adapter.keys() == our_adapter.keys()
    with torch.no_grad():
        for name, param in our_adapter.items():
            assert param.shape == their_adapter[name].shape, name
            param.copy_(their_adapter[name])
    return base, theirs.eval(), ours.eval()


def close(actual, expected, what, tol=TOL):
    err = (actual.float() - expected.float()).abs().max().item()
    assert torch.allclose(actual.float(), expected.float(), rtol=tol, atol=tol), f"{what}: max |difference| {err:.3g}"


def module_types(model):
    return {name: type(module) for name, module in model.named_modules()}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_outputs_and_gradients_match_peft(case_id):
    base, theirs, ours = pair(case_id)
    batch = inputs(case_id)
    expected = run(theirs, batch)
    assert not torch.allclose(expected, run(base, batch), atol=1e-3), "adapter is a no-op"
    close(run(ours, batch), expected, "output")
    for model in (theirs, ours):
        output(model, batch).square().mean().backward()
    their_adapter, our_adapter = adapter_params(theirs), adapter_params(ours)
    for name, param in our_adapter.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        close(param.grad, their_adapter[name].grad, f"gradient of {name}")
    theirs_trainable = {n.removeprefix(PREFIX) for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == theirs_trainable
    # Outside a forward the module holds the frozen W (as in PEFT): the parameter itself, never W + ΔW.
    for name, param in base.named_parameters():
        if param.dim() == 3:
            assert torch.equal(ours.get_parameter(_wrapped_name(ours, name)), param), name


def _wrapped_name(model, name: str) -> str:
    """A base parameter's name in the patched model (wrappers insert ``base_layer``s)."""
    owner, _, param = name.rpartition(".")
    module = model.get_submodule(owner)
    while isinstance(module, peft_fast.layers.LoraParamWrapper):
        owner, module = owner + ".base_layer", module.base_layer
    return f"{owner}.{param}"


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_files_both_ways(case_id, tmp_path):
    base, theirs, ours = pair(case_id)
    batch = inputs(case_id)
    theirs.save_pretrained(tmp_path / "peft")
    peft_fast.save_adapter(ours, tmp_path / "ours")
    their_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert our_file.keys() == their_file.keys()
    for key, value in our_file.items():
        assert torch.equal(value, their_file[key]), key

    loaded = peft_fast.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    close(run(loaded, batch), run(theirs, batch), "PEFT's file in peft_fast")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    close(run(reloaded, batch), run(ours, batch), "peft_fast's file in PEFT")
    assert set(reloaded.peft_config["default"].target_parameters) == set(CASES[case_id][1]["target_parameters"])


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_merge_matches_peft_merge_and_unload(case_id):
    base, theirs, ours = pair(case_id)
    batch = inputs(case_id)
    unmerged = run(ours, batch)
    their_merged = theirs.merge_and_unload()
    merged = peft_fast.merge(ours)
    close(run(merged, batch), unmerged, "merged vs unmerged", MERGE_TOL)
    close(run(merged, batch), run(their_merged, batch), "merged vs PEFT", MERGE_TOL)
    assert module_types(merged) == module_types(base)
    ours_state, their_state = merged.state_dict(), their_merged.state_dict()
    assert ours_state.keys() == their_state.keys()
    for key, value in their_state.items():
        close(ours_state[key], value, f"merged {key}", MERGE_TOL)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_disable_and_unpatch(case_id):
    base, theirs, ours = pair(case_id)
    batch = inputs(case_id)
    with peft_fast.disable_adapters(ours):
        assert torch.equal(run(ours, batch), run(base, batch))
    with theirs.disable_adapter():
        close(run(theirs, batch), run(base, batch), "PEFT disabled")
    close(run(ours, batch), run(theirs, batch), "enabled again")
    peft_fast.unpatch(ours)
    assert module_types(ours) == module_types(base)
    assert ours.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in ours.state_dict().items())
    assert torch.equal(run(ours, batch), run(base, batch))


@pytest.mark.parametrize("case_id", ["custom-both", "qwen3_moe"])
def test_two_adapters_match_peft(case_id, tmp_path):
    """A second adapter on the same parameters (the wrappers are reused); both active: PEFT's Σ ΔW path."""
    base = build(case_id)
    batch = inputs(case_id)
    (theirs_first, ours_first), (theirs_second, ours_second) = (
        configs(case_id, init_lora_weights=False),
        configs(case_id, init_lora_weights=False, r=2, lora_alpha=4),
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_first)
    theirs.add_adapter("other", theirs_second)
    ours = peft_fast.patch(copy.deepcopy(base), ours_first)
    peft_fast.add_adapter(ours, ours_second, "other")
    their_adapter, our_adapter = adapter_params(theirs), adapter_params(ours)
    assert their_adapter.keys() == our_adapter.keys()
    with torch.no_grad():
        for name, param in our_adapter.items():
            param.copy_(their_adapter[name])
    theirs.eval(), ours.eval()
    outputs = []
    for active in (["default"], ["other"], ["default", "other"]):
        theirs.base_model.set_adapter(active)
        peft_fast.set_adapter(ours, active)
        outputs.append(run(ours, batch))
        close(outputs[-1], run(theirs, batch), f"output with {active}")
    assert not torch.allclose(outputs[0], outputs[2], atol=1e-4)
    merged = peft_fast.merge(ours)
    close(run(merged, batch), outputs[2], "both merged", MERGE_TOL)

    # PEFT's rule: every adapter with target_parameters targets the same parameters.
    other = peft_fast.patch(copy.deepcopy(base), configs(case_id)[1])
    narrower = {**CASES[case_id][1], "target_parameters": CASES[case_id][1]["target_parameters"][:1]}
    with pytest.raises(ValueError, match="all adapters must target the same set of parameters"):
        peft_fast.add_adapter(other, peft_fast.LoraConfig(**narrower), "other")


def test_trains_and_only_the_adapter_moves():
    _, theirs, ours = pair("custom-both", init_lora_weights=True)
    batch = inputs("custom-both")
    for model in (theirs, ours):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            output(model, batch).square().mean().backward()
            optimizer.step()
        model.eval()
    close(run(ours, batch), run(theirs, batch), "after 3 SGD steps", MERGE_TOL)
    before = build("custom-both")
    assert torch.equal(ours.block.base_layer.base_layer.experts, before.block.experts)


def test_bf16_matches_peft():
    base = build("custom-both").to(torch.bfloat16)
    batch = {"X": inputs("custom-both")["X"].bfloat16()}
    theirs_config, ours_config = configs("custom-both", init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_config).eval()
    ours = peft_fast.patch(copy.deepcopy(base), ours_config).eval()
    their_adapter = adapter_params(theirs)
    assert {n: p.dtype for n, p in adapter_params(ours).items()} == {n: p.dtype for n, p in their_adapter.items()}
    with torch.no_grad():
        for name, param in adapter_params(ours).items():
            param.copy_(their_adapter[name])
    expected, actual = run(theirs, batch), run(ours, batch)
    assert actual.dtype == expected.dtype == torch.bfloat16
    assert ((actual.float() - expected.float()).norm() / expected.float().norm()).item() < 1e-2


# -- refusals -----------------------------------------------------------------------------------


class WithBias(Custom):
    def __init__(self) -> None:
        super().__init__()
        self.block.scale = nn.Parameter(torch.ones(4))  # 1-D
        self.top = nn.Parameter(torch.ones(2, 2))  # on the top-level module


REFUSALS = [
    ({"target_parameters": ["block.nothing"]}, r"target_parameters \['block.nothing'\] match no parameter"),
    ({"target_parameters": ["block.scale"]}, r"'block.scale' has shape \(4,\)"),
    ({"target_parameters": ["top"]}, "top-level module"),
    ({"target_modules": ["inp"], "target_parameters": ["inp.weight"]}, "targeted by target_modules or by"),
    ({"target_parameters": ["experts"], "lora_dropout": 0.1}, "lora_dropout"),
    ({"target_parameters": ["experts"], "use_dora": True}, "use_dora"),
    ({"target_parameters": ["experts"], "lora_bias": True}, "lora_bias"),
    ({"target_parameters": ["experts"], "fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"target_parameters": ["experts"], "init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"target_parameters": ["experts"], "bias": "all"}, "bias='all'"),
    ({"target_parameters": ["experts"], "modules_to_save": ["block"]}, "modules_to_save"),
    ({"target_parameters": "experts"}, "must be a list of parameter names"),
]


@pytest.mark.parametrize(("kwargs", "message"), REFUSALS, ids=[m for _, m in REFUSALS])
def test_refusals_leave_the_model_untouched(kwargs, message):
    torch.manual_seed(0)
    model = WithBias()
    types, state = module_types(model), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=message):
        peft_fast.patch(model, peft_fast.LoraConfig(**kwargs))
    assert module_types(model) == types
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_module_target_over_a_wrapped_parameter_is_refused():
    model = peft_fast.patch(build("custom-both"), peft_fast.LoraConfig(target_parameters=["block.mix"]))
    peft_fast.add_adapter(model, peft_fast.LoraConfig(target_modules=["out"]), "other")  # elsewhere: fine
    with pytest.raises(ValueError, match="targeted by target_modules or by target_parameters"):
        peft_fast.add_adapter(model, peft_fast.LoraConfig(target_modules=["block"]), "third")


def test_qlora_keeps_the_wrapped_parameters_module_dense(tmp_path):
    """quantize="nf4" stores the other Linear layers in NF4; a targeted parameter's module stays dense (its own
    forward reads the parameter), and the file still loads into PEFT on the dense base."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    config = peft_fast.LoraConfig(target_modules=["0"], target_parameters=["2.weight"], quantize="nf4")
    model = peft_fast.patch(copy.deepcopy(base), config)
    assert isinstance(model[0].base_layer, peft_fast.NF4Linear)
    assert type(model[2].base_layer) is nn.Linear and torch.equal(model[2].base_layer.weight, base[2].weight)
    with torch.no_grad():
        model[2].lora_B["default"].weight.normal_()
    x = torch.randn(3, 64)
    with torch.no_grad():
        hidden = model[1](model[0](x))
        lora = model[2]
        delta = lora.scaling["default"] * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
        expected = nn.functional.linear(hidden, base[2].weight + delta, base[2].bias)
        close(model(x), expected, "W + s·B·A over an NF4 model")
    peft_fast.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    their_b = theirs.base_model.model[2].lora_B["default"].weight
    assert torch.equal(their_b, model[2].lora_B["default"].weight)
