"""``LoraLinear``: LoRA / QLoRA / DoRA on a linear layer, the fused op in forward, mixed-adapter batches."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from peft_fast.layers.base import BASE_ROWS, DoraMagnitude, LoraLayer, _reset_factors, check_mixed_batch
from peft_fast.layers.nf4_linear import NF4Linear
from peft_fast.nf4 import NF4Weight, dequantize_nf4
from peft_fast.ops.lora_mixed import AdapterStackCache


class LoraLinear(LoraLayer):
    """A frozen base linear (dense ``nn.Linear`` or :class:`NF4Linear`) plus LoRA adapters.

    The module layout is PEFT's (``base_layer``, ``lora_A.<adapter>``, ``lora_B.<adapter>``), so
    state dicts carry PEFT's names. The first active adapter runs fused with the base matmul in
    one ``peft_fast::lora_linear`` op; further active adapters (rare) are added with plain torch.

    DoRA adapters (``use_dora=True``) also hold ``lora_magnitude_vector.<adapter>`` (a
    :class:`DoraMagnitude`) and compute as PEFT's DoRA (:func:`peft_fast.ops.dora_linear`): the
    weight norm ‖W + s·B·A‖ by one fused pass over W per forward, kept between calls only in eval
    mode without autograd while A, B and W are unchanged (PEFT's inference cache).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        if not isinstance(base_layer, (nn.Linear, NF4Linear)):
            raise TypeError(f"LoraLinear wraps nn.Linear or NF4Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout_p: dict[str, float] = {}
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only, PEFT's name
        self.use_dora: dict[str, bool] = {}
        self._dora_norms: dict[str, tuple[tuple, torch.Tensor]] = {}  # eval-mode cache, not state
        self._mixed_stack = AdapterStackCache()  # mixed batches: the batch's adapters stacked, not state

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        initial: tuple[torch.Tensor, torch.Tensor] | None = None,
        lora_bias: bool = False,
    ) -> None:
        """Add (or replace) adapter ``adapter_name`` with rank ``r``, initialised as PEFT does.

        ``initial``: (A, B) computed from the base weight (PiSSA, OLoRA, LoftQ: ``peft_fast.lora.init``,
        which already left the base its residual), taken as they are (fp32, as PEFT assigns them).

        With ``use_dora`` the magnitude starts as PEFT's: ‖W + s·B·A‖ per output row (deq(W) for
        an NF4 base), which is ‖W‖ with the default B = 0, so the new adapter is the identity.
        """
        from peft_fast.config import check_bool, check_probability

        self._check_adapter(adapter_name, r, lora_alpha)
        check_probability("lora_dropout", lora_dropout)
        factory = {"device": self.base_device(), "dtype": self.base_dtype()}
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **factory)
        check_bool("lora_bias", lora_bias)
        if lora_bias and getattr(self.base_layer, "bias", None) is None:
            warnings.warn(  # as PEFT: it trains and saves, but cannot be merged into a base without a bias
                f"lora_bias=True on a {type(self.base_layer).__name__} without a bias: merging this adapter "
                "will not be possible",
                UserWarning,
                stacklevel=4,
            )
        # lora_bias (PEFT): B has a bias, trained and scaled with B·A: y += s·(H·Bᵀ + b_B).
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias, **factory)
        self.lora_dropout_p[adapter_name] = float(lora_dropout)
        self._record(adapter_name, r, lora_alpha, use_rslora)
        if initial is None:
            self.reset_lora_parameters(adapter_name, init_lora_weights)
        else:
            lora_a, lora_b = initial
            if tuple(lora_a.shape) != (r, self.in_features) or tuple(lora_b.shape) != (self.out_features, r):
                raise ValueError(f"initial A {tuple(lora_a.shape)} / B {tuple(lora_b.shape)} do not fit rank {r}")
            self.lora_A[adapter_name].weight.data = lora_a.to(self.base_device())
            self.lora_B[adapter_name].weight.data = lora_b.to(self.base_device())
        check_bool("use_dora", use_dora)
        self.use_dora[adapter_name] = use_dora
        if adapter_name in self.lora_magnitude_vector:  # replacing a DoRA adapter
            del self.lora_magnitude_vector[adapter_name]
        self._dora_norms.pop(adapter_name, None)
        if use_dora:
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude(self._initial_magnitude(adapter_name))

    def _initial_magnitude(self, adapter_name: str) -> torch.Tensor:
        """‖W + s·B·A‖ per row in the base's dtype, as PEFT's ``DoraLinearLayer.update_layer``."""
        from peft_fast.ops import dora_weight_norm

        dtype = self.base_dtype()
        base = self.base_weight()
        base = base.detach().to(dtype) if isinstance(base, torch.Tensor) else base
        lora_a, lora_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        with torch.no_grad():
            return dora_weight_norm(base, lora_a.to(dtype), lora_b.to(dtype), self.scaling[adapter_name]).clone()

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        """PEFT's initialisation: B = 0 so the adapter starts as the identity on the base output."""
        _reset_factors(self.lora_A[adapter_name], self.lora_B[adapter_name], init_lora_weights, self.r[adapter_name])

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The trainable parameters of adapter ``adapter_name`` (A, B, and DoRA's magnitude)."""
        params = [*self.lora_A[adapter_name].parameters(), *self.lora_B[adapter_name].parameters()]
        if adapter_name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[adapter_name].weight)
        return params

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Adapter ``adapter_name``'s tensors under their PEFT file suffixes (``lora_A.weight``, ...)."""
        out = {"lora_A.weight": self.lora_A[adapter_name].weight, "lora_B.weight": self.lora_B[adapter_name].weight}
        if self.lora_B[adapter_name].bias is not None:
            out["lora_B.bias"] = self.lora_B[adapter_name].bias
        if adapter_name in self.lora_magnitude_vector:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector[adapter_name].weight
        return out

    def delete_adapter(self, adapter_name: str) -> None:
        for table in (self.lora_A, self.lora_B):
            del table[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout_p):
            del table[adapter_name]
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        self.use_dora.pop(adapter_name, None)
        self._dora_norms.pop(adapter_name, None)
        self.active_adapters = [name for name in self.active_adapters if name != adapter_name]

    def train(self, mode: bool = True) -> LoraLinear:
        if mode:
            self._dora_norms.clear()  # training changes A and B: the eval cache would go stale
            self._mixed_stack.clear()
        return super().train(mode)

    def _weight_norm(
        self, name: str, base, lora_a: torch.Tensor, lora_b: torch.Tensor, cached_only: bool = False
    ) -> torch.Tensor | None:
        """‖W + s·B·A‖ of DoRA adapter ``name`` (A, B in the compute dtype), cached in no-grad eval calls.

        The cache key holds the versions and storages of A, B and W (and the dtype), so an
        optimizer step, ``load_state_dict`` or a cast recomputes it, as PEFT's cache does not.
        ``cached_only``: None where no cache applies (training, grad mode, compiling), so that
        ``dora_linear`` computes the norm itself (over NF4, inside the pass dequantizing W).
        """
        from peft_fast.ops import dora_weight_norm

        scale = self.scaling[name]
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None if cached_only else dora_weight_norm(base, lora_a, lora_b, scale)
        params = (self.lora_A[name].weight, self.lora_B[name].weight)
        stored = base.packed if isinstance(base, NF4Weight) else self.base_layer.weight
        key = (*((t._version, t.data_ptr()) for t in (*params, stored)), lora_a.dtype, lora_a.device)
        hit = self._dora_norms.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        norm = dora_weight_norm(base, lora_a, lora_b, scale)
        self._dora_norms[name] = (key, norm)
        return norm

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        """The layer's output; with ``adapter_names`` (one per sample, ``"__base__"``: none) PEFT's mixed batch."""
        from peft_fast.ops import base_linear, lora_linear

        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names)
        # Base, A and B all compute in one dtype (x's, or autocast's), as nn.Linear + PEFT.
        x, base, bias, dtype, out_dtype = self.compute_inputs(x)
        active = [] if self.disable_adapters else [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return base_linear(x, base, bias).to(out_dtype)
        if any(self.use_dora.get(name, False) for name in active):
            return self._dora_forward(x, base, bias, dtype, active).to(out_dtype)
        first, *others = active
        b_first = self.lora_B[first].bias
        if b_first is not None:  # lora_bias: s·b_B joins the base bias, in the op's one epilogue
            scaled = self.scaling[first] * b_first.to(dtype)
            bias = scaled if bias is None else bias + scaled
        y = lora_linear(
            x, base, self.lora_A[first].weight.to(dtype), self.lora_B[first].weight.to(dtype), bias,
            scale=self.scaling[first], dropout_p=self.lora_dropout_p[first], training=self.training,
        )  # fmt: skip
        for name in others:
            dropped = nn.functional.dropout(x, self.lora_dropout_p[name], self.training)
            lora_a, lora_b = self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype)
            lora = dropped @ lora_a.t() @ lora_b.t()
            if self.lora_B[name].bias is not None:
                lora = lora + self.lora_B[name].bias.to(dtype)
            y = y + self.scaling[name] * lora
        return y.to(out_dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """PEFT's mixed-adapter batch: sample i gets adapter ``adapter_names[i]`` (``"__base__"`` or one this
        layer lacks: none), whatever the active adapters are.

        The base GEMM runs once for the whole batch; then, without autograd, every row's LoRA term in
        one gathered pass (``peft_fast::lora_mixed_batch``) over the batch's adapters stacked (cached on
        the layer). Where autograd records, or LoRA dropout applies (a layer training), a
        differentiable torch path computes the same, adapter by adapter as PEFT.
        """
        from peft_fast.ops import base_linear, group_rows, lora_mixed_batch

        check_mixed_batch(x, adapter_names)
        names = set(adapter_names) - {BASE_ROWS}
        if any(self.use_dora.get(name, False) for name in names):
            raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")  # PEFT's message
        x, base, bias, dtype, out_dtype = self.compute_inputs(x)
        y = base_linear(x, base, bias)
        batch = [name for name in self.lora_A if name in names] if not self.disable_adapters else []
        if not batch:
            return y.to(out_dtype)
        params = [p for name in batch for p in self.lora_A[name].parameters()]
        params += [p for name in batch for p in self.lora_B[name].parameters()]
        grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or any(p.requires_grad for p in params))
        dropout = self.training and any(self.lora_dropout_p[name] > 0 for name in batch)
        if grad or dropout:
            return self._mixed_batch_torch(x, y, adapter_names, batch, dtype).to(out_dtype)
        stack = self._mixed_stack.get(
            [(name, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], self.lora_B[name].bias)
             for name in batch],
            dtype,
        )  # fmt: skip
        slot = {name: i for i, name in enumerate(batch)}
        groups = group_rows([slot.get(name, -1) for name in adapter_names], y[0].numel() // y.shape[-1], y.device)
        return lora_mixed_batch(y.contiguous(), x, stack, groups).to(out_dtype)

    def _mixed_batch_torch(self, x, y, adapter_names: list[str], batch: list[str], dtype) -> torch.Tensor:
        """The mixed batch with autograd (or dropout): PEFT's loop over the batch's adapters, out of place."""
        for name in batch:
            index = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=x.device)
            sub = nn.functional.dropout(x.index_select(0, index), self.lora_dropout_p[name], self.training)
            lora_b = self.lora_B[name]
            term = sub @ self.lora_A[name].weight.to(dtype).t() @ lora_b.weight.to(dtype).t()
            if lora_b.bias is not None:
                term = term + lora_b.bias.to(dtype)
            y = y.index_add(0, index, term * self.scaling[name])
        return y

    def _dora_forward(self, x, base, bias, dtype: torch.dtype, active: list[str]) -> torch.Tensor:
        """The active adapters, at least one of them DoRA, as PEFT's forward runs them (in order)."""
        from peft_fast.ops import base_linear, dora_linear

        def weights(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            return self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype)

        def dropped(name: str) -> torch.Tensor | None:
            p = self.lora_dropout_p[name]
            # As PEFT: dropout only in training with p > 0; the mask is torch's (nn.Dropout's) RNG.
            return nn.functional.dropout(x, p, True) if self.training and p > 0 else None

        if len(active) == 1:  # the common case: one fused GEMM without dropout, as dora_linear explains
            (name,) = active
            lora_a, lora_b = weights(name)
            norm = self._weight_norm(name, base, lora_a, lora_b, cached_only=True)
            magnitude = self.lora_magnitude_vector[name].weight
            return dora_linear(x, base, lora_a, lora_b, magnitude, bias, self.scaling[name], dropped(name), norm)
        y = base_linear(x, base, bias)
        for name in active:
            lora_a, lora_b = weights(name)
            x_d = dropped(name)
            lora = self.scaling[name] * ((x if x_d is None else x_d) @ lora_a.t() @ lora_b.t())
            if not self.use_dora.get(name, False):
                y = y + lora
                continue
            # PEFT's DoraLinearLayer.forward on the running result: without dropout its base part is
            # the result so far minus the bias, with dropout the base GEMM of the dropped input.
            factor = self.lora_magnitude_vector[name].weight / self._weight_norm(name, base, lora_a, lora_b)
            if x_d is None:
                base_part = y if bias is None else y - bias
            else:
                base_part = base_linear(x_d, base, None)
            y = (y + (factor - 1) * base_part + factor * lora).to(dtype)
        return y

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W + Σ s·B·A over the active adapters, dense, in ``dtype`` (default: the base's dtype).

        A DoRA adapter merges as PEFT's: ``(m / ‖W₀ + s·B·A‖)·(W + s·B·A)`` per row, the norm
        taken on the unmerged base W₀ and W the weight merged so far.
        """
        merged = self.base_weight()
        out_dtype = dtype or self.base_dtype()
        if isinstance(merged, NF4Weight):
            merged = dequantize_nf4(merged, torch.float32)
        original = merged = merged.detach().float()
        for name in [] if self.disable_adapters else self.active_adapters:
            delta = self.scaling[name] * (
                self.lora_B[name].weight.detach().float() @ self.lora_A[name].weight.detach().float()
            )
            if self.use_dora.get(name, False):
                norm = torch.linalg.vector_norm(original + delta, dim=1)
                factor = self.lora_magnitude_vector[name].weight.detach().float() / norm
                merged = factor[:, None] * (merged + delta)
            else:
                merged = merged + delta
        return merged.to(out_dtype)
