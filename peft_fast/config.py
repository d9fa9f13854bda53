"""Configuration dataclasses with Hugging Face PEFT's field names, and adapter_config.json I/O."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch

__all__ = ["LoraConfig", "check_adapter_name", "pattern_value"]

PEFT_VERSION = "0.21.2"  # the PEFT release whose adapter_config.json layout we write

# Every key PEFT 0.21 writes for a LoRA adapter, with its default: we write them all so PEFT and
# tools that read its configs (vLLM, TGI) see a familiar file.
_PEFT_LORA_DEFAULTS: dict[str, Any] = {
    "task_type": None, "peft_type": "LORA", "auto_mapping": None, "peft_version": PEFT_VERSION,
    "base_model_name_or_path": None, "revision": None, "inference_mode": True, "r": 8,
    "target_modules": None, "exclude_modules": None, "lora_alpha": 8, "lora_dropout": 0.0,
    "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "modules_to_save": None,
    "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
    "alpha_pattern": {}, "megatron_config": None, "megatron_core": "megatron.core",
    "trainable_token_indices": None, "loftq_config": {}, "eva_config": None, "corda_config": None,
    "lora_ga_config": None, "use_dora": False, "velora_config": None, "alora_invocation_tokens": None,
    "use_qalora": False, "qalora_group_size": 16, "monteclora_config": None, "layer_replication": None,
    "lora_bias": False, "target_parameters": None, "use_bdlora": None, "arrow_config": None,
    "kasa_config": None, "ensure_weight_tying": False,
}  # fmt: skip
# PEFT features that change the math; an adapter that uses one cannot load here.
_UNSUPPORTED_WHEN_SET = ("layer_replication", "use_qalora", "alora_invocation_tokens",
                         "arrow_config")  # fmt: skip


# -- argument checks shared by the configs -------------------------------------------------------

# What init_lora_weights may be: PEFT's random inits, and those that start from the base weight
# (peft_fast.lora.init: PiSSA, its fast-SVD form "pissa_niter_<n>", OLoRA, LoftQ).
LORA_INITS = (True, False, "gaussian", "pissa", "olora", "loftq")


def _check_init_lora_weights(config) -> None:
    init = config.init_lora_weights
    niter = isinstance(init, str) and init.startswith("pissa_niter_")
    if niter and not (init.removeprefix("pissa_niter_").isdigit() and int(init.removeprefix("pissa_niter_")) > 0):
        raise ValueError(f"init_lora_weights {init!r}: 'pissa_niter_<n>' needs a positive number of iterations n")
    if not niter and ((isinstance(init, (int, float)) and not isinstance(init, bool)) or init not in LORA_INITS):
        raise ValueError(
            f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora' or 'loftq', "
            f"got {init!r}"
        )
    if not isinstance(config.loftq_config, dict):
        config.loftq_config = dict(vars(config.loftq_config))  # a peft.LoftQConfig, as PEFT converts it
    if init != "loftq":
        config.loftq_config = {}  # PEFT drops it (with a warning) unless init_lora_weights is 'loftq'
        return
    if not config.loftq_config:
        raise ValueError("init_lora_weights='loftq' needs loftq_config, e.g. {'loftq_bits': 4, 'loftq_iter': 1}")
    unknown = sorted(set(config.loftq_config) - {"loftq_bits", "loftq_iter"})
    if unknown:
        raise ValueError(f"loftq_config has unknown keys {unknown}; it takes loftq_bits and loftq_iter")
    if config.loftq_config.get("loftq_bits", 4) != 4:
        raise ValueError(
            f"loftq_config loftq_bits={config.loftq_config['loftq_bits']!r}: peft_fast's LoftQ quantizes to NF4 "
            "(4 bits) only"
        )
    iterations = config.loftq_config.get("loftq_iter", 1)
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"loftq_config loftq_iter must be a positive integer, got {iterations!r}")


def _is_index(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_token_indices(config) -> None:
    """``trainable_token_indices``: None, a list of row indices (the input embedding's), or {module name: list}.

    Each list must be non-empty and hold non-negative integers (PEFT fails deep inside torch on an empty
    list, floats or negative indices); duplicates are kept, as PEFT keeps them. Ranges are checked at patch.
    """
    value = config.trainable_token_indices
    if value is None:
        return
    lists = value if isinstance(value, dict) else {"the input embedding": value}
    if isinstance(value, dict) and (not value or not all(isinstance(k, str) and k for k in value)):
        raise TypeError(f"trainable_token_indices as a dict must map module names to index lists, got {value!r}")
    for name, indices in lists.items():
        if isinstance(indices, tuple):
            indices = list(indices)
        if not isinstance(indices, list) or not indices or not all(_is_index(i) and i >= 0 for i in indices):
            raise ValueError(
                f"trainable_token_indices for {name} must be a non-empty list of non-negative integer token "
                f"indices, got {indices!r}"
            )
    if isinstance(value, dict):
        config.trainable_token_indices = {k: [int(i) for i in v] for k, v in value.items()}
    else:
        config.trainable_token_indices = [int(i) for i in value]


def _is_real(value: Any) -> bool:
    """A real number that is not a bool (True would otherwise pass as 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_finite(name: str, value: Any) -> float:
    """``value`` as a float; a ValueError naming ``name`` for NaN, Inf, bools and non-numbers."""
    if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_probability(name: str, value: Any) -> None:
    """A dropout probability: a number in [0, 1) (NaN fails the comparison)."""
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """True or False only: a string such as "no" would otherwise count as True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_names(name: str, value: Any, allow_regex: bool) -> None:
    """None, a list of module names, or (where PEFT allows one) a regex string."""
    if value is None or (allow_regex and isinstance(value, str)):
        return
    if isinstance(value, str):
        raise TypeError(f"{name} must be a list of module names, got the string {value!r} (write [{value!r}])")
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        expected = "a list of module names" + (" or a regex string" if allow_regex else "")
        raise TypeError(f"{name} must be {expected}, got {value!r}")


def _check_nf4_storage(config: Any) -> None:
    """``quantize`` / ``blocksize`` / ``double_quant``, checked when the config is made, not at patch time."""
    from peft_fast.nf4 import check_blocksize

    if config.quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {config.quantize!r}")
    check_blocksize(config.blocksize)
    check_bool("double_quant", config.double_quant)


def check_adapter_name(adapter_name: Any) -> None:
    """Adapter names become module / parameter keys: a non-empty string without dots."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


# The heads PEFT adds to modules_to_save for a task type (PeftModelForSequenceClassification & co.),
# so that they train and are saved; the model has one of them.
TASK_MODULES_TO_SAVE: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _check_target_parameters(config: LoraConfig) -> None:
    """``target_parameters``: a list of parameter names; the options PEFT's ParamWrapper refuses, refused here too."""
    value = config.target_parameters
    if value is None:
        return
    if isinstance(value, (set, tuple)):
        value = config.target_parameters = sorted(value)
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise TypeError(f"target_parameters must be a list of parameter names (e.g. ['experts.gate_up_proj']), "
                        f"got {value!r}")  # fmt: skip
    if not value:
        return
    # PEFT 0.21's ParamWrapper raises for each of these at get_peft_model.
    refused = {"lora_dropout": config.lora_dropout != 0, "fan_in_fan_out": config.fan_in_fan_out,
               "lora_bias": config.lora_bias, "use_dora": config.use_dora}  # fmt: skip
    for key, is_set in refused.items():
        if is_set:
            raise ValueError(f"target_parameters does not work with {key}={getattr(config, key)!r} (as in PEFT)")
    # Ours: PiSSA / OLoRA / LoftQ read a Linear's weight, and bias / modules_to_save around a wrapped
    # parameter's module are not laid out here yet.
    if config.init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(
            f"target_parameters with init_lora_weights={config.init_lora_weights!r} is not supported by peft_fast "
            "(True, False or 'gaussian')"
        )
    if config.bias != "none":
        raise ValueError(f"target_parameters with bias={config.bias!r} is not supported by peft_fast (bias='none')")


@dataclass
class LoraConfig:
    """LoRA / QLoRA settings; field names and meanings are Hugging Face PEFT's.

    Ours, beyond PEFT's: ``quantize`` (None or ``"nf4"``: QLoRA, every Linear except the output
    head is stored in NF4), ``double_quant``, ``blocksize`` and ``compute_dtype`` (the dtype the
    adapter weights and activations use; default: the model's dtype).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    loftq_config: dict = field(default_factory=dict)
    lora_bias: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: list[str] | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    quantize: str | None = None
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: torch.dtype | None = None

    peft_type: ClassVar[str] = "LORA"

    def __post_init__(self) -> None:
        check_positive_int("r", self.r)
        check_finite("lora_alpha", self.lora_alpha)
        check_probability("lora_dropout", self.lora_dropout)
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        _check_init_lora_weights(self)
        check_bool("use_rslora", self.use_rslora)
        check_bool("use_dora", self.use_dora)
        check_bool("lora_bias", self.lora_bias)
        # PEFT 0.21's own rules for lora_bias (B gets a bias, trained, scaled like B·A).
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ValueError(
                f"lora_bias=True is only supported with init_lora_weights=True or False, got "
                f"init_lora_weights={self.init_lora_weights!r}"
            )
        if self.lora_bias and self.use_dora:
            raise ValueError("lora_bias=True is not supported for DoRA: pass use_dora=False")
        _check_nf4_storage(self)
        _check_token_indices(self)
        if self.target_modules is None and not self.target_parameters:
            raise ValueError(
                "target_modules is required (a list of names, a regex, or 'all-linear'), or target_parameters"
            )
        _check_target_parameters(self)
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                _check_names(name, list(value), allow_regex=False)
                setattr(self, name, sorted(value))
            _check_names(name, getattr(self, name), allow_regex=name != "modules_to_save")
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None and (
            not isinstance(self.layers_to_transform, (list, tuple))
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers_to_transform)
        ):
            raise TypeError(
                f"layers_to_transform must be a layer index or a list of them, got {self.layers_to_transform!r}"
            )
        if self.layers_pattern is not None and not isinstance(self.layers_pattern, str):
            _check_names("layers_pattern", self.layers_pattern, allow_regex=False)
        # PEFT 0.21's own checks (peft.LoraConfig.__post_init__ raises for the same combinations).
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "layers_to_transform cannot be used when target_modules is a str (a regex or 'all-linear')"
            )
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("layers_pattern cannot be used when target_modules is a str (a regex or 'all-linear')")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("when layers_pattern is given, layers_to_transform must be given too")
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if value is None:  # an adapter_config.json may hold null: no pattern
                setattr(self, name, {})
            elif not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
                raise TypeError(
                    f"{name} must be a dict of module-name pattern -> {'rank' if name == 'rank_pattern' else 'alpha'}"
                    f" (e.g. {{'q_proj': 16}}), got {value!r}"
                )
        for name, value in self.rank_pattern.items():
            check_positive_int(f"rank_pattern[{name!r}]", value)
        for name, value in self.alpha_pattern.items():
            check_finite(f"alpha_pattern[{name!r}]", value)
        if isinstance(self.compute_dtype, str):
            self.compute_dtype = getattr(torch, self.compute_dtype.removeprefix("torch."), self.compute_dtype)
        if self.compute_dtype is not None and (
            not isinstance(self.compute_dtype, torch.dtype) or not self.compute_dtype.is_floating_point
        ):
            raise ValueError(
                f"compute_dtype must be None or a floating-point torch.dtype (torch.float32, torch.bfloat16, "
                f"torch.float16), got {self.compute_dtype!r}"
            )

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """The adapter_config.json PEFT writes for the same adapter (plus our own key)."""
        out = dict(_PEFT_LORA_DEFAULTS)
        peft_fields = {f.name for f in fields(self)} & set(out)
        out.update({name: getattr(self, name) for name in peft_fields})
        out["rank_pattern"], out["alpha_pattern"] = dict(self.rank_pattern), dict(self.alpha_pattern)
        out["base_model_name_or_path"] = base_model_name_or_path
        if isinstance(out["target_modules"], list):
            out["target_modules"] = sorted(out["target_modules"])
        # Our own settings (quantize, blocksize, ...) describe how the base is stored, not the
        # adapter, and PEFT warns about unknown keys: they stay out of the file.
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Read an adapter_config.json written by PEFT (or by us); refuse what we cannot run."""
        if data.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"not a LoRA adapter: peft_type is {data.get('peft_type')!r}")
        ours = {f.name for f in fields(cls)}
        # The listed features, and any other PEFT variant we do not know: a `*_config` sub-config or a
        # `use_*` switch that is set (KaSA, VeLoRA, MonteCLoRA, ... are configured that way).
        variant = lambda key: key in _UNSUPPORTED_WHEN_SET or key.endswith("_config") or key.startswith("use_")
        unset = (None, False, {}, [])
        unsupported = [key for key in data if key not in ours and variant(key) and data[key] not in unset]
        if unsupported:
            key = unsupported[0]
            raise ValueError(f"this adapter uses PEFT's {key}={data[key]!r}, which peft_fast does not support")
        ours_only = {"quantize", "double_quant", "blocksize", "compute_dtype"}
        kwargs = {f.name: data[f.name] for f in fields(cls) if f.name in data and f.name not in ours_only}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> LoraConfig:
        return type(self)(**{**asdict(self), **changes})


# -- bottleneck adapters (Houlsby / Pfeiffer / He et al.'s parallel adapter) -----------------------

ADAPTER_PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ADAPTER_NON_LINEARITIES = ("relu", "gelu", "swish")
ADAPTER_LOCATIONS = ("attention", "ffn")
ADAPTER_INITS = ("mam_adapter", "houlsby")
# AdapterHub's defaults for the three configurations (DoubleSeqBn, SeqBn, ParBn).
_PLACEMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "houlsby": {"reduction_factor": 16, "scaling": 1.0, "locations": ("attention", "ffn")},
    "pfeiffer": {"reduction_factor": 16, "scaling": 1.0, "locations": ("ffn",)},
    "parallel": {"reduction_factor": 2, "scaling": 4.0, "locations": ("ffn",)},
}


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")
    return value.lower()


@dataclass
class AdapterConfig:
    """Bottleneck adapters: ``h + s·up(act(down(LN?(h))))`` inserted into every transformer layer.

    ``placement``: ``"houlsby"`` (serial, after attention and after the FFN), ``"pfeiffer"``
    (serial, after the FFN only) or ``"parallel"`` (He et al.: beside the FFN, reading the FFN's
    input, scaled by ``scaling``; ``locations=["attention", "ffn"]`` puts one beside attention too).
    The bottleneck width is ``bottleneck_size``, or ``hidden_size // reduction_factor``; neither
    given, AdapterHub's default per placement (16, 16, 2). ``scaling`` defaults to 1 for serial
    and 4 for parallel adapters (He et al.). ``init_weights="mam_adapter"`` zeroes the up-projection
    so a new adapter is exactly the identity; ``"houlsby"`` draws both projections from a
    truncated normal (std 1e-2): near, not exactly, the identity. ``dropout`` acts on the adapter's
    output before the residual add and ``ln_before`` adds a LayerNorm on its input, both as in
    AdapterHub. ``leave_out`` lists layer indices (in model order) that get no adapter.
    ``quantize="nf4"`` stores the host model's Linear layers in NF4 first (as LoraConfig does).
    """

    reduction_factor: float | None = None
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    placement: str = "houlsby"
    scaling: float | None = None
    dropout: float = 0.0
    ln_before: bool = False
    init_weights: str = "mam_adapter"
    locations: list[str] | None = None
    leave_out: list[int] = field(default_factory=list)
    quantize: str | None = None
    double_quant: bool = True
    blocksize: int = 64

    def __post_init__(self) -> None:
        self.placement = _choice("placement", self.placement, ADAPTER_PLACEMENTS)
        self.non_linearity = _choice("non_linearity", self.non_linearity, ADAPTER_NON_LINEARITIES)
        self.init_weights = _choice("init_weights", self.init_weights, ADAPTER_INITS)
        defaults = _PLACEMENT_DEFAULTS[self.placement]
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            raise ValueError("give reduction_factor or bottleneck_size, not both")
        if self.bottleneck_size is not None:
            check_positive_int("bottleneck_size", self.bottleneck_size)
        elif self.reduction_factor is None:
            self.reduction_factor = defaults["reduction_factor"]
        if self.reduction_factor is not None and not _is_real(self.reduction_factor):
            raise TypeError(f"reduction_factor must be a number >= 1, got {self.reduction_factor!r}")
        if self.reduction_factor is not None and not self.reduction_factor >= 1:
            raise ValueError(
                f"reduction_factor must be >= 1 (the bottleneck, hidden_size / reduction_factor, cannot be "
                f"larger than the hidden size), got {self.reduction_factor}"
            )
        if self.scaling is None:
            self.scaling = defaults["scaling"]
        self.scaling = check_finite("scaling", self.scaling)
        check_probability("dropout", self.dropout)
        check_bool("ln_before", self.ln_before)
        if self.locations is None:
            self.locations = list(defaults["locations"])
        if isinstance(self.locations, str) or not isinstance(self.locations, (list, tuple)):
            raise TypeError(f"locations must be a list of {ADAPTER_LOCATIONS} entries, got {self.locations!r}")
        if not isinstance(self.leave_out, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.leave_out
        ):
            raise TypeError(f"leave_out must be a list of layer indices, got {self.leave_out!r}")
        self.locations = [_choice("location", loc, ADAPTER_LOCATIONS) for loc in self.locations]
        if not self.locations or len(set(self.locations)) != len(self.locations):
            raise ValueError(f"locations must be distinct entries of {ADAPTER_LOCATIONS}, got {self.locations}")
        if self.placement != "parallel" and tuple(sorted(self.locations)) != tuple(sorted(defaults["locations"])):
            raise ValueError(
                f"placement {self.placement!r} puts adapters after {' and '.join(defaults['locations'])}; "
                f"locations can only be chosen for placement='parallel'"
            )
        _check_nf4_storage(self)

    @property
    def is_parallel(self) -> bool:
        return self.placement == "parallel"

    def bottleneck_for(self, hidden_size: int) -> int:
        """The bottleneck width for a host of ``hidden_size``; an error if it exceeds the hidden size."""
        size = self.bottleneck_size or max(1, int(hidden_size // self.reduction_factor))
        if size > hidden_size:
            raise ValueError(f"bottleneck_size {size} is larger than the model's hidden size {hidden_size}")
        return size

    def to_dict(self) -> dict[str, Any]:
        """The ``config`` entry of our adapter_config.json: AdapterHub's key names where they exist."""
        return {
            "architecture": "bottleneck",
            "mh_adapter": "attention" in self.locations,
            "output_adapter": "ffn" in self.locations,
            "is_parallel": self.is_parallel,
            "placement": self.placement,
            "reduction_factor": self.reduction_factor,
            "bottleneck_size": self.bottleneck_size,
            "non_linearity": self.non_linearity,
            "scaling": self.scaling,
            "dropout": self.dropout,
            "ln_before": self.ln_before,
            "ln_after": False,
            "init_weights": self.init_weights,
            "leave_out": list(self.leave_out),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Read :meth:`to_dict`'s output; refuse AdapterHub options that change the math here."""
        if data.get("architecture", "bottleneck") != "bottleneck":
            raise ValueError(f"not a bottleneck adapter: architecture is {data.get('architecture')!r}")
        for key in ("ln_after", "use_gating", "phm_layer", "inv_adapter", "cross_adapter"):
            if data.get(key):
                raise ValueError(f"this adapter uses AdapterHub's {key}={data[key]!r}, which peft_fast lacks")
        if not isinstance(data.get("scaling", 1.0), (int, float)):
            raise ValueError(f"only a fixed scaling is supported, got {data['scaling']!r}")
        locations = [loc for loc, key in (("attention", "mh_adapter"), ("ffn", "output_adapter")) if data.get(key)]
        placement = data.get("placement") or ("parallel" if data.get("is_parallel") else "houlsby")
        size = data.get("bottleneck_size")
        return cls(
            reduction_factor=None if size else data.get("reduction_factor"),
            bottleneck_size=size,
            non_linearity=data.get("non_linearity", "relu"),
            placement=placement,
            scaling=data.get("scaling"),
            dropout=data.get("dropout", 0.0),
            ln_before=bool(data.get("ln_before", False)),
            init_weights=data.get("init_weights", "mam_adapter"),
            locations=locations or None,
            leave_out=list(data.get("leave_out") or []),
        )


# -- (IA)³ ------------------------------------------------------------------------------------

# PEFT 0.21's defaults when target_modules / feedforward_modules are not given.
IA3_DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "t5": (["k", "v", "wo"], ["wo"]),
}
_PEFT_IA3_DEFAULTS: dict[str, Any] = {
    "auto_mapping": None, "base_model_name_or_path": None, "exclude_modules": None, "fan_in_fan_out": False,
    "feedforward_modules": None, "inference_mode": True, "init_ia3_weights": True, "modules_to_save": None,
    "peft_type": "IA3", "peft_version": PEFT_VERSION, "revision": None, "target_modules": None, "task_type": None,
}  # fmt: skip


@dataclass
class IA3Config:
    """(IA)³ settings with Hugging Face PEFT's field names and meanings.

    A learned vector scales the output of each target module, or its input for the
    ``feedforward_modules`` (which must be among the targets). Module names match as in PEFT:
    a list entry matches a module whose name equals it or ends with ``"." + entry`` (feedforward
    entries: ends with the entry), a string is a regex over the full name, ``"all-linear"`` takes
    every Linear but the output head. Left as None, both come from PEFT's table for the model type.
    ``modules_to_save``: modules (by name suffix, PEFT's rule) trained whole and saved in the adapter;
    ``task_type`` adds PEFT's heads for it (SEQ_CLS: ``classifier`` / ``score``).
    Ours, beyond PEFT's: ``quantize`` (None or ``"nf4"``), ``double_quant``, ``blocksize``.
    """

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    quantize: str | None = None
    double_quant: bool = True
    blocksize: int = 64

    peft_type: ClassVar[str] = "IA3"

    def __post_init__(self) -> None:
        for name in ("target_modules", "feedforward_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple, list)):
                value = list(value)
                _check_names(name, value, allow_regex=True)
                setattr(self, name, sorted(value))
            else:
                _check_names(name, value, allow_regex=True)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save)
        _check_names("modules_to_save", self.modules_to_save, allow_regex=False)
        check_bool("init_ia3_weights", self.init_ia3_weights)
        if (
            isinstance(self.target_modules, list)
            and isinstance(self.feedforward_modules, list)
            and not set(self.feedforward_modules) <= set(self.target_modules)
        ):
            raise ValueError(
                f"feedforward_modules {self.feedforward_modules} must be a subset of "
                f"target_modules {self.target_modules}"
            )
        _check_nf4_storage(self)

    def for_model_type(self, model_type: str | None) -> IA3Config:
        """This config with PEFT's default targets for ``model_type`` filled in where None."""
        if self.target_modules is not None and self.feedforward_modules is not None:
            return self
        if model_type not in IA3_DEFAULT_TARGETS:
            raise ValueError(
                f"no default (IA)³ targets for model type {model_type!r} (known: {sorted(IA3_DEFAULT_TARGETS)}); "
                "give target_modules and feedforward_modules"
            )
        targets, feedforward = IA3_DEFAULT_TARGETS[model_type]
        return self.replace(
            target_modules=self.target_modules if self.target_modules is not None else targets,
            feedforward_modules=self.feedforward_modules if self.feedforward_modules is not None else feedforward,
        )

    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """The adapter_config.json PEFT 0.21 writes for the same (IA)³ adapter."""
        out = dict(_PEFT_IA3_DEFAULTS)
        out.update({name: getattr(self, name) for name in {f.name for f in fields(self)} & set(out)})
        out["base_model_name_or_path"] = base_model_name_or_path
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> IA3Config:
        """Read an (IA)³ adapter_config.json written by PEFT (or by us); refuse what we cannot run."""
        if data.get("peft_type") != "IA3":
            raise ValueError(f"not an (IA)³ adapter: peft_type is {data.get('peft_type')!r}")
        ours_only = {"quantize", "double_quant", "blocksize"}
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data and f.name not in ours_only})

    def with_task_modules(self) -> IA3Config:
        """This config with the heads PEFT adds to ``modules_to_save`` for its task type (SEQ_CLS: classifier)."""
        wanted = self.modules_to_save or []
        extra = [name for name in TASK_MODULES_TO_SAVE.get(self.task_type, ()) if name not in wanted]
        return self.replace(modules_to_save=[*wanted, *extra]) if extra else self

    def replace(self, **changes: Any) -> IA3Config:
        return type(self)(**{**asdict(self), **changes})
