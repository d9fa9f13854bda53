"""Saves that cannot mix (issue #18): each failure that used to leave a mixed state, injected.

An adapter is two files renamed one after the other. A SIGKILL between the renames, ENOSPC on the
second rename or two writers interleaving used to leave new weights beside the old
adapter_config.json, which loaded silently with the wrong lora_alpha; killed saves left ``.*.tmp``
files that nothing removed; a checkpoint swap interrupted between its two renames made
``--resume`` say "nothing to resume" with both complete copies on disk. Now the weights carry the
digest of their config (a mixed pair is refused), saves take a lock on the directory, stale
temporaries are removed by the next save, and resume finishes an interrupted swap.

The kill and two-writer cases run in children forked from one helper process that has built the
models once (a fresh interpreter per kill would cost seconds); it uses one thread, so fork is safe.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from test_train import make_tokenizer, write_jsonl
from tiny_models import build

import peft_fast
from peft_fast.prompt_methods import PromptEncoderConfig
from peft_fast.train import TrainArgs, recover_checkpoint, run_training

TESTS = Path(__file__).resolve().parent
MIXED = "were not written together"


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".*.tmp"))


# -- LoRA adapters whose weights say which lora_alpha they were saved with ---------------------


def lora_model(alpha: int) -> torch.nn.Module:
    """A tiny Llama with LoRA (lora_alpha=alpha) whose every LoRA weight equals alpha: a checkable pair."""
    model = peft_fast.patch(
        build("llama"), peft_fast.LoraConfig(r=2, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.fill_(alpha)
    return model


def load_outcome(directory: Path) -> int | str:
    """The alpha of a consistent adapter in ``directory``, or "refused" (the clear error); fails on a mix."""
    try:
        model = peft_fast.load_adapter(build("llama"), directory)
    except ValueError as exc:
        message = str(exc)
        assert MIXED in message, message
        assert str(directory / "adapter_model.safetensors") in message, message
        assert str(directory / "adapter_config.json") in message, message
        return "refused"
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    alphas = {layer.lora_alpha["default"] for layer in layers}
    values = {
        v for layer in layers for w in (layer.lora_A, layer.lora_B) for v in w["default"].weight.unique().tolist()
    }
    assert len(alphas) == 1 and values == alphas, f"a silent mix: config lora_alpha {alphas}, weights {values}"
    return int(alphas.pop())


# -- the helper process: forks children that save (and get killed) -------------------------------

ZYGOTE = r"""
import os, signal, sys, traceback
import torch
import peft_fast
import peft_fast.io
from test_save_safety import lora_model

models = {alpha: lora_model(alpha) for alpha in (8, 16)}


def job(command, directory, alpha, *more):
    alpha = int(alpha)
    if command == "kill-after-first-rename":  # SIGKILL between the weights' and the config's rename
        real = os.replace

        def replace(src, dst):
            real(src, dst)
            os.kill(os.getpid(), signal.SIGKILL)

        os.replace = replace
        peft_fast.save_adapter(models[alpha], directory)
    elif command == "loop":  # alternating alphas until killed
        while True:
            peft_fast.save_adapter(models[alpha], directory)
            alpha = 24 - alpha
    elif command == "save":
        count, locking = int(more[0]), more[1]
        if locking == "unlocked":  # as where no lock can be taken: only the digest guards the pair
            import contextlib

            peft_fast.io.directory_lock = lambda directory, exclusive=True: contextlib.nullcontext(False)
        for _ in range(count):
            peft_fast.save_adapter(models[alpha], directory)


print("ready", flush=True)
for line in sys.stdin:
    pids = []
    for spec in line.split(";"):
        pid = os.fork()
        if pid == 0:
            try:
                job(*spec.split())
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        pids.append(pid)
    print(*pids, flush=True)
    print(*(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids), flush=True)
"""


class Zygote:
    def __init__(self) -> None:
        path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PEFT_FAST_BACKEND": "torch", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=TESTS, env=env)  # fmt: skip
        assert self.proc.stdout.readline().strip() == "ready", "the helper process did not start"

    def start(self, *jobs: str) -> list[int]:
        self.proc.stdin.write(";".join(jobs) + "\n")
        self.proc.stdin.flush()
        return [int(pid) for pid in self.proc.stdout.readline().split()]

    def wait(self) -> list[int]:
        line = self.proc.stdout.readline()
        assert line, "the helper process died"
        return [int(code) for code in line.split()]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    helper = Zygote()
    yield helper
    helper.close()


def test_sigkill_after_the_first_rename_is_refused_and_cleaned(zygote, tmp_path):
    # Before: the kill left the new weights beside the old config, loaded with the wrong lora_alpha,
    # and the config's temporary stayed forever.
    directory = tmp_path / "adapter"
    peft_fast.save_adapter(lora_model(8), directory)
    for alpha in (16, 8, 16):
        (pid,) = zygote.start(f"kill-after-first-rename {directory} {alpha}")
        assert zygote.wait() == [-signal.SIGKILL]
        assert temporaries(directory) and all(f".{pid}." in name for name in temporaries(directory))
        assert load_outcome(directory) == "refused"
        peft_fast.save_adapter(lora_model(alpha), directory)  # the next save: whole again, leftovers gone
        assert temporaries(directory) == []
        assert load_outcome(directory) == alpha


def test_random_sigkills_during_a_save_loop_never_load_a_mix(zygote, tmp_path):
    rng = random.Random(18)
    directory = tmp_path / "adapter"
    outcomes = []
    alpha = 8
    peft_fast.save_adapter(lora_model(alpha), directory)
    for _ in range(24):
        (pid,) = zygote.start(f"loop {directory} {24 - alpha}")
        time.sleep(rng.uniform(0.002, 0.04))
        os.kill(pid, signal.SIGKILL)
        assert zygote.wait() == [-signal.SIGKILL]
        outcomes.append(load_outcome(directory))  # a consistent pair or the clear refusal, never a silent mix
        alpha = 24 - alpha
        peft_fast.save_adapter(lora_model(alpha), directory)
        assert temporaries(directory) == []
        assert load_outcome(directory) == alpha
    assert set(outcomes) <= {8, 16, "refused"}, outcomes


@pytest.mark.parametrize("locking", ["locked", "unlocked"])
def test_two_processes_saving_to_one_directory(zygote, tmp_path, locking):
    directory = tmp_path / "adapter"
    peft_fast.save_adapter(lora_model(8), directory)
    pids = zygote.start(f"save {directory} 8 40 {locking}", f"save {directory} 16 40 {locking}")
    seen = []

    def running(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    while any(running(pid) for pid in pids):
        seen.append(load_outcome(directory))  # read while both write
    assert zygote.wait() == [0, 0]
    final = load_outcome(directory)
    assert temporaries(directory) == []
    if locking == "locked":
        # Writers take turns under the directory's lock and readers take it shared: never half a save.
        assert final in (8, 16) and "refused" not in seen, seen
    else:
        assert final in (8, 16, "refused") and set(seen) <= {8, 16, "refused"}, seen


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    directory = tmp_path / "adapter"
    peft_fast.save_adapter(lora_model(8), directory)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = int(done.stdout), os.getppid()
    names = {
        f".adapter_model.safetensors.{dead}.0badc0de.tmp": False,  # a killed writer's
        f".adapter_config.json.{dead}.0badc0de.tmp": False,
        f".adapter_config.json.{live}.0badc0de.tmp": True,  # a live process's: never removed
        ".adapter_config.json.0123abcd.tmp": True,  # no pid (older peft_fast), modified just now
        ".adapter_model.safetensors.89abcdef.tmp": False,  # no pid, 20 minutes old
        f".notes.txt.{dead}.0badc0de.tmp": True,  # not an adapter file's
    }
    for name in names:
        (directory / name).write_bytes(b"partial")
    old = time.time() - 20 * 60
    os.utime(directory / ".adapter_model.safetensors.89abcdef.tmp", (old, old))
    peft_fast.save_adapter(lora_model(16), directory)
    assert set(temporaries(directory)) == {name for name, kept in names.items() if kept}
    assert load_outcome(directory) == 16


def test_every_atomic_write_sweeps_its_files_stale_temporaries(tmp_path):
    """Not only adapter saves: the run record, checkpoints' JSON and the bench files go through
    atomic_write / atomic_write_files, which remove what killed writers of that file left."""
    from peft_fast.io import atomic_write, atomic_write_files

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    stale = [tmp_path / f".run.json.{dead}.0badc0de.tmp", tmp_path / f".a.bin.{dead}.0badc0de.tmp"]
    kept = tmp_path / f".other.json.{dead}.0badc0de.tmp"  # another file's: not this write's to sweep
    for path in (*stale, kept):
        path.write_bytes(b"partial")
    with atomic_write(tmp_path / "run.json", "w") as handle:
        handle.write("{}")
    assert not stale[0].exists() and stale[1].exists() and kept.exists()
    with atomic_write_files(tmp_path / "a.bin", tmp_path / "b.bin") as (a, b):
        a.write(b"a")
        b.write(b"b")
    assert not stale[1].exists() and kept.exists() and (tmp_path / "a.bin").read_bytes() == b"a"


def test_checkpoint_swap_fsyncs_the_directories(tmp_path, monkeypatch):
    from peft_fast.train import checkpoints

    synced = []
    monkeypatch.setattr(checkpoints, "fsync_directory", lambda d: synced.append(Path(d)))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    checkpoints.save_checkpoint(tmp_path, model, optimizer, scheduler, step=1, micro_step=1)
    assert synced == [tmp_path / checkpoints.CHECKPOINT_STAGING, tmp_path]  # the copy's entries, then the swap
    assert (tmp_path / checkpoints.CHECKPOINT / "trainer_state.json").exists()


def test_safetensors_shapes_reads_the_header_only(tmp_path):
    from safetensors.torch import save_file

    from peft_fast.io import safetensors_shapes

    save_file({"a": torch.zeros(3, 5), "b.c": torch.zeros(7, dtype=torch.int8)}, tmp_path / "w.safetensors")
    assert safetensors_shapes(tmp_path / "w.safetensors") == {"a": [3, 5], "b.c": [7]}
    (tmp_path / "bad.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="not a safetensors file"):
        safetensors_shapes(tmp_path / "bad.safetensors")


def test_fsync_directory_really_syncs(tmp_path, monkeypatch):
    from peft_fast import io

    calls = []
    real = os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: calls.append(os.path.samefile(f"/proc/self/fd/{fd}", tmp_path))
                        or real(fd))  # fmt: skip
    io.fsync_directory(tmp_path)
    assert calls == [True]


# -- ENOSPC on either rename, for every method ---------------------------------------------------

METHOD_PAIRS = {  # (old config, new config): different files, tensors of the same shapes
    "lora": (peft_fast.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"]),
             peft_fast.LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj"])),
    "ia3": (peft_fast.IA3Config(), peft_fast.IA3Config(task_type="CAUSAL_LM")),
    "adapter": (peft_fast.AdapterConfig(bottleneck_size=8),
                peft_fast.AdapterConfig(bottleneck_size=8, non_linearity="gelu")),
    "p-tuning": (PromptEncoderConfig(4, "MLP"), PromptEncoderConfig(4, "LSTM")),
}  # fmt: skip
WEIGHTS = {"adapter": "adapter.safetensors"}


def saved_model(config, seed: int) -> torch.nn.Module:
    model = peft_fast.patch(build("llama"), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("failing", [1, 2], ids=["first-rename", "second-rename"])
@pytest.mark.parametrize("method", list(METHOD_PAIRS))
def test_enospc_on_a_rename_leaves_the_old_adapter_or_a_clear_refusal(tmp_path, monkeypatch, method, failing):
    directory = tmp_path / "adapter"
    old_config, new_config = METHOD_PAIRS[method]
    peft_fast.save_adapter(saved_model(old_config, 0), directory)
    old_files = {p.name: p.read_bytes() for p in directory.iterdir()}
    new_model = saved_model(new_config, 1)
    real_replace, calls = os.replace, {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == failing:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr("peft_fast.io.os.replace", replace)
    with pytest.raises(OSError) as failure:
        peft_fast.save_adapter(new_model, directory)
    monkeypatch.undo()
    assert failure.value.errno == errno.ENOSPC
    assert temporaries(directory) == []  # the failed save removed its own
    if failing == 1:  # nothing renamed: the old adapter, byte for byte, and it loads
        assert {p.name: p.read_bytes() for p in directory.iterdir()} == old_files
        peft_fast.load_adapter(build("llama"), directory)
    else:  # new weights beside the old config: refused, naming both files, the model untouched
        weights = WEIGHTS.get(method, "adapter_model.safetensors")
        assert (directory / weights).read_bytes() != old_files[weights]
        model = build("llama")
        before = {name: p.clone() for name, p in model.state_dict().items()}
        with pytest.raises(ValueError, match=MIXED) as refusal:
            peft_fast.load_adapter(model, directory)
        assert str(directory / weights) in str(refusal.value) and "adapter_config.json" in str(refusal.value)
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())
    peft_fast.save_adapter(new_model, directory)  # with space again: whole
    peft_fast.load_adapter(build("llama"), directory)


def test_files_without_the_digest_and_peft_loading_ours(tmp_path):
    import peft
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "adapter"
    peft_fast.save_adapter(lora_model(8), directory)
    with safe_open(directory / "adapter_model.safetensors", "pt") as handle:
        assert set(handle.metadata()) == {"format", "peft_fast.config_sha256"}
    peft.PeftModel.from_pretrained(build("llama"), directory)  # PEFT ignores the extra metadata
    # A file without the digest (PEFT's own) loads as before, whatever config sits beside it.
    tensors = load_file(directory / "adapter_model.safetensors")
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 8.0}))
    peft_fast.load_adapter(build("llama"), directory)
    # Ours: provenance may be edited by hand (a moved base model), what reads the weights may not.
    peft_fast.save_adapter(lora_model(8), directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/moved"}))
    assert load_outcome(directory) == 8
    (directory / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 16}))
    assert load_outcome(directory) == "refused"


# -- the training job's checkpoint swap -------------------------------------------------------


def fake_copy(directory: Path, step: int, complete: bool = True) -> None:
    directory.mkdir()
    (directory / "trainer_state.safetensors").write_bytes(b"x")
    if complete:
        (directory / "trainer_state.json").write_text(json.dumps({"step": step}))


@pytest.mark.parametrize(
    ("copies", "expected"),
    [
        ({"checkpoint": 2, ".checkpoint.tmp": None}, 2),  # killed while writing the staging copy
        ({"checkpoint": 2, ".checkpoint.tmp": 4}, 4),  # killed after the staging copy was complete
        ({".checkpoint.old": 2, ".checkpoint.tmp": 4}, 4),  # killed between the two renames (the issue)
        ({"checkpoint": 4, ".checkpoint.old": 2}, 4),  # killed before the old copy was removed
        ({".checkpoint.old": 2, ".checkpoint.tmp": None}, 2),  # a later save removed the staging copy
        ({".checkpoint.tmp": 2}, 2),  # the very first swap, killed before its rename
        ({".checkpoint.tmp": None}, None),  # nothing complete: nothing to resume, nothing touched
    ],
)
def test_recovery_takes_the_newest_complete_copy(tmp_path, copies, expected):
    for name, step in copies.items():
        fake_copy(tmp_path / name, step or 0, complete=step is not None)
    result = recover_checkpoint(tmp_path)
    if expected is None:
        assert result is None and sorted(p.name for p in tmp_path.iterdir()) == sorted(copies)
        return
    assert result == tmp_path / "checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # the leftovers are gone
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == expected


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    data = write_jsonl(tmp_path_factory.mktemp("data") / "data.jsonl", "text", count=16)
    return path, data


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the job catches it."""


def test_resume_after_a_swap_interrupted_between_its_renames(tiny_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    model, data = tiny_run

    def args(out: Path, **more) -> TrainArgs:
        return TrainArgs(model=str(model), data=str(data), output=str(out), method="lora", r=4, alpha=8.0, lr=1e-2,
                         max_steps=4, batch_size=8, seq_len=16, save_every=2, progress=False, **more)  # fmt: skip

    run_training(args(tmp_path / "straight"))
    real_replace, swaps = os.replace, {"n": 0}

    def replace(src, dst):
        if Path(src).name == ".checkpoint.tmp" and Path(dst).name == "checkpoint":
            swaps["n"] += 1
            if swaps["n"] == 2:  # the step-4 save: checkpoint -> .checkpoint.old done, staging not yet in place
                raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr("peft_fast.train.checkpoints.os.replace", replace)
    broken = tmp_path / "broken"
    with pytest.raises(Killed):
        run_training(args(broken))
    monkeypatch.undo()
    assert not (broken / "checkpoint").exists()
    assert (broken / ".checkpoint.old").is_dir() and (broken / ".checkpoint.tmp").is_dir()
    # Before: "nothing to resume: .../checkpoint does not exist". Now: the newest complete copy (step 4).
    summary = run_training(args(broken, resume=True))
    logged = [json.loads(line)["step"] for line in (broken / "log.jsonl").read_text().splitlines()]
    assert summary["steps"] == 4 and logged == [1, 2, 3, 4]  # resumed at step 4: no step trained again
    assert sorted(p.name for p in broken.iterdir() if "checkpoint" in p.name) == ["checkpoint"]
    a, b = (
        load_file(tmp_path / "straight" / "adapter_model.safetensors"),
        load_file(broken / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exactly the uninterrupted run's


def test_overwrite_removes_leftover_checkpoint_copies(tiny_run, tmp_path):
    model, data = tiny_run
    out = tmp_path / "run"
    run_training(TrainArgs(model=str(model), data=str(data), output=str(out), method="lora", r=4, alpha=8.0,
                           max_steps=1, batch_size=8, seq_len=16, progress=False))  # fmt: skip
    shutil.copytree(out / "checkpoint", out / ".checkpoint.old")
    state = json.loads((out / ".checkpoint.old" / "trainer_state.json").read_text())
    (out / ".checkpoint.old" / "trainer_state.json").write_text(json.dumps({**state, "step": 99}))
    run_training(TrainArgs(model=str(model), data=str(data), output=str(out), method="lora", r=4, alpha=8.0,
                           max_steps=1, batch_size=8, seq_len=16, progress=False, overwrite=True))  # fmt: skip
    # A later --resume must not pick up the earlier run's copy (step 99).
    assert not (out / ".checkpoint.old").exists()
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 1
