"""The public front doors work the same way for every method a model can be patched with.

A tiny seeded Llama (tests/tiny_models.py) is patched through ``peft_fast.patch`` alone (never the
method-specific ``patch_ia3`` / ``patch_adapters`` / ``patch_prompt``) with LoRA, QLoRA, (IA)³,
bottleneck adapters in each placement, and the four prompt methods. On fresh deep copies of that one
base, for each method:

1. the patched output differs from the base (the adapter was randomized: guards the checks below);
2. ``disable_adapters`` gives the base output inside the block, and the patched one after it;
3. ``merge`` folds LoRA / QLoRA / (IA)³ in (same output, no peft_fast layer or attribute left) and
   refuses adapters and prompt methods ("cannot be merged") without touching the model;
4. ``unpatch`` gives back the base: its output, its state-dict keys, no peft_fast attribute;
5. ``save_adapter`` then ``load_adapter`` onto a fresh base reproduces the patched output;
6. ``set_adapter`` accepts "default" (output unchanged) and refuses an unknown name;
7. ``add_adapter`` adds a second adapter to LoRA / QLoRA / bottleneck adapters and refuses one for
   prompt methods ("one adapter per model");
8. ``print_trainable_parameters`` prints PEFT's line with a positive trainable count;
9. every front door refuses a model peft_fast did not patch ("not patched by peft_fast").

Outputs are fp32 logits in eval mode under no_grad, on the torch backend.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from tiny_models import batch, build, logits

import peft_fast

ARCH = "llama"  # every method supports Llama, and LLaMA-Adapter supports only the Llama family
SEQ_LEN = batch(ARCH)["input_ids"].shape[1]
# Classes of the layers peft_fast swaps into a model; none may survive merge.
PEFT_FAST_LAYERS = {"LoraLinear", "IA3Linear", "NF4Linear"}


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    # The plain-torch ops: the Triton interpreter would only make this slow on CPU.
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


# -- randomizing adapters, so that none of them is the identity ------------------------------------


def _keep(model: torch.nn.Module) -> None:
    """LoRA with init_lora_weights=False and the prompt encoders already start random."""


def _randomize(model: torch.nn.Module, wanted: Callable[[str], bool], value: Callable[[torch.Tensor], torch.Tensor]):
    generator = torch.Generator().manual_seed(3)
    changed = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if wanted(name):
                param.copy_(value(torch.randn(param.shape, generator=generator)))
                changed += 1
    assert changed, "found no adapter parameter to randomize"


def _randomize_ia3(model: torch.nn.Module) -> None:
    # (IA)³ vectors start at ones (the identity): scale by 1 ± 0.5 instead.
    _randomize(model, lambda name: ".ia3_l." in name, lambda noise: 1 + 0.5 * noise)


def _randomize_adapters(model: torch.nn.Module) -> None:
    # mam_adapter init zeroes the up-projection (the identity): give it (and its bias) small values.
    _randomize(model, lambda name: ".adapters." in name and ".adapter_up." in name, lambda noise: 0.1 * noise)


def _open_adaption_gate(model: torch.nn.Module) -> None:
    # LLaMA-Adapter's gate starts at zero, which makes the prompt a no-op.
    _randomize(model, lambda name: name.endswith("adaption_gate"), lambda noise: torch.full_like(noise, 0.8))


# -- the methods ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    id: str
    config: Callable[[], object]
    randomize: Callable[[torch.nn.Module], None]
    kind: str  # "lora", "ia3", "adapter" or "prompt"
    quantized: bool = False
    grows: bool = False  # prompt tuning / P-tuning: the logits cover the virtual tokens too
    second: Callable[[], object] | None = None  # the config add_adapter should accept

    @property
    def mergeable(self) -> bool:
        return self.kind in ("lora", "ia3")

    @property
    def stacks(self) -> bool:
        return self.kind in ("lora", "ia3", "adapter")


def _lora(quantize: str | None = None, r: int = 4) -> peft_fast.LoraConfig:
    return peft_fast.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                quantize=quantize)  # fmt: skip


def _ia3() -> peft_fast.IA3Config:
    return peft_fast.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])


def _adapter(placement: str) -> Method:
    config = functools.partial(peft_fast.AdapterConfig, placement=placement, bottleneck_size=8)
    return Method(f"adapter-{placement}", config, _randomize_adapters, "adapter", second=config)


METHODS = [
    Method("lora", _lora, _keep, "lora", second=functools.partial(_lora, r=2)),
    Method(
        "qlora",
        functools.partial(_lora, "nf4"),
        _keep,
        "lora",
        quantized=True,
        second=functools.partial(_lora, "nf4", r=2),
    ),
    Method("ia3", _ia3, _randomize_ia3, "ia3", second=_ia3),
    *(_adapter(placement) for placement in ("houlsby", "pfeiffer", "parallel")),
    Method("prompt-tuning", lambda: peft_fast.PromptTuningConfig(num_virtual_tokens=4), _keep, "prompt", grows=True),
    Method("prefix-tuning", lambda: peft_fast.PrefixTuningConfig(num_virtual_tokens=4), _keep, "prompt"),
    Method("p-tuning", lambda: peft_fast.PromptEncoderConfig(num_virtual_tokens=4), _keep, "prompt", grows=True),
    Method(
        "llama-adapter",
        lambda: peft_fast.AdaptionPromptConfig(adapter_len=4, adapter_layers=1),
        _open_adaption_gate,
        "prompt",
    ),
]


def _params(methods: list[Method]) -> list:
    return [pytest.param(method, id=method.id) for method in methods]


ALL = _params(METHODS)
MERGEABLE = _params([m for m in METHODS if m.mergeable])
NOT_MERGEABLE = _params([m for m in METHODS if not m.mergeable])
STACKING = _params([m for m in METHODS if m.stacks])
SINGLE_ADAPTER = _params([m for m in METHODS if not m.stacks])


# -- models and outputs -----------------------------------------------------------------------------


@functools.cache
def _base() -> torch.nn.Module:
    """The one seeded base model; tests only ever touch deep copies of it."""
    return build(ARCH)


@functools.cache
def _quantized_base() -> torch.nn.Module:
    """The base stored in NF4 as QLoRA's patch stores it: every Linear but the output head (Llama has
    no _keep_in_fp32_modules), blocksize 64 with double quantization (LoraConfig's defaults)."""
    return peft_fast.quantize_model(copy.deepcopy(_base()), blocksize=64, double_quant=True,
                                    skip_modules=("lm_head",), progress=False)  # fmt: skip


def _reference(method: Method) -> torch.nn.Module:
    """What the model is without its adapter: QLoRA's NF4 base stays NF4 (unpatch keeps it so)."""
    return _quantized_base() if method.quantized else _base()


def _out(model: torch.nn.Module) -> torch.Tensor:
    return logits(model.eval(), batch(ARCH))


@functools.cache
def _reference_out(method: Method) -> torch.Tensor:
    return _out(_reference(method))


def _patched(method: Method) -> torch.nn.Module:
    model = peft_fast.patch(copy.deepcopy(_base()), method.config())
    method.randomize(model)
    return model.eval()


def _same(actual: torch.Tensor, expected: torch.Tensor, tol: float = 0.0) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def _leftover_attributes(model: torch.nn.Module) -> list[str]:
    """Attributes, parameters, buffers and children named peft_fast* (or _peft_fast*) anywhere in the model."""
    found = []
    for prefix, module in model.named_modules():
        names = [*vars(module), *module._parameters, *module._buffers, *module._modules]
        found += [f"{prefix}.{n}" if prefix else n for n in names if n.lstrip("_").startswith("peft_fast")]
    return found


# -- 1. the guard -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
def test_patched_output_differs_from_the_base(method):
    out = _out(_patched(method))
    if method.grows:  # the virtual tokens come first; the real positions are the last SEQ_LEN
        assert out.shape[1] == SEQ_LEN + 4
        out = out[:, -SEQ_LEN:]
    assert out.shape == _reference_out(method).shape
    assert (out - _reference_out(method)).abs().max() > 1e-3, "the adapter is the identity: the checks prove nothing"


# -- 2. disable_adapters ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
def test_disable_adapters_gives_the_base_output_inside_the_block(method):
    model = _patched(method)
    patched = _out(model)
    with peft_fast.disable_adapters(model):
        _same(_out(model), _reference_out(method), 1e-6)
    _same(_out(model), patched)


# -- 3. merge ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_folds_the_adapter_into_a_plain_model(method):
    model = _patched(method)
    merged = peft_fast.merge(copy.deepcopy(model))
    _same(_out(merged), _out(model), 1e-4 if method.quantized else 1e-5)
    layers = sorted({type(m).__name__ for m in merged.modules()} & PEFT_FAST_LAYERS)
    assert not layers, f"merge left peft_fast layers: {layers}"
    assert not _leftover_attributes(merged)


@pytest.mark.parametrize("method", NOT_MERGEABLE)
def test_merge_refuses_adapters_and_prompts_and_leaves_the_model_alone(method):
    model = _patched(method)
    before = _out(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        peft_fast.merge(model)
    _same(_out(model), before)


# -- 4. unpatch -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
def test_unpatch_gives_back_the_base_model(method):
    model = peft_fast.unpatch(_patched(method))
    if method.quantized:  # the NF4 base stays NF4; its forward path differs from LoraLinear's by rounding
        _same(_out(model), _reference_out(method), 1e-6)
    else:
        assert torch.equal(_out(model), _reference_out(method))
    assert model.state_dict().keys() == _reference(method).state_dict().keys()
    assert not _leftover_attributes(model)


# -- 5. save_adapter / load_adapter -------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
def test_save_then_load_onto_a_fresh_base_reproduces_the_patched_output(method, tmp_path):
    model = _patched(method)
    peft_fast.save_adapter(model, tmp_path / "a")
    # An adapter file describes the adapter, not how the base is stored (quantize is not saved, as
    # in PEFT): a QLoRA adapter goes back onto the NF4 base it was trained on.
    loaded = peft_fast.load_adapter(copy.deepcopy(_reference(method)), tmp_path / "a")
    _same(_out(loaded), _out(model), 1e-5 if method.quantized else 1e-6)


# -- 6. set_adapter ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
def test_set_adapter_accepts_default_and_refuses_an_unknown_name(method):
    model = _patched(method)
    before = _out(model)
    peft_fast.set_adapter(model, "default")
    _same(_out(model), before)
    with pytest.raises(ValueError, match="unknown adapter"):
        peft_fast.set_adapter(model, "nope")


# -- 7. add_adapter ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", STACKING)
def test_add_adapter_adds_a_second_adapter(method, tmp_path):
    model = _patched(method)
    before = _out(model)
    peft_fast.add_adapter(model, method.second(), "second")
    if method.kind in ("lora", "ia3"):  # the new adapter is not active yet (PEFT's add_adapter)
        _same(_out(model), before)
    # The model knows "second": it can be saved by name.
    peft_fast.save_adapter(model, tmp_path / "second", "second")
    assert (tmp_path / "second" / "adapter_config.json").is_file()


@pytest.mark.parametrize("method", SINGLE_ADAPTER)
def test_add_adapter_refuses_a_second_prompt_adapter(method):
    model = _patched(method)
    with pytest.raises((TypeError, ValueError), match="one adapter per model"):
        peft_fast.add_adapter(model, method.config(), "second")


# -- 8. print_trainable_parameters ------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
def test_print_trainable_parameters_counts_the_adapter(method, capsys):
    model = _patched(method)
    capsys.readouterr()  # drop anything patching printed (quantization progress)
    peft_fast.print_trainable_parameters(model)
    line = capsys.readouterr().out.strip()
    match = re.match(r"trainable params: ([\d,]+)", line)
    assert match, line
    assert int(match.group(1).replace(",", "")) > 0, line


# -- 9. an unpatched model --------------------------------------------------------------------------


def _disable(model, directory) -> None:
    with peft_fast.disable_adapters(model):
        pass


FRONT_DOORS = {
    "disable_adapters": _disable,
    "merge": lambda model, directory: peft_fast.merge(model),
    "unpatch": lambda model, directory: peft_fast.unpatch(model),
    "set_adapter": lambda model, directory: peft_fast.set_adapter(model, "default"),
    "save_adapter": lambda model, directory: peft_fast.save_adapter(model, directory),
    "add_adapter": lambda model, directory: peft_fast.add_adapter(model, _lora(), "second"),
}


@pytest.mark.parametrize("door", list(FRONT_DOORS))
def test_front_doors_refuse_an_unpatched_model(door, tmp_path):
    with pytest.raises(ValueError, match="not patched by peft_fast"):
        FRONT_DOORS[door](copy.deepcopy(_base()), tmp_path / "a")
