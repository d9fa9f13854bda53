"""Configuration dataclasses with Hugging Face PEFT's field names, and adapter_config.json I/O."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch

__all__ = ["LoraConfig", "pattern_value"]

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
_UNSUPPORTED_WHEN_SET = ("use_dora", "lora_bias", "layer_replication", "target_parameters", "use_qalora",
                         "trainable_token_indices", "alora_invocation_tokens", "arrow_config")  # fmt: skip


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


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
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    quantize: str | None = None
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: torch.dtype | None = None

    peft_type: ClassVar[str] = "LORA"

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        if self.quantize not in (None, "nf4"):
            raise ValueError(f"quantize must be None or 'nf4', got {self.quantize!r}")
        if self.target_modules is None:
            raise ValueError("target_modules is required: a list of names, a regex, or 'all-linear'")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        for name, value in self.rank_pattern.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"rank_pattern[{name!r}] must be a positive integer, got {value!r}")

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
        for key in _UNSUPPORTED_WHEN_SET:
            if data.get(key) not in (None, False, {}, []):
                raise ValueError(f"this adapter uses PEFT's {key}={data[key]!r}, which peft_fast does not support")
        ours_only = {"quantize", "double_quant", "blocksize", "compute_dtype"}
        kwargs = {f.name: data[f.name] for f in fields(cls) if f.name in data and f.name not in ours_only}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> LoraConfig:
        return type(self)(**{**asdict(self), **changes})
