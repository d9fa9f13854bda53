"""Family facts in one place: the model table (:mod:`.families`) and geometry readers (:mod:`.geometry`)."""

from peft_fast.models.families import (
    FAMILIES,
    OUTPUT_HEAD_NAMES,
    Decoder,
    Family,
    Mlp,
    Norm,
    family_for_model_type,
)
from peft_fast.models.geometry import Geometry, geometry, hidden_size, text_config

__all__ = [
    "FAMILIES",
    "OUTPUT_HEAD_NAMES",
    "Decoder",
    "Family",
    "Geometry",
    "Mlp",
    "Norm",
    "family_for",
    "family_for_model_type",
    "geometry",
    "hidden_size",
    "text_config",
]


def family_for(model) -> Family | None:
    """The table's row for a model (its text config's ``model_type``), or None."""
    config = getattr(model, "config", None)
    return None if config is None else family_for_model_type(getattr(text_config(config), "model_type", None))
