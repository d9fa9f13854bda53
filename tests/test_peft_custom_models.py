"""Hugging Face PEFT's custom-model test cases, run through PEFT 0.21 and peft_fast side by side.

Ported from PEFT's ``tests/test_custom_models.py`` (``TEST_CASES``, ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``,
the small models and the behaviours of ``TestPeftCustomModel``): the LoRA and (IA)³ cases on Linear, GPT-2
``Conv1D`` and Embedding layers, plus PEFT's config variations (regex targets, r / alpha, rsLoRA, bias modes,
rank / alpha patterns, modules_to_save, fan_in_fan_out, layers_to_transform / layers_pattern, exclude_modules,
init variants, task_type, several adapters, bf16 / fp16, NF4 over bitsandbytes).

Every case builds the same seeded model twice: ``peft.get_peft_model`` on one copy, ``peft_fast.patch`` on the
other, with PEFT's adapter weights copied into peft_fast so that every comparison is a real one. Then each of
PEFT's behaviours runs on both: forward parity, trainable parameters and adapter dtypes, initialisation,
merge == unmerged == merge_and_unload, disable_adapters (PEFT's procedure: train, then disabled == before
training), only adapter parameters updated, adapter files both ways and their contents, the parameters after
loading, and unload / unpatch. Tolerances: fp32 rtol = atol = 1e-5 (1e-4 after a merge or training), bf16 /
fp16 a relative norm of 1e-2, NF4 1e-4.

A case peft_fast does not support must be refused with an error naming the feature; those cases are listed
in ``REFUSED`` (what peft_fast's code refuses on purpose today) and checked at both doors (``patch`` and
``load_adapter`` of PEFT's file). Every other case must pass every behaviour: nothing here is skipped or
marked xfail.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import bitsandbytes as bnb
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peft_fast

PREFIX = "base_model.model."  # PEFT's prefix of the wrapped model's names
FP32_TOL = 1e-5
TRAINED_TOL = 1e-4  # after a merge or a few optimizer steps (PEFT's own merge tolerance)
LOW_PRECISION_TOL = 1e-2  # bf16 / fp16: relative norm of the difference
NF4_TOL = 1e-4


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    # Parity is about what is computed, not how: the plain-torch backend has the kernels' math and
    # dropout semantics (tests/test_kernel_* check the kernels) and keeps this file fast.
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


@pytest.fixture(autouse=True)
def one_thread():
    # These models are a few hundred weights: on a busy 2-core machine torch's second thread made each
    # tiny matmul ~30x slower (thread hand-offs), so every test here runs on one, restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- PEFT's custom models ------------------------------------------------------------------------


class MLP(nn.Module):
    """PEFT's MLP: lin0 (10 -> 20), ReLU, Dropout(0.5), lin1 (20 -> 2), LogSoftmax; ``bias=False`` variant."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = self.drop(self.relu(self.lin0(X.to(self.dtype))))
        return self.sm(self.lin1(X))


class MLPLayerNorm(nn.Module):
    """PEFT's MLP_LayerNorm (its ``nn.LayerNorm(10, 10)`` passes eps=10, kept as PEFT has it)."""

    def __init__(self) -> None:
        super().__init__()
        self.layernorm0 = nn.LayerNorm(10, 10)
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.layernorm1 = nn.LayerNorm(20, 20)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = self.drop(self.relu(self.lin0(self.layernorm0(X.to(self.dtype)))))
        return self.sm(self.lin1(self.layernorm1(X)))


class EmbConv1D(nn.Module):
    """PEFT's ModelEmbConv1D: Embedding(100, 5) -> transformers Conv1D(1, 5) -> ReLU -> flatten -> Linear(10, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(X))))))


class Block(nn.Module):
    """PEFT's Block: lin0, ReLU, Dropout(0.5), lin1 (10 -> 10 each)."""

    def __init__(self, size: int = 10) -> None:
        super().__init__()
        self.lin0 = nn.Linear(size, size)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(size, size)

    def forward(self, X):
        return self.lin1(self.drop(self.relu(self.lin0(X.float()))))


class DeepMLP(nn.Module):
    """PEFT's DeepMLP (its forward's ``X.float(X)`` typo fixed), 3 blocks under ``container`` ("layers")."""

    def __init__(self, container: str = "layers", num_layers: int = 3) -> None:
        super().__init__()
        self.container = container
        setattr(self, container, nn.ModuleList([Block() for _ in range(num_layers)]))
        self.out = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = X.float()
        for layer in getattr(self, self.container):
            X = layer(X)
        return self.sm(self.out(X))


class Nested(nn.Module):
    """A DeepMLP under ``backbone``: layer names become ``backbone.<container>.<i>.lin0``, as in HF models."""

    def __init__(self, container: str = "layers") -> None:
        super().__init__()
        self.backbone = DeepMLP(container)

    def forward(self, X):
        return self.backbone(X)


class MLPClassifier(nn.Module):
    """An MLP whose head is ``classifier`` and whose forward takes ``input_ids``, as PEFT's SEQ_CLS wrapper calls
    it; with a (default) transformers config, which PEFT's save / load of a SEQ_CLS model read."""

    def __init__(self) -> None:
        super().__init__()
        self.config = transformers.PretrainedConfig()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.classifier = nn.Linear(20, 2)

    def forward(self, input_ids=None, **kwargs):
        return self.classifier(self.relu(self.lin0(input_ids.float())))


class MLPWide(nn.Module):
    """For NF4: every in_features a multiple of 64 (bitsandbytes' CPU 4-bit blocks align with rows), no
    Dropout, so train mode (which keeps bitsandbytes' CPU Linear4bit in fp32) is deterministic."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(64, 128)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(128, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin1(self.relu(self.lin0(X))))


MODELS = {
    "MLP": MLP,
    "MLP_NoBias": lambda: MLP(bias=False),
    "MLP_LayerNorm": MLPLayerNorm,
    "EmbConv1D": EmbConv1D,
    "DeepMLP": DeepMLP,
    "NestedDeepMLP": Nested,
    "NestedStagesMLP": lambda: Nested("stages"),  # a layer container name not in peft_fast's default list
    "MLPClassifier": MLPClassifier,
    "MLPWide": MLPWide,
}


def build(model_id: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model, seeded as PEFT's MockTransformerWrapper.from_pretrained does, in ``dtype``, in eval mode."""
    torch.manual_seed(0)
    model = MODELS[model_id]().to(dtype)
    if hasattr(model, "dtype"):
        model.dtype = dtype  # the MLPs cast their input to it, as in PEFT's fp16 / bf16 tests
    return model.eval()


def inputs_for(model_id: str) -> dict[str, torch.Tensor]:
    """PEFT's ``prepare_inputs_for_testing``: arange(90) as 9 rows of 10 (token ids for EmbConv1D)."""
    if model_id == "MLPWide":
        return {"X": torch.randn(9, 64, generator=torch.Generator().manual_seed(1))}
    X = torch.arange(90).view(9, 10)
    return {"input_ids": X} if model_id == "MLPClassifier" else {"X": X}


# -- the cases -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    model_id: str
    method: str  # "lora" or "ia3"
    kwargs: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32


def lora(case_id: str, model_id: str, dtype: torch.dtype = torch.float32, **kwargs) -> Case:
    return Case(case_id, model_id, "lora", kwargs, dtype)


def ia3(case_id: str, model_id: str, dtype: torch.dtype = torch.float32, **kwargs) -> Case:
    return Case(case_id, model_id, "ia3", kwargs, dtype)


BF16, FP16 = torch.bfloat16, torch.float16

CASES = [
    # PEFT's TEST_CASES, LoRA on Linear / Conv1D / Embedding ("Vanilla MLP <n> LoRA ..." -> "mlp<n>...").
    lora("mlp1", "MLP", target_modules="lin0"),
    lora("mlp2", "MLP", target_modules=["lin0"]),
    lora("mlp3", "MLP", target_modules=["lin1"]),
    lora("mlp4", "MLP", target_modules=["lin0", "lin1"]),
    lora("mlp5-modules_to_save", "MLP", target_modules=["lin0"], modules_to_save=["lin1"]),
    lora("mlp6-alpha-dropout", "MLP", target_modules=["lin0"], lora_alpha=4, lora_dropout=0.1),
    lora("mlp7-dora", "MLP", target_modules=["lin0"], use_dora=True),
    lora("mlp8-dora", "MLP", target_modules=["lin0", "lin1"], use_dora=True),
    lora("mlp-kasa", "MLP", target_modules=["lin0"], kasa_config=peft.KasaConfig(), r=4),
    lora("mlp-mica", "MLP", target_modules=["lin0"], init_lora_weights="mica", r=4),
    lora("mlp9-dora", "MLP", target_modules="lin1", use_dora=True, lora_alpha=32),
    lora("mlp10-velora-random", "MLP", target_modules=["lin0"],
         velora_config=peft.VeloraConfig(num_groups=2, init_type="random")),
    lora("mlp11-velora-batch_average", "MLP", target_modules=["lin0", "lin1"],
         velora_config=peft.VeloraConfig(num_groups=2, init_type="batch_average")),
    lora("mlp12-velora-batch_average_once", "MLP", target_modules=["lin0"],
         velora_config=peft.VeloraConfig(num_groups=2, init_type="batch_average_once")),
    lora("embconv1d1", "EmbConv1D", target_modules=["conv1d"]),
    lora("embconv1d2-emb", "EmbConv1D", target_modules=["emb"]),
    lora("embconv1d3-emb-conv1d", "EmbConv1D", target_modules=["emb", "conv1d"]),
    lora("embconv1d1-dora", "EmbConv1D", target_modules=["conv1d"], use_dora=True),
    lora("embconv1d2-dora", "EmbConv1D", target_modules=["emb"], use_dora=True),
    lora("embconv1d3-dora", "EmbConv1D", target_modules=["emb", "conv1d"], use_dora=True),
    lora("embconv1d1-trainable_tokens", "EmbConv1D", target_modules=["conv1d"],
         trainable_token_indices={"emb": [0, 10]}),
    lora("mlp1-lora_bias", "MLP", target_modules=["lin0", "lin1"], lora_bias=True, lora_alpha=32),
    lora("mlp2-target_parameters", "MLP", target_modules=["lin0"], target_parameters=["lin1.weight"]),
    lora("mlp-monteclora", "MLP", target_modules=["lin0"], monteclora_config=peft.MontecloraConfig(num_samples=2)),
    # PEFT's TEST_CASES, (IA)³.
    ia3("mlp1-ia3", "MLP", target_modules="lin0", feedforward_modules=[]),
    ia3("mlp2-ia3", "MLP", target_modules="lin0", feedforward_modules="lin0"),
    ia3("mlp3-ia3", "MLP", target_modules=["lin0"], feedforward_modules=[]),
    ia3("mlp4-ia3", "MLP", target_modules=["lin0"], feedforward_modules=["lin0"]),
    ia3("mlp5-ia3", "MLP", target_modules=["lin1"], feedforward_modules=[]),
    ia3("mlp6-ia3", "MLP", target_modules=["lin1"], feedforward_modules=["lin1"]),
    ia3("mlp7-ia3", "MLP", target_modules=["lin0", "lin1"], feedforward_modules=[]),
    ia3("mlp8-ia3", "MLP", target_modules=["lin0", "lin1"], feedforward_modules=["lin0", "lin1"]),
    ia3("mlp9-ia3-modules_to_save", "MLP", target_modules=["lin0"], modules_to_save=["lin1"],
        feedforward_modules=["lin0"]),
    ia3("embconv1d1-ia3", "EmbConv1D", target_modules=["conv1d"], feedforward_modules=["conv1d"]),
    ia3("embconv1d2-ia3", "EmbConv1D", target_modules=["conv1d", "lin0"], feedforward_modules=["conv1d", "lin0"]),
    ia3("embconv1d3-ia3-modules_to_save", "EmbConv1D", target_modules=["conv1d"], feedforward_modules=["conv1d"],
        modules_to_save=["lin0"]),
    # PEFT's config variations on the same models.
    lora("mlp-regex", "MLP", target_modules=r"lin\d", r=4),
    lora("mlp-r4-alpha32", "MLP", target_modules=["lin0", "lin1"], r=4, lora_alpha=32),
    lora("mlp-rslora", "MLP", target_modules=["lin0", "lin1"], r=4, lora_alpha=8, use_rslora=True),
    lora("mlp-bias-all", "MLP", target_modules=["lin0"], bias="all"),
    lora("mlp-bias-lora_only", "MLP", target_modules=["lin0"], bias="lora_only"),
    lora("mlp_nobias", "MLP_NoBias", target_modules=["lin0", "lin1"]),
    lora("mlp_nobias-bias-all", "MLP_NoBias", target_modules=["lin0"], bias="all"),
    lora("mlp-rank_pattern-alpha_pattern", "MLP", target_modules=["lin0", "lin1"], r=8, rank_pattern={"lin1": 2},
         alpha_pattern={"lin0": 32}),
    lora("deep-rank_pattern-regex", "DeepMLP", target_modules=["lin0", "lin1"], r=4,
         rank_pattern={r"layers\.[12]\.lin0": 2}, alpha_pattern={r"layers\.2\.lin1": 16}),
    lora("mlp_layernorm-modules_to_save", "MLP_LayerNorm", target_modules=["lin0"], modules_to_save=["layernorm1"]),
    lora("mlp-modules_to_save-also-target", "MLP", target_modules=["lin0", "lin1"], modules_to_save=["lin1"]),
    lora("mlp-fan_in_fan_out-linear", "MLP", target_modules=["lin0"], fan_in_fan_out=True),
    lora("embconv1d-fan_in_fan_out", "EmbConv1D", target_modules=["conv1d"], fan_in_fan_out=True),
    lora("embconv1d-conv1d-lin0", "EmbConv1D", target_modules=["conv1d", "lin0"], r=4),
    lora("nested-layers_to_transform", "NestedDeepMLP", target_modules=["lin0"], layers_to_transform=[0, 2]),
    lora("nested-layers_to_transform-int", "NestedDeepMLP", target_modules=["lin1"], layers_to_transform=2),
    lora("nested-layers_pattern", "NestedDeepMLP", target_modules=["lin0", "lin1"], layers_to_transform=[1],
         layers_pattern="layers"),
    lora("deep-layers_pattern-top_level", "DeepMLP", target_modules=["lin0"], layers_to_transform=[0],
         layers_pattern="layers"),
    lora("nested_stages-layers_to_transform", "NestedStagesMLP", target_modules=["lin0"], layers_to_transform=[1]),
    lora("nested_stages-layers_pattern", "NestedStagesMLP", target_modules=["lin0"], layers_to_transform=[1],
         layers_pattern="stages"),
    lora("mlp-exclude-list", "MLP", target_modules=["lin0", "lin1"], exclude_modules=["lin1"]),
    lora("mlp-exclude-regex", "MLP", target_modules=r"lin\d", exclude_modules="lin1"),
    lora("deep-exclude", "DeepMLP", target_modules=["lin0"], exclude_modules=["layers.1.lin0"]),
    lora("mlp-init-gaussian", "MLP", target_modules=["lin0", "lin1"], init_lora_weights="gaussian"),
    lora("mlp-init-false", "MLP", target_modules=["lin0", "lin1"], init_lora_weights=False),
    lora("mlp-init-pissa", "MLP", target_modules=["lin0"], init_lora_weights="pissa"),
    lora("mlp-init-olora", "MLP", target_modules=["lin0"], init_lora_weights="olora"),
    lora("classifier-task_type-seq_cls", "MLPClassifier", target_modules=["lin0"], task_type="SEQ_CLS"),
    ia3("mlp_nobias-ia3", "MLP_NoBias", target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]),
    ia3("mlp-ia3-regex-exclude", "MLP", target_modules=r"lin\d", feedforward_modules=[], exclude_modules=["lin1"]),
    ia3("mlp-ia3-fan_in_fan_out-linear", "MLP", target_modules=["lin0"], feedforward_modules=[], fan_in_fan_out=True),
    # Low precision (PEFT's test_forward_bfloat16 / _float16 and test_adapter_dtype_autocast).
    lora("mlp4-bf16", "MLP", BF16, target_modules=["lin0", "lin1"]),
    lora("mlp4-fp16", "MLP", FP16, target_modules=["lin0", "lin1"]),
    lora("embconv1d1-bf16", "EmbConv1D", BF16, target_modules=["conv1d"]),
    ia3("mlp8-ia3-bf16", "MLP", BF16, target_modules=["lin0", "lin1"], feedforward_modules=["lin0", "lin1"]),
    ia3("mlp7-ia3-fp16", "MLP", FP16, target_modules=["lin0", "lin1"], feedforward_modules=[]),
]  # fmt: skip

# What peft_fast refuses on purpose today, with the message (a regex) both doors must raise. Only features
# its code names as unsupported: config._UNSUPPORTED_WHEN_SET (layer_replication, ...), DoRA on an
# Embedding (lora/patching.py), LoraConfig's init_lora_weights check, and a second (IA)³ adapter that
# would scale the other side of a layer (PEFT keeps the first adapter's side silently; ia3/patching.py's
# find_ia3_targets).
REFUSED = {
    "embconv1d2-dora": r"DoRA \(use_dora=True\) is supported on Linear / Conv1D layers .*Embedding layers: emb",
    "embconv1d3-dora": r"DoRA \(use_dora=True\) is supported on Linear / Conv1D layers .*Embedding layers: emb",
    "mlp-mica": "init_lora_weights",
    "mlp-kasa": "kasa_config",
    "mlp10-velora-random": "velora_config",
    "mlp11-velora-batch_average": "velora_config",
    "mlp12-velora-batch_average_once": "velora_config",
    "mlp-monteclora": "monteclora_config",
    "ia3-same-other-side": r"lin0 \(the other adapters scale its input, this one its output\)",
}


def _params(cases: list[Case]) -> list:
    return [pytest.param(case, id=case.id) for case in cases]


SUPPORTED = [case for case in CASES if case.id not in REFUSED]
# PEFT's training procedures (disable_adapters, only-params-updated, parameters after loading) run in
# fp32 only, as in PEFT; the bf16 / fp16 cases go through every other behaviour.
TRAINED = [case for case in SUPPORTED if case.dtype == torch.float32]


# -- helpers ---------------------------------------------------------------------------------------


def _config(case: Case, library, **overrides):
    cls = library.LoraConfig if case.method == "lora" else library.IA3Config
    return cls(**copy.deepcopy({**case.kwargs, **overrides}))


def peft_config(case: Case, **overrides):
    return _config(case, peft, **overrides)


def ours_config(case: Case, **overrides):
    return _config(case, peft_fast, **overrides)


def init_false(case: Case) -> dict:
    """PEFT's set_init_weights_false: adapters that are not the identity, so every comparison sees them."""
    return {"init_lora_weights": False} if case.method == "lora" else {"init_ia3_weights": False}


def ours_key(peft_name: str) -> str:
    """peft_fast's name for a PEFT parameter: no PEFT prefix, and modules_to_save trained in place."""
    return peft_name.removeprefix(PREFIX).replace(".modules_to_save.default.", ".")


def is_adapter(name: str) -> bool:
    return ".lora_" in name or ".ia3_l" in name or ".trainable_tokens_delta." in name


def peft_params(model) -> dict[str, torch.Tensor]:
    """PEFT's parameters under peft_fast's names (the frozen originals of modules_to_save left out)."""
    return {ours_key(n): p for n, p in model.named_parameters() if ".original_module." not in n}


def copy_adapter(theirs, ours: nn.Module) -> None:
    """Give peft_fast PEFT's adapter weights; both must hold the same adapter tensors (names and shapes)."""
    their_params, our_params = peft_params(theirs), dict(ours.named_parameters())
    theirs_adapter = {n for n in their_params if is_adapter(n)}
    ours_adapter = {n for n in our_params if is_adapter(n)}
    assert ours_adapter == theirs_adapter, (
        f"adapter tensors differ: only PEFT {sorted(theirs_adapter - ours_adapter)}, "
        f"only peft_fast {sorted(ours_adapter - theirs_adapter)}"
    )
    with torch.no_grad():
        for name in theirs_adapter:
            assert our_params[name].shape == their_params[name].shape, name
            our_params[name].copy_(their_params[name])


def pair(case: Case, **overrides):
    """(base, PEFT model, peft_fast model) on copies of one seeded model, peft_fast holding PEFT's adapter."""
    base = build(case.model_id, case.dtype)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(case, **overrides))
    ours = peft_fast.patch(copy.deepcopy(base), ours_config(case, **overrides))
    copy_adapter(theirs, ours)
    return base, theirs.eval(), ours.eval()


def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).detach().clone()


def disabled(model):
    return model.disable_adapter() if isinstance(model, peft.PeftModel) else peft_fast.disable_adapters(model)


def train(model: nn.Module, inputs: dict, optimizer_cls, lr: float, loss: str, steps: int = 3) -> None:
    """PEFT's training loops: ``loss="nll"`` (its disable tests) or ``"sum"`` (its parameter tests).

    Seeded per step, so PEFT and peft_fast draw the same masks for the base model's Dropout.
    """
    model.train()
    optimizer = optimizer_cls(model.parameters(), lr=lr)
    for step in range(steps):
        torch.manual_seed(step)
        optimizer.zero_grad()
        y_pred = model(**inputs)
        if loss == "sum":
            value = y_pred.sum()
        else:
            value = nn.functional.nll_loss(y_pred, torch.arange(len(y_pred)) % 2)
        value.backward()
        optimizer.step()
    model.eval()


def comparable_training(case: Case) -> bool:
    # LoRA dropout masks come from different generators (PEFT's nn.Dropout, peft_fast's seeded op), so
    # with lora_dropout > 0 two trainings cannot be compared number for number.
    return case.kwargs.get("lora_dropout", 0.0) == 0.0


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                   tol: float = FP32_TOL) -> None:  # fmt: skip
    """fp32: |a - e| <= tol + tol·|e| elementwise; bf16 / fp16: ||a - e|| / ||e|| <= 1e-2."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().float(), expected.detach().float()
    if dtype == torch.float32:
        err = (actual - expected).abs().max().item()
        assert torch.allclose(actual, expected, rtol=tol, atol=tol), f"{what}: max |difference| {err:.3g} (tol {tol})"
    else:
        rel = ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()
        assert rel <= LOW_PRECISION_TOL, f"{what}: relative norm error {rel:.3g} > {LOW_PRECISION_TOL}"


def assert_adapter_matters(with_adapter: torch.Tensor, without: torch.Tensor) -> None:
    """The adapter changes the output beyond every tolerance, so the comparisons can fail."""
    assert not torch.allclose(with_adapter.float(), without.float(), rtol=1e-3, atol=1e-3), "adapter is a no-op"


def as_ours_layout(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    # A GPT-2 Conv1D base weight is [in, out] in PEFT and [out, in] inside peft_fast's Linear.
    if tensor.shape != reference.shape and tensor.dim() == 2 and tensor.t().shape == reference.shape:
        return tensor.t()
    return tensor


def assert_same_parameters(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str) -> None:
    """Same names, and values within PEFT's 1e-4 (its test_parameters_after_loading_model)."""
    assert ours.keys() == theirs.keys(), (
        f"{what}: only peft_fast {sorted(ours.keys() - theirs.keys())}, only PEFT {sorted(theirs.keys() - ours.keys())}"
    )
    for name, value in ours.items():
        other = as_ours_layout(theirs[name], value)
        assert torch.allclose(value.float(), other.float(), rtol=TRAINED_TOL, atol=TRAINED_TOL), f"{what}: {name}"


def module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


# -- forward, trainable parameters, initialisation -------------------------------------------------


@pytest.mark.parametrize("case", _params(SUPPORTED))
def test_forward_matches_peft(case):
    base, theirs, ours = pair(case, **init_false(case))
    inputs = inputs_for(case.model_id)
    expected = run(theirs, inputs)
    assert_adapter_matters(expected, run(base, inputs))
    assert_matches(run(ours, inputs), expected, case.dtype, "output")


@pytest.mark.parametrize("case", _params(SUPPORTED))
def test_trainable_parameters_match_peft(case):
    _, theirs, ours = pair(case)
    theirs_trainable = {n for n, p in peft_params(theirs).items() if p.requires_grad}
    ours_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_trainable == theirs_trainable, (
        f"only PEFT trains {sorted(theirs_trainable - ours_trainable)}; "
        f"only peft_fast trains {sorted(ours_trainable - theirs_trainable)}"
    )
    assert peft_fast.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("case", _params(SUPPORTED))
def test_adapter_dtype_matches_peft(case):
    """PEFT's test_adapter_dtype_autocast: by default PEFT keeps adapter weights in fp32 over a bf16 / fp16 model."""
    _, theirs, ours = pair(case)
    theirs_dtypes = {n: p.dtype for n, p in peft_params(theirs).items() if is_adapter(n)}
    ours_dtypes = {n: p.dtype for n, p in ours.named_parameters() if is_adapter(n)}
    assert ours_dtypes == theirs_dtypes


@pytest.mark.parametrize("case", _params(SUPPORTED))
def test_initialisation_matches_peft(case):
    """Each adapter tensor starts as PEFT's does: zero / one where PEFT's is, else the same spread."""
    base = build(case.model_id, case.dtype)
    theirs = peft_params(peft.get_peft_model(copy.deepcopy(base), peft_config(case)))
    ours = dict(peft_fast.patch(copy.deepcopy(base), ours_config(case)).named_parameters())
    names = sorted(n for n in theirs if is_adapter(n))
    assert sorted(n for n in ours if is_adapter(n)) == names
    for name in names:
        mine, reference = ours[name].detach().float(), theirs[name].detach().float()
        for constant in (0.0, 1.0):
            assert bool((mine == constant).all()) == bool((reference == constant).all()), f"{name} == {constant}"
        if reference.numel() > 1 and reference.std() > 0:
            ratio = (mine.std() / reference.std()).item()
            assert 0.5 < ratio < 2.0, f"{name}: std {mine.std():.3g} vs PEFT's {reference.std():.3g}"


# -- merging ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _params(SUPPORTED))
def test_merge_matches_peft(case):
    """PEFT's _test_merge_layers: merged == unmerged == merge_and_unload; peft_fast.merge gives the same model."""
    base, theirs, ours = pair(case, **init_false(case))
    inputs = inputs_for(case.model_id)
    expected = run(theirs, inputs)
    theirs.merge_adapter()
    assert_matches(run(theirs, inputs), expected, case.dtype, "PEFT merged (reference)", TRAINED_TOL)
    theirs.unmerge_adapter()
    unloaded = theirs.merge_and_unload()
    their_merged = run(unloaded, inputs)

    unmerged = run(ours, inputs)
    merged = peft_fast.merge(ours)
    assert merged is ours
    ours_merged = run(merged, inputs)
    assert_matches(unmerged, expected, case.dtype, "unmerged output")
    assert_matches(ours_merged, unmerged, case.dtype, "merged vs unmerged", TRAINED_TOL)
    assert_matches(ours_merged, their_merged, case.dtype, "merged vs PEFT merge_and_unload", TRAINED_TOL)
    # The base architecture again (Conv1D included), holding PEFT's merged weights in the base's dtype.
    assert module_types(merged) == module_types(base)
    ours_state, their_state = merged.state_dict(), unloaded.state_dict()
    assert ours_state.keys() == their_state.keys()
    for key, value in their_state.items():
        assert ours_state[key].dtype == base.state_dict()[key].dtype, key
        assert_matches(ours_state[key], value, case.dtype, f"merged {key}", TRAINED_TOL)


# -- disabling adapters (PEFT's procedure: train, then disabled == before training) -------------------


def _trained_outputs(model, inputs: dict, optimizer_cls, lr: float, merge: bool) -> dict[str, torch.Tensor]:
    out = {"before": run(model, inputs)}
    train(model, inputs, optimizer_cls, lr, "nll")
    out["after"] = run(model, inputs)
    with disabled(model):
        out["disabled"] = run(model, inputs)
    out["enabled"] = run(model, inputs)
    if merge:  # peft_fast's merge replaces the layers: disabled / enabled are read before it
        if isinstance(model, peft.PeftModel):
            model.merge_adapter()
        else:
            model = peft_fast.merge(model)
        out["merged"] = run(model, inputs)
    return out


def _disable_lr(case: Case) -> float:
    return 1.0 if case.model_id == "EmbConv1D" else 0.01  # PEFT's: EmbConv1D is slow to learn


def _identity_at_init(case: Case) -> bool:
    # init_lora_weights / init_ia3_weights False start from random adapters, so disabled == the base model
    # there (PEFT's test_disable_adapters assumes its cases' identity init).
    return all(case.kwargs.get(key, True) is not False for key in ("init_lora_weights", "init_ia3_weights"))


def _keeps_base(case: Case) -> bool:
    # With bias="all" / "lora_only" the trained biases stay when adapters are disabled (PEFT warns about
    # it), so "disabled == before training" is not PEFT's behaviour there: those compare with PEFT instead.
    # PiSSA / OLoRA make the base the residual W - s·B·A: disabled gives the residual's output, in PEFT
    # too (compared with PEFT instead).
    return case.kwargs.get("bias", "none") == "none" and case.kwargs.get("init_lora_weights") not in ("pissa", "olora")


@pytest.mark.parametrize("case", _params(TRAINED))
def test_disable_adapters_matches_peft(case):
    """PEFT's test_disable_adapters: 3 SGD steps, then disabled == before training, enabled == after."""
    base, theirs, ours = pair(case)  # the case's own init, as PEFT's test uses it
    inputs = inputs_for(case.model_id)
    lr = _disable_lr(case)
    theirs_out = _trained_outputs(theirs, inputs, torch.optim.SGD, lr, merge=False)
    out = _trained_outputs(ours, inputs, torch.optim.SGD, lr, merge=False)

    base_out = run(base, inputs)
    assert not torch.allclose(out["before"], out["after"], rtol=1e-8, atol=1e-8), "training changed nothing"
    if _identity_at_init(case):
        assert torch.allclose(base_out, out["before"])
    if _keeps_base(case):  # PEFT's: disabled == before training (== the base model, for an identity init)
        expected = out["before"] if _identity_at_init(case) else base_out
        assert torch.allclose(expected, out["disabled"]), "disabled output differs from before training"
    assert torch.allclose(out["after"], out["enabled"]), "adapters not enabled again after the context"
    if comparable_training(case):
        for key in ("after", "disabled"):
            assert_matches(out[key], theirs_out[key], case.dtype, f"{key} vs PEFT", TRAINED_TOL)


@pytest.mark.parametrize("case", _params(TRAINED))
def test_disable_adapters_with_merging_matches_peft(case):
    """PEFT's test_disable_adapters_with_merging: 3 Adam steps; merged == unmerged, disabled == before."""
    base, theirs, ours = pair(case)
    inputs = inputs_for(case.model_id)
    theirs_out = _trained_outputs(theirs, inputs, torch.optim.Adam, 0.01, merge=True)
    out = _trained_outputs(ours, inputs, torch.optim.Adam, 0.01, merge=True)

    tol = dict(atol=1e-5, rtol=1e-5)  # PEFT's: merging adds some rounding
    assert not torch.allclose(out["before"], out["merged"], **tol), "training changed nothing"
    assert torch.allclose(out["merged"], out["after"], **tol), "merged output differs from unmerged"
    if _keeps_base(case):
        expected = out["before"] if _identity_at_init(case) else run(base, inputs)
        assert torch.allclose(expected, out["disabled"], **tol), "disabled output differs from before training"
    if comparable_training(case):
        for key in ("merged", "disabled"):
            assert_matches(out[key], theirs_out[key], case.dtype, f"{key} vs PEFT", TRAINED_TOL)


# -- training updates only the adapter ---------------------------------------------------------------


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in before.items() if not torch.allclose(p, after[n], atol=1e-4, rtol=1e-4)}


@pytest.mark.parametrize("case", _params(TRAINED))
def test_only_adapter_parameters_are_updated(case):
    """PEFT's test_only_params_are_updated (3 SGD steps, lr 0.5): peft_fast updates the parameters PEFT does."""
    _, theirs, ours = pair(case)
    inputs = inputs_for(case.model_id)
    theirs_before = {n: p.detach().clone() for n, p in peft_params(theirs).items()}
    ours_before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    train(theirs, inputs, torch.optim.SGD, 0.5, "sum")
    train(ours, inputs, torch.optim.SGD, 0.5, "sum")
    theirs_changed = _changed(theirs_before, peft_params(theirs))
    ours_changed = _changed(ours_before, dict(ours.named_parameters()))
    assert ours_changed == theirs_changed, (
        f"only PEFT updated {sorted(theirs_changed - ours_changed)}; "
        f"only peft_fast updated {sorted(ours_changed - theirs_changed)}"
    )
    for name, param in ours.named_parameters():  # PEFT's assertion: trainable ones move, the rest do not
        assert (name in ours_changed) == param.requires_grad, name


# -- adapter files both ways, their contents, the parameters after loading ---------------------------


def _file_overrides(case: Case) -> dict:
    # fp32: default init, then trained (below), as PEFT's test_parameters_after_loading_model does, so the
    # files carry trained biases and modules_to_save too. bf16 / fp16 (PEFT trains in fp32 only): not
    # trained, init_lora_weights / init_ia3_weights False instead, so the adapter is not the identity.
    return {} if case.dtype == torch.float32 else init_false(case)


def _train_for_files(case: Case, model: nn.Module) -> None:
    # The loop of PEFT's test_disable_adapters: test_parameters_after_loading_model's (SGD lr 0.5 on the
    # summed log-probabilities) drives these models' weights to 1e20 in 3 steps and their outputs to
    # NaN, which would compare nothing.
    if case.dtype == torch.float32:
        train(model, inputs_for(case.model_id), torch.optim.SGD, _disable_lr(case), "nll")


@pytest.mark.parametrize("case", _params(SUPPORTED))
def test_peft_adapter_loads_into_peft_fast(case, tmp_path):
    base = build(case.model_id, case.dtype)
    inputs = inputs_for(case.model_id)
    # PEFT alone makes the file: this door must not depend on peft_fast accepting the config.
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(case, **_file_overrides(case)))
    _train_for_files(case, theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)

    ours = peft_fast.load_adapter(copy.deepcopy(base), tmp_path)
    assert_matches(run(ours, inputs), run(theirs, inputs), case.dtype, "output after load_adapter")
    assert_same_parameters(dict(ours.named_parameters()), peft_params(theirs), "parameters after loading")


@pytest.mark.parametrize("case", _params(SUPPORTED))
def test_peft_fast_adapter_loads_into_peft(case, tmp_path):
    base = build(case.model_id, case.dtype)
    inputs = inputs_for(case.model_id)
    ours = peft_fast.patch(copy.deepcopy(base), ours_config(case, **_file_overrides(case)))
    _train_for_files(case, ours)
    peft_fast.save_adapter(ours, tmp_path)

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert_matches(run(theirs, inputs), run(ours, inputs), case.dtype, "output after PeftModel.from_pretrained")
    assert_same_parameters(dict(ours.named_parameters()), peft_params(theirs), "parameters after loading")


@pytest.mark.parametrize("case", _params(SUPPORTED))
def test_peft_fast_round_trip_keeps_parameters(case, tmp_path):
    """PEFT's test_parameters_after_loading_model on peft_fast alone: trained, saved, loaded: same state dict."""
    base = build(case.model_id, case.dtype)
    inputs = inputs_for(case.model_id)
    ours = peft_fast.patch(copy.deepcopy(base), ours_config(case, **_file_overrides(case)))
    _train_for_files(case, ours)
    peft_fast.save_adapter(ours, tmp_path)
    loaded = peft_fast.load_adapter(copy.deepcopy(base), tmp_path)
    assert_same_parameters(state_of(loaded), state_of(ours), "state dict after loading")
    assert torch.equal(run(loaded, inputs), run(ours, inputs))


# PEFT's bias="all" also saves the biases inside its modules_to_save wrappers; nothing reads them back.
_PEFT_WRAPPER_KEYS = (".modules_to_save.", ".original_module.")
_CONFIG_KEYS = {
    "lora": ("peft_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "target_modules",
             "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern", "rank_pattern",
             "alpha_pattern", "fan_in_fan_out", "init_lora_weights", "task_type"),
    "ia3": ("peft_type", "target_modules", "feedforward_modules", "exclude_modules", "fan_in_fan_out",
            "init_ia3_weights", "task_type"),
}  # fmt: skip


def _normalised(key: str, value):
    if key == "layers_to_transform" and isinstance(value, int):
        return [value]  # PEFT keeps an int as given, peft_fast writes [int]: the same layers
    return sorted(value) if isinstance(value, (list, tuple, set)) else value


@pytest.mark.parametrize("case", _params(SUPPORTED))
def test_adapter_files_match_peft(case, tmp_path):
    """Same tensors under the same keys, and the same adapter_config.json entries, as PEFT writes."""
    import json

    _, theirs, ours = pair(case, **init_false(case))
    theirs.save_pretrained(tmp_path / "peft")
    peft_fast.save_adapter(ours, tmp_path / "ours")
    their_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    extra = sorted(k for k in set(their_tensors) - set(our_tensors) if not any(w in k for w in _PEFT_WRAPPER_KEYS))
    assert not extra, f"PEFT's file has {extra}, peft_fast's does not"
    assert set(our_tensors) <= set(their_tensors), f"only in peft_fast's file: {set(our_tensors) - set(their_tensors)}"
    for key, value in our_tensors.items():
        assert_matches(value, their_tensors[key], case.dtype, key)

    their_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    differ = {
        key: (our_config.get(key), their_config.get(key))
        for key in _CONFIG_KEYS[case.method]
        if _normalised(key, our_config.get(key)) != _normalised(key, their_config.get(key))
    }
    assert not differ, f"adapter_config.json (peft_fast, PEFT): {differ}"


# -- unload / unpatch --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _params(SUPPORTED))
def test_unpatch_matches_peft_unload(case):
    base, theirs, ours = pair(case, **init_false(case))
    inputs = inputs_for(case.model_id)
    base_out = run(base, inputs)
    assert_adapter_matters(run(ours, inputs), base_out)
    their_out = run(theirs.unload(), inputs)

    assert peft_fast.unpatch(ours) is ours
    assert module_types(ours) == module_types(base)
    ours_state, base_state = ours.state_dict(), base.state_dict()
    assert ours_state.keys() == base_state.keys()
    for key, value in base_state.items():
        assert torch.equal(ours_state[key], value), key
    assert torch.equal(run(ours, inputs), base_out)
    assert_matches(run(ours, inputs), their_out, case.dtype, "output vs PEFT's unload")


# -- several adapters (PEFT's MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, on its MLP) ------------------------


@dataclass(frozen=True)
class MultiCase:
    id: str
    method: str
    first: dict
    second: dict

    def case(self, kwargs: dict) -> Case:
        return Case(self.id, "MLP", self.method, {**kwargs, **init_false(Case(self.id, "MLP", self.method))})


MULTI_CASES = [
    MultiCase("lora-same", "lora", {"target_modules": ["lin0"]}, {"target_modules": ["lin0"]}),
    MultiCase("lora-different", "lora", {"target_modules": ["lin0"]}, {"target_modules": ["lin1"]}),
    MultiCase("lora-same-other-rank", "lora", {"target_modules": ["lin0", "lin1"]},
              {"target_modules": ["lin0"], "r": 2, "lora_alpha": 16}),
    MultiCase("ia3-same", "ia3", {"target_modules": ["lin0"], "feedforward_modules": ["lin0"]},
              {"target_modules": ["lin0"], "feedforward_modules": ["lin0"]}),
    MultiCase("ia3-different", "ia3", {"target_modules": ["lin0"], "feedforward_modules": ["lin0"]},
              {"target_modules": ["lin1"], "feedforward_modules": ["lin1"]}),
    MultiCase("ia3-same-other-side", "ia3", {"target_modules": ["lin0"], "feedforward_modules": ["lin0"]},
              {"target_modules": ["lin0"], "feedforward_modules": []}),
]  # fmt: skip
MULTI_SUPPORTED = [pytest.param(c, id=c.id) for c in MULTI_CASES if c.id not in REFUSED]
ACTIVE_SETS = (["default"], ["other"], ["default", "other"])


def multi_pair(multi: MultiCase):
    """(base, PEFT model, peft_fast model), each with adapters "default" and "other", PEFT's weights in both."""
    first, second = multi.case(multi.first), multi.case(multi.second)
    base = build("MLP")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(first))
    theirs.add_adapter("other", peft_config(second))
    ours = peft_fast.patch(copy.deepcopy(base), ours_config(first))
    peft_fast.add_adapter(ours, ours_config(second), "other")
    copy_adapter(theirs, ours)
    return base, theirs.eval(), ours.eval()


def set_active(theirs, ours, active: list[str]) -> None:
    theirs.base_model.set_adapter(active)  # PeftModel.set_adapter takes one name; its base model takes several
    peft_fast.set_adapter(ours, active)


@pytest.mark.parametrize("multi", MULTI_SUPPORTED)
def test_multiple_adapters_forward_matches_peft(multi):
    """PEFT's test_multiple_active_adapters_forward: each adapter and both at once, as PEFT computes them."""
    base, theirs, ours = multi_pair(multi)
    inputs = inputs_for("MLP")
    outputs = []
    for active in ACTIVE_SETS:
        set_active(theirs, ours, active)
        outputs.append(run(ours, inputs))
        assert_matches(outputs[-1], run(theirs, inputs), torch.float32, f"output with {active} active")
        theirs_trainable = {n for n, p in peft_params(theirs).items() if p.requires_grad}
        assert {n for n, p in ours.named_parameters() if p.requires_grad} == theirs_trainable, active
    for i, j in ((0, 1), (0, 2), (1, 2)):  # PEFT's assertion: the three outputs differ
        assert_adapter_matters(outputs[i], outputs[j])
    with peft_fast.disable_adapters(ours):
        assert torch.equal(run(ours, inputs), run(base, inputs))


@pytest.mark.parametrize("multi", MULTI_SUPPORTED)
def test_multiple_adapters_merge_matches_peft(multi):
    """PEFT's test_multiple_active_adapters_merge_and_unmerge: merging both == both active."""
    _, theirs, ours = multi_pair(multi)
    inputs = inputs_for("MLP")
    set_active(theirs, ours, ["default", "other"])
    both = run(ours, inputs)
    their_merged = run(theirs.merge_and_unload(), inputs)
    merged = run(peft_fast.merge(ours), inputs)
    assert_matches(merged, both, torch.float32, "merged vs both active", TRAINED_TOL)
    assert_matches(merged, their_merged, torch.float32, "merged vs PEFT merge_and_unload", TRAINED_TOL)


@pytest.mark.parametrize("multi", MULTI_SUPPORTED)
def test_multiple_adapters_files_both_ways(multi, tmp_path):
    base, theirs, ours = multi_pair(multi)
    inputs = inputs_for("MLP")
    set_active(theirs, ours, ["default", "other"])
    expected = run(theirs, inputs)

    theirs.save_pretrained(tmp_path / "peft")  # "default" in the directory, "other" in its subdirectory
    loaded = peft_fast.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    peft_fast.load_adapter(loaded, tmp_path / "peft" / "other", "other")
    peft_fast.set_adapter(loaded, ["default", "other"])
    assert_matches(run(loaded, inputs), expected, torch.float32, "PEFT's two adapters loaded by peft_fast")

    for name in ("default", "other"):
        peft_fast.save_adapter(ours, tmp_path / "ours" / name, name)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours" / "default")
    reloaded.load_adapter(tmp_path / "ours" / "other", adapter_name="other")
    reloaded.base_model.set_adapter(["default", "other"])
    assert_matches(run(reloaded, inputs), expected, torch.float32, "peft_fast's two adapters loaded by PEFT")


# -- what peft_fast refuses -------------------------------------------------------------------------


def _assert_untouched(model: nn.Module, types: dict, state: dict) -> None:
    assert module_types(model) == types, "a refused call changed the model's modules"
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


@pytest.mark.parametrize("case", _params([c for c in CASES if c.id in REFUSED]))
def test_refused_case(case, tmp_path):
    """PEFT runs the case; peft_fast refuses it at patch and at load_adapter, naming the feature, model untouched."""
    base = build(case.model_id, case.dtype)
    inputs = inputs_for(case.model_id)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(case))
    assert torch.isfinite(run(theirs, inputs)).all()  # a real PEFT case, not one PEFT rejects
    theirs.save_pretrained(tmp_path)

    model = copy.deepcopy(base)
    types, state = module_types(model), state_of(model)
    with pytest.raises((ValueError, TypeError), match=REFUSED[case.id]):
        peft_fast.patch(model, ours_config(case))
    _assert_untouched(model, types, state)
    with pytest.raises((ValueError, TypeError), match=REFUSED[case.id]):
        peft_fast.load_adapter(model, tmp_path)
    _assert_untouched(model, types, state)


@pytest.mark.parametrize("multi", [pytest.param(c, id=c.id) for c in MULTI_CASES if c.id in REFUSED])
def test_refused_multiple_adapters(multi, tmp_path):
    first, second = multi.case(multi.first), multi.case(multi.second)
    base = build("MLP")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(first))
    theirs.add_adapter("other", peft_config(second))  # PEFT takes the second adapter
    theirs.save_pretrained(tmp_path)

    ours = peft_fast.patch(copy.deepcopy(base), ours_config(first))
    types, state = module_types(ours), state_of(ours)
    with pytest.raises((ValueError, TypeError), match=REFUSED[multi.id]):
        peft_fast.add_adapter(ours, ours_config(second), "other")
    _assert_untouched(ours, types, state)
    with pytest.raises((ValueError, TypeError), match=REFUSED[multi.id]):
        peft_fast.load_adapter(ours, tmp_path / "other", "other")
    _assert_untouched(ours, types, state)


# -- NF4: peft_fast's QLoRA / (IA)³ over NF4 against PEFT over bitsandbytes' Linear4bit ----------------


@dataclass(frozen=True)
class NF4Case:
    id: str
    method: str
    kwargs: dict
    double_quant: bool = True

    def case(self) -> Case:
        return Case(self.id, "MLPWide", self.method, self.kwargs)


NF4_CASES = [
    NF4Case("lora-nf4-dq", "lora", {"target_modules": ["lin0", "lin1"]}),
    NF4Case("lora-nf4-no_dq", "lora", {"target_modules": ["lin0", "lin1"]}, double_quant=False),
    NF4Case("lora-nf4-lin0-r4-alpha16", "lora", {"target_modules": ["lin0"], "r": 4, "lora_alpha": 16}),
    NF4Case("ia3-nf4-dq", "ia3", {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"]}),
]
NF4_PARAMS = [pytest.param(c, id=c.id) for c in NF4_CASES]


def bitsandbytes_model(model: nn.Module, double_quant: bool) -> nn.Module:
    """Every nn.Linear as bitsandbytes' NF4 Linear4bit (fp32 compute, blocksize 64), as transformers loads it."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            quant = dict(compress_statistics=double_quant, quant_type="nf4")
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.float32, **quant)  # fmt: skip
            layer.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, blocksize=64, **quant)
            layer.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
            setattr(model, name, layer.to("cpu"))  # quantizes the weight
    return model


def nf4_pair(nf4: NF4Case, **overrides):
    """(base, PEFT on bitsandbytes, peft_fast with quantize="nf4"), same adapter, both in train mode."""
    case = nf4.case()
    base = build("MLPWide")
    theirs = peft.get_peft_model(bitsandbytes_model(copy.deepcopy(base), nf4.double_quant),
                                 peft_config(case, **overrides))  # fmt: skip
    ours = peft_fast.patch(copy.deepcopy(base),
                           ours_config(case, quantize="nf4", double_quant=nf4.double_quant, **overrides))  # fmt: skip
    copy_adapter(theirs, ours)
    return base, theirs.train(), ours.train()


def run_nf4(model: nn.Module, inputs: dict) -> torch.Tensor:
    # Train mode with autograd on: bitsandbytes' CPU Linear4bit computes in fp32 then (see MLPWide).
    return model(**inputs).detach().clone()


@pytest.mark.parametrize("nf4", NF4_PARAMS)
def test_nf4_forward_matches_peft_bitsandbytes(nf4):
    _, theirs, ours = nf4_pair(nf4, **init_false(nf4.case()))
    inputs = inputs_for("MLPWide")
    with disabled(theirs):
        their_base = run_nf4(theirs, inputs)
    with disabled(ours):
        assert_matches(run_nf4(ours, inputs), their_base, torch.float32, "NF4 base output", NF4_TOL)
    expected = run_nf4(theirs, inputs)
    assert_adapter_matters(expected, their_base)
    assert_matches(run_nf4(ours, inputs), expected, torch.float32, "NF4 + adapter output", NF4_TOL)
    assert peft_fast.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("nf4", NF4_PARAMS)
def test_nf4_merge_matches_unmerged(nf4):
    """peft_fast.merge dequantizes and folds the adapter: PEFT's unmerged output, a plain fp32 model back.

    (PEFT's merge over 4-bit re-quantizes the merged weight, so its merged output is not the reference.)
    """
    base, theirs, ours = nf4_pair(nf4, **init_false(nf4.case()))
    inputs = inputs_for("MLPWide")
    expected = run_nf4(theirs, inputs)
    merged = peft_fast.merge(ours)
    assert_matches(run(merged, inputs), expected, torch.float32, "merged NF4 output", NF4_TOL)
    assert module_types(merged) == module_types(base)
    assert {k: v.dtype for k, v in merged.state_dict().items()} == {k: v.dtype for k, v in base.state_dict().items()}


@pytest.mark.parametrize("nf4", NF4_PARAMS)
def test_nf4_disable_adapters_after_training(nf4):
    """PEFT's disable procedure over NF4: 3 SGD steps, disabled == before; the same numbers as PEFT + bitsandbytes."""
    _, theirs, ours = nf4_pair(nf4)
    inputs = inputs_for("MLPWide")
    outputs = {}
    for label, model in (("peft", theirs), ("ours", ours)):
        before = run_nf4(model, inputs)
        train(model, inputs, torch.optim.SGD, 0.01, "nll")
        model.train()  # train() ends in eval mode; see run_nf4
        after = run_nf4(model, inputs)
        with disabled(model):
            outputs[label] = {"before": before, "after": after, "disabled": run_nf4(model, inputs)}
    out, theirs_out = outputs["ours"], outputs["peft"]
    assert not torch.allclose(out["before"], out["after"], rtol=1e-8, atol=1e-8), "training changed nothing"
    assert torch.allclose(out["before"], out["disabled"]), "disabled output differs from before training"
    for key in ("after", "disabled"):
        assert_matches(out[key], theirs_out[key], torch.float32, f"{key} vs PEFT", NF4_TOL)


@pytest.mark.parametrize("nf4", NF4_PARAMS)
def test_nf4_adapter_files_both_ways(nf4, tmp_path):
    base, theirs, ours = nf4_pair(nf4, **init_false(nf4.case()))
    inputs = inputs_for("MLPWide")
    expected = run_nf4(theirs, inputs)
    theirs.save_pretrained(tmp_path / "peft")
    peft_fast.save_adapter(ours, tmp_path / "ours")

    # PEFT's QLoRA file onto our NF4 model (the same base quantized the same way), and ours onto bitsandbytes.
    quantized = peft_fast.quantize_model(copy.deepcopy(base), double_quant=nf4.double_quant, progress=False)
    loaded = peft_fast.load_adapter(quantized, tmp_path / "peft").train()
    assert_matches(run_nf4(loaded, inputs), expected, torch.float32, "PEFT's file in peft_fast", NF4_TOL)
    reloaded = peft.PeftModel.from_pretrained(bitsandbytes_model(copy.deepcopy(base), nf4.double_quant),
                                              tmp_path / "ours").train()  # fmt: skip
    assert_matches(run_nf4(reloaded, inputs), run_nf4(ours, inputs), torch.float32, "peft_fast's file in PEFT", NF4_TOL)


@pytest.mark.parametrize("nf4", NF4_PARAMS)
def test_nf4_unpatch_keeps_nf4_base(nf4):
    _, _, ours = nf4_pair(nf4, **init_false(nf4.case()))
    inputs = inputs_for("MLPWide")
    with disabled(ours):
        base_out = run_nf4(ours, inputs)
    peft_fast.unpatch(ours)
    assert {type(ours.lin0), type(ours.lin1)} == {peft_fast.NF4Linear}
    assert torch.equal(run_nf4(ours, inputs), base_out)


def test_case_ids_are_unique_and_refused_ids_exist():
    ids = [c.id for c in CASES] + [c.id for c in MULTI_CASES]
    assert len(ids) == len(set(ids))
    assert set(REFUSED) <= set(ids), sorted(set(REFUSED) - set(ids))
