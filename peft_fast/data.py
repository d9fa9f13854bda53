"""Training data: jsonl reading with clear errors, tokenisation with loss masks, packing, batching.

Record formats (one per file, decided by the first record):

- ``{"text": ...}``: language modelling on every token;
- ``{"prompt": ..., "completion": ...}``: loss on the completion tokens only;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: the tokenizer's chat template, loss on
  the assistant turns only;
- ``{"text": ..., "label": ...}``: sequence classification (the embedded demo).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DataError", "Example", "collate", "demo_records", "pack", "read_jsonl", "record_format", "tokenize"]

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding, user turns)
DEMO_DATA = Path(__file__).resolve().parent / "demo_data" / "intents.jsonl"


class DataError(ValueError):
    """A data file the trainer cannot use; the message names the file (and line)."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | int  # per-token labels (LM) or one class index (classification)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a jsonl file; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: a record must be a JSON object, got {type(record).__name__}")
            records.append(record)
    if not records:
        raise DataError(f"data file {path} is empty")
    return records


def _format_of(record: dict) -> str | None:
    if isinstance(record.get("messages"), list):
        return "messages"
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return "prompt_completion"
    if isinstance(record.get("text"), str):
        return "classification" if "label" in record else "text"
    return None


def record_format(records: list[dict], path: str | os.PathLike = "data") -> str:
    """The one format all records share; a record that does not fit is an error naming its line."""
    expected = _format_of(records[0])
    for number, record in enumerate(records, start=1):
        found = _format_of(record)
        if found is None:
            raise DataError(f"{path}: record {number} has none of the fields text, prompt+completion, or messages")
        if found != expected:
            raise DataError(f"{path}: record {number} is {found!r} but the first record is {expected!r}")
    return expected


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in transformers 5


def _chat_example(messages: list[dict], tokenizer, seq_len: int) -> Example:
    """Tokens of the rendered chat; labels only on assistant turns (found by rendering prefixes)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("messages records need a tokenizer with a chat template")
    ids = _chat_ids(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    for turn, message in enumerate(messages):
        if message.get("role") == "assistant":
            start = len(_chat_ids(tokenizer, messages[:turn], generation_prompt=True))
            end = len(_chat_ids(tokenizer, messages[: turn + 1]))
            labels[start:end] = ids[start:end]
    return Example(ids[:seq_len], labels[:seq_len])


def tokenize(records: list[dict], fmt: str, tokenizer, seq_len: int, label_names: list[str] | None = None):
    """Examples for ``fmt``; for classification ``label_names`` maps labels to class indices."""
    examples = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for record in records:
        if fmt == "classification":
            ids = tokenizer(record["text"], truncation=True, max_length=seq_len)["input_ids"]
            examples.append(Example(ids, label_names.index(str(record["label"]))))
        elif fmt == "text":
            ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"] + eos
            examples.append(Example(ids[:seq_len], ids[:seq_len]))
        elif fmt == "prompt_completion":
            prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
            completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + eos
            ids = (prompt + completion)[:seq_len]
            labels = ([IGNORE_INDEX] * len(prompt) + completion)[:seq_len]
            examples.append(Example(ids, labels))
        else:
            examples.append(_chat_example(record["messages"], tokenizer, seq_len))
    return examples


def tokenize_seq2seq(records: list[dict], fmt: str, tokenizer, seq_len: int) -> list[Example]:
    """Encoder input / decoder labels for T5-style models: prompt -> completion records only."""
    if fmt != "prompt_completion":
        raise DataError("seq2seq models train on prompt/completion records")
    examples = []
    for record in records:
        source = tokenizer(record["prompt"], truncation=True, max_length=seq_len)["input_ids"]
        target = tokenizer(record["completion"], truncation=True, max_length=seq_len)["input_ids"]
        examples.append(Example(source, target))
    return examples


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Concatenate LM examples into rows of exactly ``seq_len`` tokens (the tail is dropped)."""
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        ids += example.input_ids
        labels += example.labels
    rows = len(ids) // seq_len
    return [Example(ids[i * seq_len : (i + 1) * seq_len], labels[i * seq_len : (i + 1) * seq_len]) for i in range(rows)]


def collate(examples: list[Example], pad_id: int, seq2seq: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask and labels (padding never carries loss)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        attention[row, : len(example.input_ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention}
    if isinstance(examples[0].labels, int):
        batch["labels"] = torch.tensor([e.labels for e in examples])
    else:
        label_width = max(len(e.labels) for e in examples) if seq2seq else width
        labels = torch.full((len(examples), label_width), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            labels[row, : len(example.labels)] = torch.tensor(example.labels)
        batch["labels"] = labels
    return batch


def demo_records() -> tuple[list[dict], list[dict]]:
    """(train, test) records of the embedded intent-classification data set."""
    records = read_jsonl(DEMO_DATA)
    return [r for r in records if r["split"] == "train"], [r for r in records if r["split"] == "test"]
