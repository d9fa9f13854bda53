"""Files: atomic writes and a streaming safetensors reader.

Safetensors only: nothing here unpickles. The reader reads one tensor at a time with plain
file reads instead of memory-mapping the whole file, so a tensor's memory is gone once the
caller drops it (mapped pages would stay resident and count against the process).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["atomic_write", "iter_safetensors", "safetensors_files"]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``.

    If the body raises, the temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors file(s) of a checkpoint: a file, or a directory with one file or an index."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"{path} holds no .safetensors file (pickled checkpoints are not read)")
    return found


def _read_header(handle, path: Path) -> tuple[dict, int]:
    raw = handle.read(8)
    if len(raw) != 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", raw)
    if size > _MAX_HEADER_BYTES:
        raise ValueError(f"{path}: not a safetensors file (header of {size} bytes)")
    header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def iter_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of a checkpoint, reading one tensor at a time."""
    for file in safetensors_files(path):
        with open(file, "rb") as handle:
            header, data_start = _read_header(handle, file)
            for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
                begin, end = info["data_offsets"]
                handle.seek(data_start + begin)
                buffer = bytearray(end - begin)
                if handle.readinto(buffer) != len(buffer):
                    raise ValueError(f"{file}: tensor {name} is truncated")
                if not buffer:
                    yield name, torch.empty(info["shape"], dtype=dtype)
                    continue
                yield name, torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])
