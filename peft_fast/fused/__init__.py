"""The fused training step: a known family's norms, rotary embedding, gated MLP, residual adds and loss as fused ops.

``fuse(model)`` reads the model table (:mod:`peft_fast.models`) for the model's family and gives
each module it can fuse a subclass of its own class (:mod:`.classes`) whose forward runs our ops:

================  =====================================================================  ==================
piece             what runs                                                              modules
================  =====================================================================  ==================
``rms_norm``      ``peft_fast::rms_norm`` in the family's rounding (Llama's or Gemma's)   every RMSNorm
``residual_add``  the decoder layer's residual add fused into the next RMSNorm           decoder layers
``rope``          ``peft_fast::rope`` on q and k, one kernel (HF's cos / sin, every variant) attention modules
``glu``           ``peft_fast::glu``: act(gate)·up, recomputed in backward               MLPs
``tiled_mlp``     the MLP over token chunks at long context (only its input kept)        MLPs
``linear_cross_entropy``  the loss from the hidden states, chunked, never the logits     the causal LM
``keep_last_layer``  under gradient checkpointing the last layer keeps its activations:  the last layer
                  its backward follows its forward at once, so recomputing it frees nothing
================  =====================================================================  ==================

plus, opt-in, ``offload_activations``: the checkpointed layer inputs in host memory (:mod:`.offload`).
Unknown families are left as they are; ``unfuse`` gives every module its class back. Parameters,
buffers and state-dict names never change, so adapters and checkpoints are unaffected.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

from peft_fast.fused.attention import fusable_attention, fuse_attention
from peft_fast.fused.classes import is_fused, original_class
from peft_fast.fused.decoder import fusable_decoder, fuse_decoder
from peft_fast.fused.head import fusable_head, fuse_head
from peft_fast.fused.mlp import fusable_mlp, fuse_mlp
from peft_fast.fused.norm import fusable_norm, fuse_norm
from peft_fast.fused.offload import keep_activations, offload_layer, restore_kept, restore_layer
from peft_fast.models import Family, family_for

__all__ = ["PIECES", "FusedState", "fuse", "fused_state", "resolve_pieces", "unfuse"]

PIECES = ("rms_norm", "residual_add", "rope", "glu", "tiled_mlp", "linear_cross_entropy", "keep_last_layer")
_STATE_ATTR = "peft_fast_fused"
# Tiled MLP: from this many tokens in one forward, in chunks of this many (Llama-3-8B: 4096 tokens of
# the [tokens × 14336] gate / up / product activations are ~0.35 GB in bf16).
TILED_MLP_MIN_TOKENS = 8192
TILED_MLP_CHUNK_TOKENS = 4096


@dataclass
class FusedState:
    """What :func:`fuse` did to a model: the family, the count of modules per piece, the classes it replaced."""

    family: str
    pieces: dict[str, int] = field(default_factory=dict)
    offload_activations: bool = False
    replaced: list[tuple[str, type]] = field(default_factory=list)  # (module name, its class before)

    def summary(self) -> str:
        """One line: what was fused for this model."""
        done = ", ".join(f"{piece} ×{count}" for piece, count in self.pieces.items() if count)
        offload = "; activation offload on (with gradient checkpointing)" if self.offload_activations else ""
        return f"peft_fast: fused step for {self.family}: {done or 'nothing'}{offload}"


def resolve_pieces(fused: bool | Iterable[str] | Mapping[str, bool]) -> frozenset[str]:
    """The pieces ``fused`` asks for: True (all), False (none), an iterable of names (those), or a
    ``{name: bool}`` dict (all, but those mapped to False). Unknown names are refused."""
    if fused is True:
        return frozenset(PIECES)
    if fused is False or fused is None:
        return frozenset()
    if isinstance(fused, (str, bytes)) or not isinstance(fused, (Iterable, Mapping)):
        raise TypeError(f"fused must be True, False, a list of pieces or a {{piece: bool}} dict, got {fused!r}")
    names = set(fused)
    unknown = sorted(map(str, names - set(PIECES)))
    if unknown:
        raise ValueError(f"unknown fused piece(s) {unknown}; the pieces are {', '.join(PIECES)}")
    if isinstance(fused, Mapping):
        if any(not isinstance(on, bool) for on in fused.values()):
            raise TypeError(f"fused: every value must be True or False, got {dict(fused)!r}")
        return frozenset(piece for piece in PIECES if fused.get(piece, True))
    return frozenset(names)


def fused_state(model: nn.Module) -> FusedState | None:
    """The model's :class:`FusedState`, or None if :func:`fuse` never changed it."""
    return model.__dict__.get(_STATE_ATTR)


def fuse(
    model: nn.Module,
    pieces: bool | Iterable[str] | Mapping[str, bool] = True,
    *,
    offload_activations: bool = False,
    verbose: bool = True,
) -> FusedState | None:
    """Fuse the pieces of ``model``'s training step its family allows; returns what was done (None: nothing).

    Idempotent: an already fused model is returned as it is. Prints the summary once when ``verbose``.
    """
    wanted = resolve_pieces(pieces)
    if not isinstance(offload_activations, bool):
        raise TypeError(f"offload_activations must be True or False, got {offload_activations!r}")
    if fused_state(model) is not None:
        return fused_state(model)
    family = family_for(model)
    state = FusedState(family.name if family else type(model).__name__, {piece: 0 for piece in sorted(wanted)})
    if family is not None and wanted:
        _fuse_family(model, family, wanted, state)
    if offload_activations:
        layers = [(name, m) for name, m in model.named_modules() if _is_checkpointing_layer(m)]
        if not layers:
            raise ValueError(
                "offload_activations needs transformers' GradientCheckpointingLayer decoder layers "
                f"(transformers >= 5); {type(model).__name__} has none"
            )
        for name, layer in layers:
            state.replaced.append((name, type(layer)))
            offload_layer(layer)
        state.offload_activations = True
    if not state.replaced:
        return None
    model.__dict__[_STATE_ATTR] = state
    if verbose:
        _print_once(state.summary())
    return state


def _fuse_family(model: nn.Module, family: Family, wanted: frozenset[str], state: FusedState) -> None:
    def swap(name: str, module: nn.Module, piece: str, apply) -> None:
        state.replaced.append((name, type(module)))
        apply()
        state.pieces[piece] += 1

    tiling = (TILED_MLP_MIN_TOKENS, TILED_MLP_CHUNK_TOKENS) if "tiled_mlp" in wanted else None
    modules = list(model.named_modules())
    for name, module in modules:
        if "rms_norm" in wanted and fusable_norm(module, family.norm):
            swap(name, module, "rms_norm", lambda m=module: fuse_norm(m, family.norm))
        elif "rope" in wanted and fusable_attention(module, family.attention_classes):
            swap(name, module, "rope", lambda m=module: fuse_attention(m))
        elif ("glu" in wanted or tiling) and fusable_mlp(module, family.mlp):
            if "glu" in wanted:
                swap(name, module, "glu", lambda m=module: fuse_mlp(m, family.mlp, tiling))
                if tiling:
                    state.pieces["tiled_mlp"] += 1
    if "residual_add" in wanted:
        for name, module in modules:
            if fusable_decoder(module, family.decoder):
                swap(name, module, "residual_add", lambda m=module: fuse_decoder(m, family.decoder))
    if "linear_cross_entropy" in wanted and fusable_head(model, family):
        swap("", model, "linear_cross_entropy", lambda: fuse_head(model, family))
    if "keep_last_layer" in wanted:
        layers = [(name, m) for name, m in modules if type(m).__name__ in family.decoder.classes]
        if layers and _is_checkpointing_layer(layers[-1][1]):
            name, last = layers[-1]
            swap(name, last, "keep_last_layer", lambda m=last: keep_activations(m))


def _is_checkpointing_layer(module: nn.Module) -> bool:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 5
        return False
    return isinstance(module, GradientCheckpointingLayer)


_PRINTED: set[str] = set()


def _print_once(message: str) -> None:
    """The summary on stderr, once per distinct summary and process (rank 0 only under torchrun)."""
    import os

    if message in _PRINTED or os.environ.get("RANK", "0") != "0":
        return
    _PRINTED.add(message)
    print(message, file=sys.stderr)


def unfuse(model: nn.Module) -> None:
    """Give every module :func:`fuse` changed its class back (a no-op for a model it never changed)."""
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return
    for name, cls in reversed(state.replaced):
        module = model.get_submodule(name) if name else model
        offloaded, kept = is_fused(module, "offload"), is_fused(module, "keep_last_layer")
        module.__class__ = cls
        if offloaded:
            restore_layer(module)
        if kept:
            restore_kept(module)


__all__ += ["is_fused", "original_class"]
