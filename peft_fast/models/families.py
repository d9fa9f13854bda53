"""The model table: what peft_fast knows about each Hugging Face family's modelling code, keyed by ``model_type``.

Everything family-specific reads this table: the fused training step (which module classes are the
RMSNorms and with which casting, which MLP layout and activation, which attention modules call
their module's ``apply_rotary_pos_emb``, how a decoder layer adds its residuals, the head's logit
softcapping), the prompt methods (which families PEFT's LLaMA-Adapter supports) and targeting
(output heads). Adding a family is one :class:`Family` row; a family not listed is left as it is.

Facts are those of transformers 5.x (checked against 5.24): class names, the RMSNorm roundings
(Llama's ``weight * x̂.to(input_dtype)`` against Gemma's ``(x̂ * (1 + weight)).to(dtype)`` in fp32),
Phi-3's packed ``gate_up_proj`` and residual dropouts, Gemma 2/3's sandwich norms.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FAMILIES", "OUTPUT_HEAD_NAMES", "Decoder", "Family", "Mlp", "Norm", "family_for_model_type"]

# Module names of output heads, which "all-linear" leaves alone as PEFT does (beside the model's
# get_output_embeddings()).
OUTPUT_HEAD_NAMES = ("lm_head", "embed_out", "output_layer", "score", "classifier")


@dataclass(frozen=True)
class Norm:
    """The family's RMSNorm: classes, the attribute holding eps, and its rounding."""

    classes: tuple[str, ...]
    eps_attr: str
    casting: str  # "llama": weight * x̂.to(input dtype); "gemma": (x̂ * (offset + weight)) in fp32, cast once
    offset: float = 0.0  # Gemma's (1 + weight)


@dataclass(frozen=True)
class Mlp:
    """The gated MLP: classes, its layout and the attribute holding its activation module."""

    classes: tuple[str, ...]
    layout: str  # "gate_up_down": down(act(gate(x)) * up(x)); "packed_gate_up": Phi-3's gate_up_proj halves
    activation_attr: str = "act_fn"


@dataclass(frozen=True)
class Decoder:
    """How a decoder layer adds its residuals (for the residual add fused into the next RMSNorm)."""

    classes: tuple[str, ...]
    layout: str  # "pre_norm": h += attn(norm(h)); h += mlp(norm(h)). "sandwich": Gemma 2/3's post-norms too
    residual_dropouts: tuple[str, str] | None = None  # Phi-3: dropout modules on the attention / MLP output


@dataclass(frozen=True)
class Family:
    """One family's row of the table."""

    name: str
    model_types: tuple[str, ...]
    norm: Norm
    mlp: Mlp
    decoder: Decoder
    attention_classes: tuple[str, ...]  # their forward calls the module-level apply_rotary_pos_emb
    causal_lm_classes: tuple[str, ...]
    logit_softcap_attr: str | None = None  # config attribute of the final-logit softcapping (Gemma 2/3)
    adaption_prompt: bool = False  # PEFT's LLaMA-Adapter supports this family


def _llama_like(name: str, prefix: str, model_type: str, **extra) -> Family:
    """A family laid out as Llama: pre-norm decoder, LlamaRMSNorm rounding, gate/up/down MLP."""
    return Family(
        name=name,
        model_types=(model_type,),
        norm=Norm((f"{prefix}RMSNorm",), "variance_epsilon", "llama"),
        mlp=Mlp((f"{prefix}MLP",), "gate_up_down"),
        decoder=Decoder((f"{prefix}DecoderLayer",), "pre_norm"),
        attention_classes=(f"{prefix}Attention",),
        causal_lm_classes=(f"{prefix}ForCausalLM",),
        **extra,
    )


def _gemma(name: str, prefix: str, model_type: str, decoder_layout: str, **extra) -> Family:
    """A Gemma: (1 + w) RMSNorm in fp32, GeGLU (gelu_pytorch_tanh) MLP."""
    return Family(
        name=name,
        model_types=(model_type,),
        norm=Norm((f"{prefix}RMSNorm",), "eps", "gemma", offset=1.0),
        mlp=Mlp((f"{prefix}MLP",), "gate_up_down"),
        decoder=Decoder((f"{prefix}DecoderLayer",), decoder_layout),
        attention_classes=(f"{prefix}Attention",),
        causal_lm_classes=(f"{prefix}ForCausalLM",),
        **extra,
    )


FAMILIES: tuple[Family, ...] = (
    _llama_like("Llama", "Llama", "llama", adaption_prompt=True),
    _llama_like("Mistral", "Mistral", "mistral", adaption_prompt=True),
    _llama_like("Qwen2", "Qwen2", "qwen2"),
    _llama_like("Qwen3", "Qwen3", "qwen3"),  # its q_norm / k_norm are Qwen3RMSNorms too
    _gemma("Gemma", "Gemma", "gemma", "pre_norm"),
    _gemma("Gemma 2", "Gemma2", "gemma2", "sandwich", logit_softcap_attr="final_logit_softcapping"),
    _gemma("Gemma 3", "Gemma3", "gemma3_text", "sandwich", logit_softcap_attr="final_logit_softcapping"),
    Family(
        name="Phi-3",
        model_types=("phi3",),
        norm=Norm(("Phi3RMSNorm",), "variance_epsilon", "llama"),
        mlp=Mlp(("Phi3MLP",), "packed_gate_up", activation_attr="activation_fn"),
        decoder=Decoder(
            ("Phi3DecoderLayer",), "pre_norm", residual_dropouts=("resid_attn_dropout", "resid_mlp_dropout")
        ),
        attention_classes=("Phi3Attention",),
        causal_lm_classes=("Phi3ForCausalLM",),
    ),
)

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_for_model_type(model_type: str | None) -> Family | None:
    """The table's row for ``config.model_type``, or None for a family peft_fast does not know."""
    return _BY_MODEL_TYPE.get(model_type)
