"""P-tuning: its config (the MLP / LSTM encoder itself is the shared PromptEncoder)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peft_fast.config import check_probability
from peft_fast.prompt_methods.base import _check_positive


@dataclass
class PromptEncoderConfig:
    """P-tuning (Liu et al.): virtual-token embeddings produced by an MLP or a bidirectional LSTM."""

    num_virtual_tokens: int = 20
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    task_type: str = "CAUSAL_LM"

    peft_type: ClassVar[str] = "P_TUNING"

    def __post_init__(self) -> None:
        _check_positive("num_virtual_tokens", self.num_virtual_tokens)
        if isinstance(self.encoder_reparameterization_type, str):
            self.encoder_reparameterization_type = self.encoder_reparameterization_type.upper()
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ValueError(
                f"encoder_reparameterization_type must be MLP or LSTM, got {self.encoder_reparameterization_type!r}"
            )
        _check_positive("encoder_num_layers", self.encoder_num_layers)
        if self.encoder_hidden_size is not None:
            _check_positive("encoder_hidden_size", self.encoder_hidden_size)
        check_probability("encoder_dropout", self.encoder_dropout)

    def peft_fields(self) -> dict[str, Any]:
        return {
            "encoder_reparameterization_type": self.encoder_reparameterization_type,
            "encoder_hidden_size": self.encoder_hidden_size,
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": self.encoder_dropout,
        }
