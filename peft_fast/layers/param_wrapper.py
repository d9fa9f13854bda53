"""``LoraParamWrapper``: LoRA on an ``nn.Parameter`` (PEFT's ``target_parameters``).

W + s·ΔW is in place only during the wrapped module's forward.
"""

from __future__ import annotations

import torch
from torch import nn

from peft_fast.layers.base import MIXED_PARAMETERS_REFUSED, LoraLayer, _reset_factors

PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LoraParamWrapper(LoraLayer):
    """LoRA on one ``nn.Parameter`` of a module, as PEFT 0.21's ``lora.ParamWrapper`` (``target_parameters``).

    ``base_layer`` is the module that holds the parameter (or another wrapper: one wrapper per
    parameter, nested, as PEFT nests them); during the wrapped module's forward, and only then, the
    parameter reads as ``W + Σ s·ΔW`` over the active adapters, so the module's own forward (an
    expert loop, a grouped GEMM, ``F.linear``) computes with it. Outside the forward ``module.<name>``
    is the frozen W, as in PEFT.

    A 2-D parameter [out, in] gets ``lora_A`` [r, in] and ``lora_B`` [out, r], ΔW = B·A. A 3-D one
    holds experts, [E, d1, d2]: A is [E·r, in] (expert e's rows e·r … e·r + r − 1) and B [out, E·r]
    (expert e's columns e, e + E, …: PEFT's layout), with (in, out) = (d2, d1), or (d1, d2) where the
    module says ``is_transposed`` (GPT-OSS); ΔW[e] = B_e·A_e (its transpose for ``is_transposed``).
    One adapter on experts folds as one ``baddbmm`` in W's dtype, otherwise Σ ΔW is added, as in PEFT.
    Plain torch, not the fused LoRA op: the op's fusion needs the layer's input and output, which a
    parameter read inside someone else's forward does not give.
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        param = self.get_param()
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"{type(self.owner).__name__}.{parameter_name} is not a parameter")
        if param.dim() not in (2, 3):
            raise ValueError(
                f"LoRA on parameters takes 2-D ([out, in]) or 3-D ([experts, in, out]) parameters, as PEFT; "
                f"{parameter_name} has shape {tuple(param.shape)}"
            )
        if param.dtype not in PARAM_DTYPES:
            raise ValueError(
                f"LoRA on parameters needs an fp32 / fp16 / bf16 parameter; {parameter_name} is {param.dtype}"
            )
        self.is_transposed = bool(getattr(self.owner, "is_transposed", False))
        if param.dim() == 2:
            self.num_experts, (self.out_features, self.in_features) = 1, tuple(param.shape)
        else:
            self.num_experts, d1, d2 = tuple(param.shape)
            self.in_features, self.out_features = (d1, d2) if self.is_transposed else (d2, d1)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @property
    def owner(self) -> nn.Module:
        """The module that holds the parameter (below any nested wrappers)."""
        module = self.base_layer
        while isinstance(module, LoraParamWrapper):
            module = module.base_layer
        return module

    @property
    def weight(self) -> torch.Tensor:
        return self.get_param()

    def get_param(self) -> torch.Tensor:
        """The frozen parameter W itself (never W + ΔW)."""
        return self.owner._parameters[self.parameter_name]

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        """Add adapter ``adapter_name``: A [E·r, in] and B [out, E·r] as ``nn.Linear`` weights, PEFT's init."""
        self._check_adapter(adapter_name, r, lora_alpha)
        if lora_dropout or use_dora:
            raise ValueError("LoRA on parameters does not work with lora_dropout != 0 or use_dora=True (as in PEFT)")
        device = self.get_param().device
        width = r * self.num_experts
        self.lora_A[adapter_name] = nn.Linear(self.in_features, width, bias=False, device=device)
        self.lora_B[adapter_name] = nn.Linear(width, self.out_features, bias=False, device=device)
        self._record(adapter_name, r, lora_alpha, use_rslora)
        _reset_factors(self.lora_A[adapter_name], self.lora_B[adapter_name], init_lora_weights, r)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight]

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[adapter_name].weight, "lora_B.weight": self.lora_B[adapter_name].weight}

    def delete_adapter(self, adapter_name: str) -> None:
        for table in (self.lora_A, self.lora_B):
            del table[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling):
            del table[adapter_name]
        self.active_adapters = [name for name in self.active_adapters if name != adapter_name]

    def _experts_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A per expert [E, r, in], B per expert [E, out, r]) in PEFT's layout."""
        lora_a, lora_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        experts = self.num_experts
        per_b = lora_b.reshape(lora_b.shape[0], -1, experts).permute(2, 0, 1)
        return lora_a.reshape(experts, -1, lora_a.shape[-1]), per_b

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s·ΔW of one adapter, shaped and typed as the parameter."""
        param = self.get_param()
        lora_a, lora_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        scale = self.scaling[adapter_name]
        if param.dim() == 2:
            # As PEFT's Linear.get_delta_weight: fp16 / bf16 factors on a CPU multiply in fp32.
            upcast = lora_b.device.type == "cpu" and lora_b.dtype in (torch.float16, torch.bfloat16)
            if upcast:
                delta = ((lora_b.float() @ lora_a.float()) * scale).to(lora_b.dtype)
            else:
                delta = (lora_b @ lora_a) * scale
        else:
            per_a, per_b = self._experts_factors(adapter_name)
            delta = per_b @ per_a  # [E, out, in]
            delta = (delta.transpose(-2, -1) if self.is_transposed else delta) * scale
        return delta.to(param.device, param.dtype)

    def adapted_parameter(self, active: list[str]) -> torch.Tensor:
        """W + Σ s·ΔW over ``active`` (in W's dtype), what the module computes with."""
        param = self.get_param()
        if len(active) == 1 and self.num_experts > 1:
            # One adapter on experts: W + s·lhs·rhs in one baddbmm in W's dtype (PEFT's factor proxy),
            # never a second [E, d1, d2] tensor; autocast off, as the parameter keeps its dtype.
            per_a, per_b = self._experts_factors(active[0])
            lhs, rhs = (per_a.transpose(-2, -1), per_b.transpose(-2, -1)) if self.is_transposed else (per_b, per_a)
            with torch.autocast(device_type=param.device.type, enabled=False):
                return torch.baddbmm(param, lhs.to(param.dtype), rhs.to(param.dtype), alpha=self.scaling[active[0]])
        delta = None
        for name in active:
            delta = self.delta_weight(name) if delta is None else delta + self.delta_weight(name)
        return param + delta

    def forward(self, *args, **kwargs):
        if kwargs.pop("adapter_names", None):
            raise ValueError(MIXED_PARAMETERS_REFUSED)
        active = [] if self.disable_adapters else [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return self.base_layer(*args, **kwargs)
        owner, name = self.owner, self.parameter_name
        frozen = owner._parameters[name]
        # The module reads W + ΔW under the parameter's own name for this call (PEFT: a parametrization).
        owner._parameters[name] = self.adapted_parameter(active)
        try:
            return self.base_layer(*args, **kwargs)
        finally:
            owner._parameters[name] = frozen

    def merge(self) -> None:
        """Fold the active adapters into the parameter (in its dtype), as PEFT's ``ParamWrapper.merge``."""
        param = self.get_param()
        with torch.no_grad():
            for name in [] if self.disable_adapters else self.active_adapters:
                param.data += self.delta_weight(name).detach()

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, experts={self.num_experts}, {super().extra_repr()}"
