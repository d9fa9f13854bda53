"""Fast stand-ins for the slow studies: each area whose full study is ``@pytest.mark.slow`` keeps a
cheaper guard in the default run here; CI runs the studies too (``python -m pytest -q -m slow``).

| slow study (``-m slow``)                                           | its fast guard                              |
| ---                                                                | ---                                         |
| test_train: 2-process gloo DDP / FSDP match one process, and       | here: DDP and FSDP over a 1-rank gloo group |
| FSDP's Ctrl-C checkpoint resumes in one process and under FSDP     | in this process, the same checks            |
| test_patch_integration: inductor compiles the QLoRA model once     | here: one QLoRA layer, fresh seeds, 1 graph |
| test_hf_trainer: patch hooks Trainer when it is imported later     | here: the same, in this process             |
| test_cli_exits: exit 2 and one line, progress lines, in a process  | here: the same through ``main``             |
| test_quantize_model: streaming quantization's peak RSS             | here: one dense layer weight alive at a time|
| test_train: the demo gains accuracy (30 steps)                     | test_cli_exits: the demo trains 2 steps,    |
|                                                                    | saves, merges (no accuracy)                 |

The 1-rank group runs every line of the DDP / FSDP code paths (wrapping, sharded DTensors,
all-gathered checkpoints, the agreed Ctrl-C, resharding on resume) but no cross-rank arithmetic:
that, and torchrun, stay with the 2-process studies.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import sys
import weakref
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_cli_exits import one_error_line, train_flags
from test_cli_exits import tiny_llama as tiny_llama_dir
from test_train import write_jsonl

import peft_fast
from peft_fast import distributed
from peft_fast.cli import main
from peft_fast.lora import lora_layers
from peft_fast.train import Interrupted, TrainArgs, run_training


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "data.jsonl", "text", count=32)


# -- DDP and FSDP over a 1-rank gloo group, in this process --------------------------------------


@pytest.fixture
def one_rank_group(tmp_path, monkeypatch):
    """A real 1-rank gloo process group, and ``distributed.wrap`` wrapping (DDP, or FSDP with
    ``--fsdp``) as under torchrun, where a lone process's model is trained unwrapped; set the
    yielded ``["wrap"]`` to False to train as a lone process again."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)  # fmt: skip
    state, real_wrap = {"wrap": True}, distributed.wrap
    monkeypatch.setattr(distributed, "wrap", lambda model, world, fsdp, **kw: real_wrap(
        model, 2 if state["wrap"] else world, fsdp, **kw))  # fmt: skip
    try:
        yield state
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(llama_dir, data, tmp_path_factory):
    """``runs(out, **overrides)``: 4 steps (evaluated every 2) of the 2-process studies' run, batch 8;
    ``runs.once(out, **overrides)``: the same, trained the first time a test asks for it."""
    root = tmp_path_factory.mktemp("runs")
    finished: dict[str, Path] = {}

    def train(out: str, interrupt_at_step: int | None = None, **overrides) -> Path:
        settings = {"model": str(llama_dir), "data": str(data), "eval_data": str(data), "output": str(root / out),
                    "method": "lora", "max_steps": 4, "eval_every": 2, "batch_size": 8, "seq_len": 16, "lr": 1e-2,
                    "dropout": 0.0, "seed": 3, "progress": False}  # fmt: skip
        run_training(TrainArgs(**{**settings, **overrides}), interrupt_at_step=interrupt_at_step)
        return root / out

    def once(out: str, **overrides) -> Path:
        if out not in finished:
            finished[out] = train(out, **overrides)
        return finished[out]

    train.root, train.once = root, once
    return train


@pytest.fixture(scope="module")
def single(runs) -> dict[str, Path]:
    """The one-process runs the wrapped ones must match, by method: trained before any process
    group exists (a module fixture is set up before ``one_rank_group``)."""
    assert not torch.distributed.is_initialized()
    return {method: runs(f"single-{method}", method=method) for method in ("lora", "qlora")}


def assert_same_adapter(a_dir: Path, b_dir: Path, tolerance: float) -> None:
    a, b = load_file(a_dir / "adapter_model.safetensors"), load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert float((b[key] - a[key]).norm() / a[key].norm()) <= tolerance, key


def eval_losses(out: Path) -> list[float]:
    return [record["eval_loss"] for record in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if "eval_loss" in record]  # fmt: skip


def test_ddp_over_one_rank_trains_as_one_process(runs, single, one_rank_group, monkeypatch):
    wrapped = []
    real_ddp = torch.nn.parallel.DistributedDataParallel
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda m: wrapped.append(m) or real_ddp(m))
    out = runs("ddp")
    assert len(wrapped) == 1  # trained through DDP (its gradient all-reduce hooks), saved from the inner model
    assert_same_adapter(single["lora"], out, 1e-6)
    assert eval_losses(out) == pytest.approx(eval_losses(single["lora"]), rel=1e-6)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fsdp_over_one_rank_trains_as_one_process(runs, single, one_rank_group, method, monkeypatch):
    import torch.distributed.fsdp

    sharded, real_shard = [], torch.distributed.fsdp.fully_shard
    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard", lambda m, **kw: sharded.append(m) or real_shard(m, **kw))
    out = runs.once(f"fsdp-{method}", method=method, fsdp=True)
    assert len(sharded) == 2  # its one transformer block, then the root: FSDP2 units as under torchrun
    assert_same_adapter(single[method], out, 1e-6)
    losses = eval_losses(single[method])
    assert len(losses) == 2 and losses[1] < losses[0]
    assert eval_losses(out) == pytest.approx(losses, rel=1e-6)  # evaluated through the sharded model


def test_fsdp_ctrl_c_checkpoint_resumes_in_one_process_and_under_fsdp(runs, single, one_rank_group, monkeypatch):
    """A real SIGINT during step 2: the FSDP ranks' agreed stop (the signal only sets a flag), the
    checkpoint of full tensors, then resumed by one process and by FSDP (resharded)."""
    from peft_fast.train import loop

    calls, deferred, memory_mb, handler = [0], [], loop._memory_mb, signal.getsignal(signal.SIGINT)

    def ctrl_c_during_step_2():  # called once per step
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGINT)
            deferred.append(True)  # reached only when the handler deferred the interrupt
        return memory_mb()

    monkeypatch.setattr(loop, "_memory_mb", ctrl_c_during_step_2)
    with pytest.raises(Interrupted):
        runs("broken", fsdp=True)
    monkeypatch.setattr(loop, "_memory_mb", memory_mb)
    broken = runs.root / "broken"
    assert deferred == [True] and signal.getsignal(signal.SIGINT) is handler  # and Ctrl-C is given back
    assert json.loads((broken / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert len((broken / "log.jsonl").read_text().splitlines()) == 2
    assert not (broken / "adapter_model.safetensors").exists()
    shutil.copytree(broken, runs.root / "broken-copy")
    # The checkpoint holds full tensors in the one-process format: a single process continues it ...
    one_rank_group["wrap"] = False
    assert_same_adapter(single["lora"], runs("broken", resume=True, fsdp=False), 1e-6)
    one_rank_group["wrap"] = True
    # ... and so does FSDP, reading its shards out of it: exactly the uninterrupted FSDP run.
    uninterrupted = runs.once("fsdp-lora", method="lora", fsdp=True)
    assert_same_adapter(uninterrupted, runs("broken-copy", resume=True, fsdp=True), 0.0)


def test_micro_batches_split_the_global_batch_between_ranks_in_order():
    """What each rank of a 2-process run trains on: its half of the one-process batch, in order."""
    from peft_fast.train.loop import _micro_batches

    examples = list(range(40))
    args = lambda batch: TrainArgs(model="m", data="d", output="o", batch_size=batch)
    alone = _micro_batches(examples, args(8), 0, 1, 0)
    ranks = [_micro_batches(examples, args(4), rank, 2, 0) for rank in (0, 1)]
    for _ in range(12):  # past an epoch: the same reshuffles too
        step, batch = next(alone)
        (step0, half0), (step1, half1) = next(ranks[0]), next(ranks[1])
        assert step == step0 == step1 and half0 + half1 == batch and len(batch) == 8


# -- torch.compile: fresh dropout seeds reuse the graph ------------------------------------------


def test_compiled_qlora_layer_reuses_its_graph_for_fresh_dropout_seeds():
    """The inductor study's recompile check on one patched QLoRA layer, through aot_eager (the same
    Dynamo graph, no code generation); the whole model under aot_eager is test_patch_integration's."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)  # fmt: skip
    lora = peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], quantize="nf4", lora_dropout=0.1)
    model = peft_fast.patch(transformers.LlamaForCausalLM(config), lora)
    (_, layer), *_ = lora_layers(model)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    layer.train()
    x = torch.randn(2, 8, 64, requires_grad=True)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, backend="aot_eager")
    outputs = []
    for _ in range(2):
        y = compiled(x)
        y.square().sum().backward()
        outputs.append(y.detach())
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not torch.equal(outputs[0], outputs[1])  # the second call did draw a new mask
    assert layer.lora_A["default"].weight.grad is not None
    torch._dynamo.reset()


# -- Trainer hooks arrive with a later import ----------------------------------------------------


def test_patch_does_not_import_trainer_and_hooks_it_on_import(monkeypatch):
    """As in a fresh process: ``patch`` before ``transformers.trainer`` is imported imports nothing,
    and the import that follows brings the wrapped Trainer (through the usual loader).

    The session's own ``transformers.trainer`` is put back afterwards."""
    import transformers.trainer as loaded

    from peft_fast.hf_integration import _TrainerImportHook

    monkeypatch.setattr(transformers, "trainer", loaded)  # the import below rebinds it
    monkeypatch.delitem(sys.modules, "transformers.trainer")
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=64)  # fmt: skip
    peft_fast.patch(transformers.LlamaForCausalLM(config), peft_fast.LoraConfig(r=2, target_modules=["q_proj"]))
    assert "transformers.trainer" not in sys.modules
    assert sum(isinstance(finder, _TrainerImportHook) for finder in sys.meta_path) == 1
    fresh = importlib.import_module("transformers.trainer")
    assert fresh is not loaded
    assert hasattr(fresh.Trainer._load_from_checkpoint, "__peft_fast_original__")
    assert hasattr(fresh.Trainer._load_best_model, "__peft_fast_original__")
    assert type(fresh.__loader__).__name__ == "SourceFileLoader"
    assert not any(isinstance(finder, _TrainerImportHook) for finder in sys.meta_path)


# -- the command line's reported failures and progress lines, through main() ----------------------


def test_reported_failures_exit_2_with_one_line(llama_dir, data, tmp_path, capsys):
    code = main(train_flags(llama_dir, data, tmp_path / "o1", "--target-modules", "nonexistent_proj"))
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "target_modules ['nonexistent_proj'] matches no module of LlamaForCausalLM" in line
    assert not (tmp_path / "o1").exists()
    code = main(["merge", "--adapter", str(tmp_path / "no-such-adapter"), "--output", str(tmp_path / "m")])
    assert code == 2
    expected = f"peft-fast: error: --adapter {tmp_path / 'no-such-adapter'} does not exist"
    assert one_error_line(capsys.readouterr().err) == expected


def test_progress_lines_without_a_terminal(llama_dir, data, tmp_path, capsys):
    assert main(train_flags(llama_dir, data, tmp_path / "o", "--log-every", "2")) == 0
    captured = capsys.readouterr()
    assert re.findall(r"^step (\d)/4: loss", captured.out, re.M) == ["2", "4"], captured.out
    assert "Loading weights" not in captured.err  # transformers' bars are noise in a log too


# -- streaming quantization holds one dense layer at a time -----------------------------------------


def test_checkpoint_quantization_holds_one_dense_layer_weight_at_a_time(tmp_path, monkeypatch):
    """The peak-memory study's bound, structurally: every layer weight read from the checkpoint is
    freed once quantized (at most the current and the previous one alive), none kept after."""
    from peft_fast import quantize as quantize_mod

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      architectures=["LlamaForCausalLM"])  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    real, dense, most_alive = quantize_mod.iter_safetensors, [], [0]

    def tracked(path):
        for key, tensor in real(path):
            if key.endswith("_proj.weight"):
                dense.append(weakref.ref(tensor))
            most_alive[0] = max(most_alive[0], sum(ref() is not None for ref in dense))
            yield key, tensor
            del tensor

    monkeypatch.setattr(quantize_mod, "iter_safetensors", tracked)
    model = peft_fast.quantize_model(tmp_path, progress=False)
    assert len(dense) == sum(isinstance(m, peft_fast.NF4Linear) for m in model.modules()) == 3 * 7
    assert most_alive[0] <= 2, most_alive
    assert all(ref() is None for ref in dense)
