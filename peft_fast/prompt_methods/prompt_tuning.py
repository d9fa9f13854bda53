"""Prompt tuning: its config and the text initialisation of the virtual-token embeddings."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peft_fast.prompt_methods.base import _check_positive


@dataclass
class PromptTuningConfig:
    """Prompt tuning (Lester et al.): ``num_virtual_tokens`` learned input embeddings.

    ``init``: ``"random"`` (N(0, 1), as PEFT) or ``"text"``: the embeddings of ``init_text``'s tokens,
    repeated to fill ``num_virtual_tokens``; ``tokenizer`` is a tokenizer object or a local path.
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    tokenizer: Any = None
    task_type: str = "CAUSAL_LM"

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    def __post_init__(self) -> None:
        _check_positive("num_virtual_tokens", self.num_virtual_tokens)
        if not isinstance(self.init, str):
            raise ValueError(f"init must be 'random' or 'text', got {self.init!r}")
        self.init = self.init.lower()
        if self.init not in ("random", "text"):
            raise ValueError(f"init must be 'random' or 'text', got {self.init!r}")
        if self.init == "text" and (not self.init_text or self.tokenizer is None):
            raise ValueError("init='text' needs init_text and a tokenizer (object or local path)")

    def peft_fields(self) -> dict[str, Any]:
        tokenizer = self.tokenizer if isinstance(self.tokenizer, str | os.PathLike) else None
        return {
            "prompt_tuning_init": self.init.upper(),
            "prompt_tuning_init_text": self.init_text,
            "tokenizer_name_or_path": None if tokenizer is None else str(tokenizer),
            "tokenizer_kwargs": None,
        }


def _text_init(config: PromptTuningConfig, embedding: nn.Module, n: int) -> torch.Tensor:
    tokenizer = config.tokenizer
    if isinstance(tokenizer, str | os.PathLike):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    ids = list(tokenizer(config.init_text)["input_ids"])
    if not ids:
        raise ValueError("init_text tokenizes to no tokens")
    if len(ids) > n:
        raise ValueError(f"init_text is {len(ids)} tokens, longer than num_virtual_tokens={n}")
    ids = (ids * math.ceil(n / len(ids)))[:n]  # PEFT repeats a short text to fill the prompt
    weight = embedding.weight
    with torch.no_grad():
        return embedding(torch.tensor(ids, device=weight.device)).detach().float().clone()
