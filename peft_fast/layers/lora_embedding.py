"""``LoraEmbedding``: LoRA on an embedding layer, PEFT's layout."""

from __future__ import annotations

import torch
from torch import nn

from peft_fast.layers.base import LoraLayer, check_mixed_batch


class LoraEmbedding(LoraLayer):
    """A frozen ``nn.Embedding`` plus LoRA adapters, laid out and computed as PEFT's ``lora.Embedding``.

    ``lora_embedding_A[<adapter>]`` is [r, num_embeddings] and ``lora_embedding_B[<adapter>]``
    [embedding_dim, r]: ``E(x) + s·(A[:, x]ᵀ·Bᵀ)``. Plain torch (a row gather and a rank-r matmul:
    memory-bound, nothing for a fused kernel to win). As in PEFT, LoRA dropout does not apply to
    embeddings, and a scaled embedding's ``embed_scale`` scales the adapter's output too.
    """

    def __init__(self, base_layer: nn.Embedding) -> None:
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"LoraEmbedding wraps nn.Embedding, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

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
        """Add adapter ``adapter_name``: A = 0, B ~ N(0, 1) as PEFT; both N(0, 1) with ``init_lora_weights=False``."""
        if use_dora:
            raise ValueError("DoRA (use_dora=True) on an Embedding layer is not supported: peft_fast runs DoRA on "
                             "Linear layers (dense or NF4) only")  # fmt: skip
        self._check_adapter(adapter_name, r, lora_alpha)
        del lora_dropout  # PEFT's Embedding keeps it but never applies it
        factory = {"device": self.base_device(), "dtype": self.base_dtype()}
        lora_a = torch.randn(r, self.num_embeddings, **factory)
        lora_b = torch.randn(self.embedding_dim, r, **factory)
        if init_lora_weights is not False:  # True and "gaussian" both: PEFT's embedding init
            nn.init.zeros_(lora_a)
            nn.init.normal_(lora_b)
        self.lora_embedding_A[adapter_name] = nn.Parameter(lora_a)
        self.lora_embedding_B[adapter_name] = nn.Parameter(lora_b)
        self._record(adapter_name, r, lora_alpha, use_rslora)

    @property
    def lora_A(self) -> nn.ParameterDict:
        """The adapters by name (what code common to LoRA layers looks up)."""
        return self.lora_embedding_A

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]]

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {"lora_embedding_A": self.lora_embedding_A[adapter_name],
                "lora_embedding_B": self.lora_embedding_B[adapter_name]}  # fmt: skip

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return nn.functional.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type,
                                       base.scale_grad_by_freq, base.sparse)  # fmt: skip

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        """The embedding; with ``adapter_names`` (one per sample) PEFT's mixed batch, each sample its own adapter."""
        if adapter_names is not None:
            check_mixed_batch(x, adapter_names)
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        if adapter_names is None:
            groups = [(name, None) for name in self.active_adapters if name in self.lora_embedding_A]
        else:  # plain torch, adapter by adapter as PEFT (a row gather: nothing for a kernel to win)
            groups = [
                (name, torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=x.device))
                for name in self.lora_embedding_A
                if name in adapter_names
            ]
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        for name, index in groups:
            lora_a = self.lora_embedding_A[name].to(result.dtype)
            lora_b = self.lora_embedding_B[name].to(result.dtype)
            ids = x if index is None else x.index_select(0, index)
            update = (self._embed(ids, lora_a.t()) @ lora_b.t()) * self.scaling[name]
            if isinstance(embed_scale, torch.Tensor):
                update = update * embed_scale.to(update.dtype)
            elif isinstance(embed_scale, (float, int)):
                update = update * embed_scale
            result = result + update if index is None else result.index_add(0, index, update)
        return result

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """E + Σ s·(B·A)ᵀ over the active adapters, in ``dtype`` (default: the base's dtype)."""
        weight = self.base_layer.weight.detach()
        merged = weight.float()
        for name in [] if self.disable_adapters else self.active_adapters:
            delta = self.lora_embedding_B[name].detach().float() @ self.lora_embedding_A[name].detach().float()
            merged = merged + self.scaling[name] * delta.t()
        return merged.to(dtype or weight.dtype)


# The parameter dtypes a ParamWrapper adapts (PEFT's low-precision fp8 path, W upcast for the add, is not here).
