"""The training loop: batches, the optimizer and schedule, progress, checkpoints, evaluation, ``run_training``."""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from peft_fast import data as data_mod
from peft_fast import distributed
from peft_fast.front_doors import save_adapter
from peft_fast.train.args import CHECKPOINT, Interrupted, TrainArgs, UsageError, check_args, check_output_dir
from peft_fast.train.build import build, is_terminal
from peft_fast.train.checkpoints import (
    CHECKPOINT_OLD,
    CHECKPOINT_STAGING,
    load_checkpoint,
    recover_checkpoint,
    save_checkpoint,
)
from peft_fast.train.resume import (
    moved_data_position,
    read_run_record,
    resume_changes,
    set_learning_rate,
    write_run_record,
)

__all__ = ["evaluate", "run_training"]


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
    check_args(args)
    rank, world = distributed.init()
    if args.offload_activations and world > 1:
        # Its reentrant recompute runs the layer's backward inside DDP's / FSDP's: not checked with either.
        raise UsageError("--offload-activations runs in one process; drop it under torchrun")
    if args.resume:  # a checkpoint swap a kill interrupted: resume from the newest complete copy
        recover_checkpoint(Path(args.output), rank, world)
    out = check_output_dir(args)
    run_record = read_run_record(out) if args.resume else None
    changes = resume_changes(args, run_record, world) if run_record else []
    random.seed(args.seed)
    torch.manual_seed(args.seed)  # the new head's initialisation too
    model, tokenizer, train, evaluation, task, labels = build(args, rank)
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
    # FSDP shards model's parameters in place (a QLoRA model's NF4 base too)
    training_model = distributed.wrap(model, world, args.fsdp, offload=args.fsdp_offload)
    sharded = distributed.is_sharded(model)
    evaluates = rank == 0 or sharded  # under FSDP a forward needs every rank
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    step = micro_step = 0
    global_batch = args.batch_size * world
    if args.resume:
        step, micro_step, saved = load_checkpoint(out, model, optimizer, scheduler)
        old_global = saved.get("global_batch") or (
            run_record["args"].get("batch_size", args.batch_size) * run_record.get("world_size", 1)
            if run_record else global_batch
        )  # fmt: skip
        if old_global != global_batch:
            micro_step = moved_data_position(micro_step, old_global, global_batch, len(train))
        if run_record and float(run_record["args"].get("lr", args.lr)) != float(args.lr):
            set_learning_rate(optimizer, scheduler, args.lr)
        if changes and rank == 0:
            print(f"resuming from step {step} with changed settings: {', '.join(changes)}", flush=True)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite and not args.resume:
            for stale in (out / CHECKPOINT, out / CHECKPOINT_STAGING, out / CHECKPOINT_OLD, out / "log.jsonl"):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        write_run_record(out, args, task, labels, world)
    before = evaluate(model, evaluation, task, pad_id) if step == 0 and evaluates else {}
    if before and rank == 0:
        print(f"before training: {_describe(before)}", flush=True)
    model.train()
    batches = _micro_batches(train, args, rank, world, micro_step)
    # A terminal gets a progress bar; a log file, a pipe or CI gets a line every few steps / seconds.
    interactive = is_terminal(sys.stdout) and is_terminal(sys.stderr)
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
                save_checkpoint(out, model, optimizer, scheduler, step, micro_step, rank, global_batch)
            if stop_requested() or (interrupt_at_step is not None and step == interrupt_at_step):
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        save_checkpoint(out, model, optimizer, scheduler, step, micro_step, rank, global_batch)
        if rank == 0:
            print(f"\ninterrupted at step {step}: checkpoint saved to {out / CHECKPOINT}; "
                  f"continue with --resume", file=sys.stderr)  # fmt: skip
        raise Interrupted(step) from None
    finally:
        stop_requested.close()
    bar.close()
    summary = {"steps": step, "task": task, "output": str(out), "before": before, "labels": labels}
    save_checkpoint(out, model, optimizer, scheduler, step, micro_step, rank, global_batch)
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
