"""The ``peft-fast`` command line: ``train``, ``merge``, ``bench`` and ``info``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import torch

from peft_fast import __version__


def nf4_self_check(device: str, seconds: float = 1.0) -> dict[str, float | bool | int]:
    """Quantize/dequantize random weights for about ``seconds``; check error and idempotence.

    A round trip of an N(0, 1) weight through NF4 has a relative error near 0.1; quantizing the
    dequantized weight again must reproduce the very same bytes.
    """
    from peft_fast.nf4 import dequantize_nf4, quantize_nf4

    generator = torch.Generator().manual_seed(0)
    start, rounds, worst, idempotent = time.perf_counter(), 0, 0.0, True
    while rounds == 0 or time.perf_counter() - start < seconds:
        weight = torch.randn(256, 320, generator=generator).to(device)
        nf4 = quantize_nf4(weight, blocksize=64, double_quant=rounds % 2 == 0)
        restored = dequantize_nf4(nf4, torch.float32)
        worst = max(worst, float((restored - weight).norm() / weight.norm()))
        again = quantize_nf4(restored, blocksize=64, double_quant=nf4.double_quant)
        idempotent &= torch.equal(again.packed, nf4.packed)
        rounds += 1
    return {"rounds": rounds, "max_relative_error": worst, "idempotent": idempotent, "ok": idempotent and worst < 0.15}


def triton_self_check(device: str) -> str:
    """Compare the Triton dequantization kernel with the torch path, where a backend exists."""
    from peft_fast.ops import backend_name

    if backend_name(device) == "torch-cpu":
        return "skipped (no CUDA; set PEFT_FAST_BACKEND=triton to use the interpreter)"
    from peft_fast.kernels.nf4_dequant import dequantize_nf4_triton
    from peft_fast.nf4 import dequantize_nf4, quantize_nf4

    nf4 = quantize_nf4(torch.randn(64, 320, device=device), blocksize=64, double_quant=True)
    same = all(
        torch.equal(dequantize_nf4_triton(nf4, dtype), dequantize_nf4(nf4, dtype))
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
    )
    return "bit-exact with the torch path" if same else "MISMATCH with the torch path"


def cmd_info(args: argparse.Namespace) -> int:
    from peft_fast.ops import backend_name

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"peft-fast {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}", end="")
    try:
        import triton

        print(f", triton {triton.__version__}", end="")
    except ImportError:
        print(", triton not installed", end="")
    import transformers

    print(f", transformers {transformers.__version__}")
    print(f"backend: {backend_name(device)}")
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads)")
    check = nf4_self_check(device, seconds=args.seconds)
    print(
        f"NF4 round trip: {check['rounds']} rounds, max relative error {check['max_relative_error']:.4f}, "
        f"re-quantization {'identical' if check['idempotent'] else 'DIFFERENT'}: {'ok' if check['ok'] else 'FAILED'}"
    )
    print(f"NF4 Triton kernel: {triton_self_check(device)}")
    return 0 if check["ok"] else 1


def _train_args(args: argparse.Namespace):
    """TrainArgs from defaults, then the --config file, then the flags given (flags win)."""
    from peft_fast.train import TrainArgs, UsageError, read_settings_file

    config_file = getattr(args, "config", None)
    settings = read_settings_file(config_file) if config_file else {}
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config")}
    settings.update(flags)
    if settings.get("resume"):
        settings = _resumed_settings(settings)
    known = {f.name for f in dataclasses.fields(TrainArgs)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UsageError(f"unknown setting(s) {unknown}")
    if isinstance(settings.get("target_modules"), str) and settings["target_modules"] != "all-linear":
        settings["target_modules"] = [t for t in settings["target_modules"].split(",") if t]
    if settings.get("model") is None and settings.get("data") is None:
        return TrainArgs.demo(**{k: v for k, v in settings.items() if k not in ("model", "data")})
    return TrainArgs(**settings)


def _resumed_settings(settings: dict) -> dict:
    """``--resume``: the run record's settings under the ones given (file or flags).

    So ``peft-fast train --output out --resume`` continues the run as it was; a setting given
    that differs is then a real change, refused or reported by ``run_training``.
    """
    from peft_fast.train import NOT_RECORDED, TrainArgs, read_run_record

    output = settings.get("output")
    record = read_run_record(output) if output else None
    if record is None:
        return settings
    known = {f.name for f in dataclasses.fields(TrainArgs)}
    base = {k: v for k, v in record["args"].items() if k in known and k not in NOT_RECORDED}
    if "batch_size" not in settings and "batch_size" in base:
        # The same examples per step under another number of processes (torchrun sets WORLD_SIZE).
        old_global = base["batch_size"] * record.get("world_size", 1)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if old_global % world == 0:
            base["batch_size"] = old_global // world
    return {**base, **settings}


def cmd_train(args: argparse.Namespace) -> int:
    from peft_fast.train import Interrupted, run_training

    train_args = _train_args(args)
    try:
        summary = run_training(train_args)
    except Interrupted:
        return 130
    if summary.get("before", {}).get("accuracy") is not None and summary.get("after"):
        gain = summary["after"]["accuracy"] - summary["before"]["accuracy"]
        print(f"held-out accuracy: {100 * summary['before']['accuracy']:.1f}% -> "
              f"{100 * summary['after']['accuracy']:.1f}% ({100 * gain:+.1f} points)")  # fmt: skip
    out = summary["output"]
    print(f"adapter saved to {out} (HF PEFT format: adapter_config.json + adapter_model.safetensors)")
    from peft_fast.train import demo_model_dir

    base = train_args.model or str(demo_model_dir())
    classes = f", num_labels={len(summary['labels'])}" if summary["task"] == "classification" else ""
    head = "AutoModelForSequenceClassification" if summary["task"] == "classification" else "AutoModelForCausalLM"
    print("load it with PEFT:")
    print(f"    base = transformers.{head}.from_pretrained({base!r}{classes})")
    print(f"    model = peft.PeftModel.from_pretrained(base, {out!r})")
    print(f"or with peft_fast: peft_fast.load_adapter(base, {out!r})")
    return 0


# PEFT's task types -> the transformers auto class of the model an adapter was trained on.
_TASK_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
_HEADS = ("classifier", "score")  # modules_to_save of a sequence classifier (transformers' names)


def _head_rows(adapter_dir: Path, config: dict) -> int | None:
    """Rows of the trained classification head in the adapter file (= num_labels), if it has one."""
    from peft_fast.adapter_files import ADAPTER_WEIGHTS
    from peft_fast.io import safetensors_shapes

    try:
        shapes = safetensors_shapes(adapter_dir / ADAPTER_WEIGHTS)
    except (OSError, ValueError, KeyError, TypeError):  # a damaged file is reported by load_adapter, with its name
        return None
    for head in [h for h in config.get("modules_to_save") or () if h.split(".")[-1] in _HEADS]:
        for suffix in ("out_proj.weight", "weight"):  # RoBERTa-style heads end in out_proj
            for key, shape in shapes.items():
                if key.endswith(f"{head}.{suffix}") and len(shape) == 2:
                    return int(shape[0])
    return None


def _merge_base(args: argparse.Namespace, record: dict | None, adapter_config: dict) -> Path:
    """The base model directory: --model, else the run record's, else adapter_config.json's."""
    from peft_fast.train import UsageError, demo_model_dir

    if args.model:
        return Path(args.model)
    if record is not None:
        if record.get("base_model") and Path(record["base_model"]).is_dir():
            return Path(record["base_model"])
        if record["args"].get("model") is None:
            return demo_model_dir()
        return Path(record["args"]["model"])
    named = adapter_config.get("base_model_name_or_path")
    if isinstance(named, str) and Path(named).is_dir():
        return Path(named)
    raise UsageError(
        f"--adapter {args.adapter} names no base model directory that exists here (base_model_name_or_path "
        f"{named!r}); pass --model DIR"
    )


def _merge_class(record: dict | None, adapter_config: dict, adapter_dir: Path, config) -> tuple[str, dict]:
    """(transformers class name, from_pretrained keyword arguments) of the model the adapter was trained on.

    The run record our train job writes decides (its task and labels); else adapter_config.json's
    task type, a classification head among modules_to_save, then config.json's architecture.
    """
    import transformers

    from peft_fast.train import TASK_TYPES, label_names

    labels = record.get("labels") if record else None
    task_type = TASK_TYPES.get(record.get("task")) if record else None
    task_type = task_type or adapter_config.get("task_type")
    heads = [h for h in adapter_config.get("modules_to_save") or () if h.split(".")[-1] in _HEADS]
    if task_type is None and heads:
        task_type = "SEQ_CLS"
    if task_type in _TASK_CLASSES:
        kwargs: dict = {}
        if task_type in ("SEQ_CLS", "TOKEN_CLS"):
            rows = len(labels) if labels else _head_rows(adapter_dir, adapter_config)
            if rows:
                kwargs = {"num_labels": rows, **label_names(labels)}
        return _TASK_CLASSES[task_type], kwargs
    architecture = (getattr(config, "architectures", None) or [None])[0]
    if architecture and hasattr(transformers, architecture):
        return architecture, {}
    return ("AutoModelForSeq2SeqLM" if getattr(config, "is_encoder_decoder", False) else "AutoModelForCausalLM"), {}


def cmd_merge(args: argparse.Namespace) -> int:
    """Rebuild the model the adapter was trained on, fold the adapter in, save a plain checkpoint."""
    import transformers

    from peft_fast.adapter_files import ADAPTER_CONFIG
    from peft_fast.io import read_json, respect_umask
    from peft_fast.train import (
        UsageError,
        first_line,
        load_model_config,
        no_bars_without_terminal,
        quiet_transformers,
        read_run_record,
    )

    adapter_dir, out = Path(args.adapter), Path(args.output)
    if not adapter_dir.is_dir():
        what = "is a file, not an adapter directory" if adapter_dir.exists() else "does not exist"
        raise UsageError(f"--adapter {adapter_dir} {what}")
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise UsageError(f"--adapter {adapter_dir} holds no {ADAPTER_CONFIG}: not an adapter directory")
    try:
        adapter_config = read_json(adapter_dir / ADAPTER_CONFIG)
    except (OSError, ValueError) as exc:
        raise UsageError(first_line(exc)) from None
    record = read_run_record(adapter_dir)
    model_dir = _merge_base(args, record, adapter_config)
    config = load_model_config(model_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"output directory {out} is not empty; pass --overwrite")
    class_name, kwargs = _merge_class(record, adapter_config, adapter_dir, config)
    peft_type = adapter_config.get("peft_type")
    if peft_type not in ("LORA", "IA3"):
        what = f"{peft_type} adapter" if peft_type else "bottleneck adapter"
        raise UsageError(f"--adapter {adapter_dir} is a {what}; only LoRA and (IA)³ fold into the weights")
    try:
        # A classification head absent from the base is expected: the adapter holds it.
        with quiet_transformers(), no_bars_without_terminal():
            model = getattr(transformers, class_name).from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load {model_dir} as {class_name} ({first_line(exc)})") from None
    from peft_fast import load_adapter, merge

    try:
        load_adapter(model, adapter_dir)
        merged = merge(model)  # any mergeable method ((IA)³ or LoRA)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(
            f"--adapter {adapter_dir} does not fit {model_dir} as {class_name}: {first_line(exc)}"
        ) from None
    with no_bars_without_terminal():
        merged.save_pretrained(out, safe_serialization=True)
    respect_umask(*out.glob("*.safetensors"))  # safetensors creates its files 0600
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                 "tokenizer.model", "vocab.json", "merges.txt"):  # fmt: skip
        if (model_dir / name).is_file():
            (out / name).write_bytes((model_dir / name).read_bytes())
    print(f"merged model written to {out} (plain {type(merged).__name__} from {model_dir}, safetensors)")
    return 0


def _add_train_flags(train: argparse.ArgumentParser) -> None:
    from peft_fast.train import METHOD_NAMES

    flag = lambda *names, **kw: train.add_argument(*names, default=argparse.SUPPRESS, **kw)
    flag("--model", help="Hugging Face checkpoint directory (default: the embedded MiniLM demo)")
    flag("--data", help="jsonl with text, prompt/completion or messages records")
    flag("--eval-data", dest="eval_data", help="held-out jsonl in the same format")
    flag(
        "--method",
        choices=METHOD_NAMES,
        help="qlora (NF4 base; default), lora, adapter (bottleneck; --r is its width), ia3, or a prompt method",
    )
    flag("--num-virtual-tokens", dest="num_virtual_tokens", type=int, help="prompt methods: virtual tokens")
    flag("--r", type=int, help="LoRA rank")
    flag("--alpha", type=float, help="LoRA alpha (scale = alpha / r)")
    flag("--dropout", type=float, help="LoRA dropout")
    flag("--target-modules", dest="target_modules", help="comma-separated names, or all-linear")
    flag("--lr", type=float, help="learning rate")
    flag("--epochs", type=float, help="epochs over the data")
    flag("--max-steps", dest="max_steps", type=int, help="optimizer steps (overrides --epochs)")
    flag("--batch-size", dest="batch_size", type=int, help="examples per process per micro-batch")
    flag("--grad-accum", dest="grad_accum", type=int, help="micro-batches per optimizer step")
    flag("--seq-len", dest="seq_len", type=int, help="maximum tokens per example")
    flag("--packing", action="store_true", help="pack examples into full --seq-len rows")
    flag("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true")
    flag("--output", help="output directory")
    flag("--resume", action="store_true", help="continue from <output>/checkpoint")
    flag("--overwrite", action="store_true", help="replace an existing output directory")
    flag("--seed", type=int)
    flag(
        "--log-every",
        dest="log_every",
        type=int,
        help="without a terminal (a log file, a pipe, CI): a progress line every N steps (default 50; 0: off)",
    )
    flag(
        "--log-every-seconds",
        dest="log_every_seconds",
        type=float,
        help="... and at least every S seconds (default 10; 0: off); a terminal gets a progress bar instead",
    )
    flag("--eval-every", dest="eval_every", type=int, help="evaluate every N steps")
    flag("--save-every", dest="save_every", type=int, help="checkpoint every N steps")
    flag("--fsdp", action="store_true",
         help="under torchrun: FSDP2 instead of DDP, sharding parameters, gradients and optimizer state "
              "(one unit per transformer block, then the root), a QLoRA model's NF4 base too; every --method; "
              "in one process: ignored, it trains as usual")  # fmt: skip
    flag("--fsdp-offload", dest="fsdp_offload", action="store_true",
         help="with --fsdp: keep the shards (NF4 base, LoRA parameters, gradients, Adam state) in host memory, "
              "copied to the GPU per block (FSDP2's CPUOffloadPolicy)")  # fmt: skip
    flag("--fuse", help="the fused training step for Llama / Mistral / Qwen2 / Qwen3 / Gemma / Gemma 2 / 3 / Phi-3: "
         "all (default), none, or comma-separated pieces (rms_norm, residual_add, rope, glu, tiled_mlp, "
         "linear_cross_entropy)")  # fmt: skip
    flag("--offload-activations", dest="offload_activations", action="store_true",
         help="keep each checkpointed layer's input in host memory until its backward (implies "
              "--gradient-checkpointing; one process)")  # fmt: skip
    train.add_argument("--config", help="yaml or json file of settings; flags given override it")


def cmd_bench(args: argparse.Namespace) -> int:
    from peft_fast.benchmark import SUITES, run_benchmarks, write_results
    from peft_fast.train import UsageError

    suites = tuple(args.suites.split(",")) if args.suites else None
    unknown = sorted(set(suites or ()) - set(SUITES))
    if unknown:
        raise UsageError(f"unknown --suites {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    # Results are rewritten after every suite: a run cut short by a time limit keeps what it measured.
    rows = run_benchmarks(quick=args.quick, suites=suites, after_suite=lambda rows: write_results(rows, args.out))
    paths = write_results(rows, args.out)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    failed = [row["impl"] for row in rows if row["op"] == "suite_error"]
    if failed:
        print(f"failed suites: {', '.join(failed)} (see suite_error rows)", file=sys.stderr)
    return 1 if failed else 0


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line naming the problem, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="peft-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune with LoRA / QLoRA (no arguments: the embedded demo)")
    _add_train_flags(train)
    train.set_defaults(func=cmd_train)
    merge = sub.add_parser("merge", help="fold an adapter into its base model: a plain HF checkpoint")
    merge.add_argument(
        "--model", help="the base checkpoint (default: the one the adapter was trained on, from its run record)"
    )
    merge.add_argument("--adapter", required=True, help="the adapter directory (a peft-fast train --output)")
    merge.add_argument("--output", required=True, help="where the merged checkpoint goes")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    merge.set_defaults(func=cmd_merge)
    bench = sub.add_parser("bench", help="peft_fast vs PEFT + bitsandbytes: kernels, layers, memory, train step")
    bench.add_argument("--quick", action="store_true", help="one shape, two batch sizes (a few minutes on CPU)")
    bench.add_argument("--out", type=Path, default=Path("bench/results"), help="where JSON, markdown and PNG go")
    bench.add_argument(
        "--suites", help="comma-separated: dequantize,lora_linear,saved_bytes,train_step,quantize_memory,step_model"
    )
    bench.set_defaults(func=cmd_bench)
    info = sub.add_parser("info", help="versions, backend, device and an NF4 self-check")
    info.add_argument("--seconds", type=float, default=1.0, help="how long the NF4 self-check runs")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    from peft_fast.data import DataError
    from peft_fast.train import UsageError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, one line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except (UsageError, DataError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message holds
        print(f"peft-fast: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the training loop (which saves a checkpoint first)
        print("peft-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
