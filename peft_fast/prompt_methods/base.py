"""Shared pieces of the prompt methods: constants, config checks, model geometry, the prompt encoder, pre-hook helpers.

The adapter's state on the model is in :mod:`peft_fast.prompt_methods.state` (it names the four
configs, whose modules import this one).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from peft_fast.adapter_files import PEFT_PREFIX as _PEFT_PREFIX  # noqa: F401 (the prompt methods import it from here)
from peft_fast.models import geometry

PEFT_VERSION = "0.21.2"


# -- config checks ---------------------------------------------------------------------------


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# -- model geometry --------------------------------------------------------------------------


def _geometry(model: nn.Module) -> dict[str, int]:
    """Layers, hidden (token_dim), heads and the per-layer KV geometry (GQA aware), from peft_fast.models."""
    g = geometry(model)
    return {"layers": g.layers, "hidden": g.hidden, "heads": g.heads, "head_dim": g.head_dim, "kv_heads": g.kv_heads}


def _forward_parameters(model: nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


# -- prompt encoders (parameter names are PEFT's, so state can be exchanged with PEFT modules) ----


class PromptEncoder(nn.Module):
    """Produces the method's learned tensor, [num_virtual_tokens, dim], from its parameters.

    ``embedding.weight`` alone when ``reparameterization`` is None (prompt tuning, a plain or loaded
    prefix, a loaded P-tuning prompt); otherwise PEFT's ``transform`` (prefix MLP), ``mlp_head`` or
    ``lstm_head`` + ``mlp_head`` (P-tuning).
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        reparameterization: str | None = None,
        *,
        token_dim: int = 0,
        hidden: int = 0,
        lstm_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.reparameterization = reparameterization
        if reparameterization is None:
            self.embedding = nn.Embedding(num_tokens, dim)
        elif reparameterization == "prefix_mlp":
            self.embedding = nn.Embedding(num_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))
        elif reparameterization == "MLP":
            self.embedding = nn.Embedding(num_tokens, dim)
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
            )
        elif reparameterization == "LSTM":
            self.embedding = nn.Embedding(num_tokens, dim)
            self.lstm_head = nn.LSTM(
                dim, hidden, num_layers=lstm_layers, dropout=dropout, bidirectional=True, batch_first=True
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            raise ValueError(f"unknown reparameterization {reparameterization!r}")

    def forward(self) -> torch.Tensor:
        """The [num_virtual_tokens, dim] tensor the model consumes (batch-free: callers expand it)."""
        weight = self.embedding.weight
        if self.reparameterization is None:
            return weight
        if self.reparameterization == "prefix_mlp":
            return self.transform(weight)
        if self.reparameterization == "MLP":
            return self.mlp_head(weight)
        return self.mlp_head(self.lstm_head(weight.unsqueeze(0))[0])[0]


# -- helpers of the forward pre-hook ----------------------------------------------------------


def _cache_kwarg(parameters: list[str]) -> str:
    return "cache" if "cache" in parameters else "past_key_values"


def _positions_from_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Positions that padding does not advance (HF generate's rule), for the last ``length`` slots."""
    positions = mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(mask == 0, 1)
    return positions[:, -length:]
