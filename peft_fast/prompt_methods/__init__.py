"""Prompt-based PEFT methods: prompt tuning, prefix tuning, P-tuning and LLaMA-Adapter.

The model keeps its class, as with our LoRA ``patch``: ``model(...)``, ``model.generate(...)``, the HF
Trainer and gradient checkpointing all go through the same object.

- Prompt tuning / P-tuning: a forward pre-hook on the top-level model turns ``input_ids`` into
  ``inputs_embeds`` with the virtual-token embeddings in front, and extends ``attention_mask`` (ones)
  and ``labels`` (-100). Like PEFT, the returned logits cover the virtual positions too.
- Prefix tuning: the same pre-hook fills the model's ``Cache`` (transformers' Cache API) with one
  learned key/value prefix per layer before the first step, and extends the attention mask.
- LLaMA-Adapter: a forward hook on each of the top ``adapter_layers`` self-attention modules adds
  ``o_proj(gate · softmax(q·Pkᵀ/√d)·Pv)``, where Pk, Pv are the k/v projections of the learned
  prompt and ``gate`` starts at zero. The parameters live on the attention module itself, so their
  names are PEFT's (``model.layers.1.self_attn.adaption_prompt``).

Math and file formats follow PEFT 0.21 (``peft/peft_model.py``, ``peft/tuners/{prompt_tuning,
prefix_tuning,p_tuning,adaption_prompt}``). Where we differ on purpose:

- Positions. PEFT drops ``position_ids`` for prompt tuning / P-tuning and lets the model number the
  virtual tokens 0..n-1 and the real tokens after them *including the padding*, so a left-padded
  sequence sees different positions than the same sequence alone. When the caller passes an
  ``attention_mask`` and no ``position_ids`` we derive the positions from the extended mask
  (padding does not advance them), and caller ``position_ids`` are shifted by n instead of dropped.
  Without padding both give the positions PEFT uses, so outputs are equal.
- Generation. PEFT 0.21's ``generate`` looks for ``past_key_values`` / ``cache_position`` in the
  model inputs, which transformers 5.x renamed / removed: with transformers 5.24 its prefix-tuning
  generation ignores the prefix and its prompt-tuning generation re-inserts the virtual tokens at
  every decoding step. We decide "first step or not" from the cache length, so our greedy
  generation equals argmax decoding with PEFT's own (correct) forward.
- Text initialisation longer than ``num_virtual_tokens`` is an error here; PEFT truncates silently.
- Loading a saved adapter gives the saved ``prompt_embeddings`` directly (PEFT's inference mode):
  the prefix MLP / P-tuning encoder are a training-time reparameterisation PEFT does not save.
- Encoder-decoder models (T5) are not supported by prompt / prefix / P-tuning here: ``patch_prompt``
  refuses them with a clear error (GPT-2 and Llama-family decoders are covered).
"""

from peft_fast.prompt_methods.base import PEFT_VERSION as PEFT_VERSION
from peft_fast.prompt_methods.base import PromptEncoder as PromptEncoder
from peft_fast.prompt_methods.files import load_prompt_adapter, prompt_adapter_state_dict, save_prompt_adapter
from peft_fast.prompt_methods.llama_adapter import AdaptionPromptConfig, adaption_prompt_attention
from peft_fast.prompt_methods.p_tuning import PromptEncoderConfig
from peft_fast.prompt_methods.patching import (
    disable_prompt_adapter,
    patch_prompt,
    trainable_prompt_parameters,
    unpatch_prompt,
)
from peft_fast.prompt_methods.prefix_tuning import PrefixTuningConfig
from peft_fast.prompt_methods.prompt_tuning import PromptTuningConfig
from peft_fast.prompt_methods.state import PromptConfig as PromptConfig
from peft_fast.prompt_methods.state import _state as _state

__all__ = [
    "AdaptionPromptConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "adaption_prompt_attention",
    "disable_prompt_adapter",
    "load_prompt_adapter",
    "patch_prompt",
    "prompt_adapter_state_dict",
    "save_prompt_adapter",
    "trainable_prompt_parameters",
    "unpatch_prompt",
]
