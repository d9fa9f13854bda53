"""Files: atomic writes and a streaming safetensors reader.

Safetensors only: nothing here unpickles. The reader reads one tensor at a time with plain
file reads instead of memory-mapping the whole file, so a tensor's memory is gone once the
caller drops it (mapped pages would stay resident and count against the process).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "atomic_write",
    "atomic_write_files",
    "current_umask",
    "iter_safetensors",
    "read_json",
    "respect_umask",
    "safetensors_files",
]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _create_temporary(path: Path) -> tuple[int, str]:
    """Create a new, empty temporary file beside ``path``: ``(fd, name)``.

    Unlike ``tempfile.mkstemp`` (always mode 0600) the file is created with mode 0666 and the
    kernel applies the process's umask (and a default ACL, if any), like any file a program
    writes with ``open``: an adapter saved under umask 022 is readable by the team and by a
    serving process. Reading the umask is not needed, so nothing races with other threads.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        name = os.path.join(path.parent, f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: /proc).

    ``os.umask`` can only be read by setting it; that fallback (set, then restore at once,
    under a lock) is used only where /proc/self/status has no Umask line.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def respect_umask(*paths: str | os.PathLike) -> None:
    """Give files another library created 0600 (safetensors' ``save_file`` does) mode 0666 less the umask.

    What ``open`` would have given them: readable by the group or everyone when the umask allows.
    """
    mode = 0o666 & ~current_umask()
    for path in paths:
        os.chmod(path, mode)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``.

    If the body raises, the temporary file is removed and ``path`` keeps its old content. The
    file's mode is 0666 less the umask, as for ``open``; missing parent directories are made
    with 0777 less the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
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


@contextlib.contextmanager
def atomic_write_files(*paths: str | os.PathLike) -> Iterator[list]:
    """:func:`atomic_write` for files that belong together (an adapter's weights and its config).

    Yields one binary handle per path. Every temporary is complete and fsynced before the first
    rename, so a failure while writing any of them leaves all the old files in place (nested
    ``atomic_write`` contexts would rename the inner file before the outer one is even fsynced,
    and a failure then leaves a new adapter_config.json beside the old weights).
    """
    paths = [Path(path) for path in paths]
    temps: list[str] = []
    handles: list = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = _create_temporary(path)
            temps.append(tmp)
            handles.append(os.fdopen(fd, "wb"))
        yield handles
        for handle in handles:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        for tmp, path in zip(temps, paths, strict=True):
            os.replace(tmp, path)
    except BaseException:
        for handle in handles:
            with contextlib.suppress(OSError):
                handle.close()
        for tmp in temps:
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
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index} has no valid weight_map (tensor name -> shard file)")
        shards = [path / name for name in sorted(set(weight_map.values()))]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are missing from {path}: {', '.join(missing[:5])}")
        return shards
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"{path} holds no .safetensors file (pickled checkpoints are not read)")
    return found


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a ValueError naming the file when it is not one."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(document).__name__}")
    return document


def _read_header(handle, path: Path) -> tuple[dict, int]:
    raw = handle.read(8)
    if len(raw) != 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", raw)
    if size > _MAX_HEADER_BYTES:
        raise ValueError(f"{path}: not a safetensors file (header of {size} bytes)")
    try:
        header = json.loads(handle.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    for name, info in header.items():
        _check_header_entry(path, name, info)
    return header, 8 + size


def _check_header_entry(path: Path, name: str, info) -> None:
    """A tensor entry must be {dtype, shape, data_offsets} with a byte range that fits its shape."""
    try:
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        shape, (begin, end) = [int(d) for d in info["shape"]], info["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{path}: tensor {name} has a malformed header entry {info!r}") from None
    if dtype is None:
        raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    expected = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if any(d < 0 for d in shape) or not isinstance(begin, int) or not 0 <= begin <= end or end - begin != expected:
        raise ValueError(f"{path}: tensor {name} has data_offsets {info['data_offsets']} that do not fit shape {shape}")


def iter_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of a checkpoint, reading one tensor at a time."""
    for file in safetensors_files(path):
        with open(file, "rb") as handle:
            header, data_start = _read_header(handle, file)
            for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                begin, end = info["data_offsets"]
                handle.seek(data_start + begin)
                buffer = bytearray(end - begin)
                if handle.readinto(buffer) != len(buffer):
                    raise ValueError(f"{file}: tensor {name} is truncated")
                if not buffer:
                    yield name, torch.empty(info["shape"], dtype=dtype)
                    continue
                yield name, torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])


# -- adapters in Hugging Face PEFT's layout ------------------------------------------------

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


def adapter_state_dict(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for ``adapter_name``, under PEFT's key names (no adapter name)."""
    from peft_fast.patch import _matches_modules_to_save, _require_state, lora_layers

    config = _require_state(model).configs[adapter_name]
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            out[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            out[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
    if config.bias != "none":
        lora_names = {name for name, _ in lora_layers(model)}
        for name, param in model.named_parameters():
            owner = name.removesuffix(".base_layer.bias")
            if name.endswith(".bias") and (config.bias == "all" or owner in lora_names):
                out[_PEFT_PREFIX + name] = param
    for name, module in model.named_modules():
        if _matches_modules_to_save(name, config.modules_to_save):
            for param_name, param in module.named_parameters():
                out[f"{_PEFT_PREFIX}{name}.{param_name}"] = param
    return {key: value.detach().contiguous().cpu() for key, value in out.items()}


def save_adapter(model, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as HF PEFT does.

    Both files are written to temporaries first and renamed into place only when both are
    complete, so an interrupted save leaves the previous adapter intact.
    """
    from safetensors.torch import save as safetensors_bytes

    from peft_fast.patch import _require_state, _state

    directory = output_directory(directory)
    if _state(model) is None:
        return _save_other_method(model, directory, adapter_name)
    state = _require_state(model)
    adapter_name = adapter_name or state.active[0]
    if adapter_name not in state.configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has {list(state.configs)}")
    config = state.configs[adapter_name]
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config_json = json.dumps(config.to_peft_dict(base_name), indent=2, sort_keys=True, default=str) + "\n"
    weights = safetensors_bytes(adapter_state_dict(model, adapter_name), metadata={"format": "pt"})
    # Both temporaries are complete (and fsynced) before either replaces its target.
    with atomic_write_files(directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG) as (weights_file, config_file):
        weights_file.write(weights)
        config_file.write(config_json.encode())
    return directory


def output_directory(directory: str | os.PathLike) -> Path:
    """``directory`` as a Path; a clear error when it names an existing file (saves write a directory)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory {str(directory)!r} is an existing file; adapters are saved into a directory")
    return directory


def adapter_directory(directory: str | os.PathLike) -> Path:
    """``directory`` as a Path, which must be an existing directory (an adapter to load)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"no adapter directory at {directory}")
    if not directory.is_dir():
        raise ValueError(f"{directory} is a file; give the adapter's directory (with {ADAPTER_CONFIG})")
    return directory


def read_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter's safetensors file: floating point, or a ValueError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt?): {exc}") from None
    not_float = [f"{key} ({t.dtype})" for key, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        # copy_ would cast them silently (int adapter weights are certainly not what was trained).
        raise ValueError(f"{path}: adapter tensors must be floating point; got {', '.join(not_float[:5])}")
    return tensors


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, tensors) of a PEFT-format adapter directory."""
    directory = adapter_directory(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {ADAPTER_CONFIG}")
    if not weights_path.is_file():
        pickled = directory / "adapter_model.bin"
        if pickled.is_file():
            raise ValueError(f"{pickled} is a pickle; peft_fast loads safetensors adapters only")
        raise FileNotFoundError(f"{directory} has no {ADAPTER_WEIGHTS}")
    return read_json(config_path), read_adapter_tensors(weights_path)


def load_adapter(model, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False):
    """Load a PEFT-format adapter into ``model`` (patching it, or adding an adapter).

    LoRA is handled here; (IA)³, prompt-method and bottleneck-adapter directories go to their
    own loaders (chosen by adapter_config.json).

    Refuses, before touching the model, an adapter whose config PEFT features we cannot run,
    whose target modules are absent, or whose tensors disagree with the model's shapes or the
    config's rank. Returns the model.
    """
    from peft_fast.config import LoraConfig
    from peft_fast.patch import _state, add_adapter, find_targets, patch, set_adapter

    other = _load_other_method(model, directory, adapter_name, is_trainable)
    if other is not None:
        return other
    raw_config, tensors = read_adapter(directory)
    # Fix: with bias="all" PEFT also saves the biases inside its modules_to_save wrappers
    # (`<module>.modules_to_save.bias`, `<module>.original_module.bias`); the trained values are
    # under `<module>.bias` as well, so these copies are dropped instead of refusing the file.
    tensors = {k: v for k, v in tensors.items() if ".modules_to_save." not in k and ".original_module." not in k}
    config = LoraConfig.from_peft_dict(raw_config)
    state = _state(model)
    if state is not None and adapter_name in state.configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    if state is not None:
        config = config.replace(quantize=next(iter(state.configs.values())).quantize)
    targets = find_targets(model, config, among_lora_layers=state is not None)
    expected = _expected_adapter_shapes(model, config, targets, among_lora_layers=state is not None)
    check_adapter_tensors(tensors, expected, f"adapter at {directory}", model)
    if state is None:
        patch(model, config.replace(init_lora_weights=False), adapter_name)
    else:
        add_adapter(model, config.replace(init_lora_weights=False), adapter_name)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in tensors.items():
            name = key.removeprefix(_PEFT_PREFIX)
            for part in (".lora_A.", ".lora_B."):
                name = name.replace(part, f"{part}{adapter_name}.")
            params[name].copy_(tensor.to(params[name].dtype))
    set_adapter(model, adapter_name)
    if not is_trainable:
        for param in model.parameters():
            param.requires_grad_(False)
    return model


def check_adapter_tensors(tensors: dict, expected: dict, what: str, model) -> None:
    """Refuse an adapter file that does not fit the model: missing, mis-shaped or unexpected tensors.

    ``expected`` maps key -> shape (None: any shape); the error lists the first problems.
    """
    problems = [f"missing {key}" for key in expected if key not in tensors]
    problems += [
        f"{key}: file has {tuple(tensors[key].shape)}, model needs {shape}"
        for key, shape in expected.items()
        if key in tensors and shape is not None and tuple(tensors[key].shape) != tuple(shape)
    ]
    problems += [f"unexpected {key}" for key in sorted(set(tensors) - set(expected))[:5]]
    if problems:
        raise ValueError(
            f"{what} does not fit this {type(model).__name__}: {'; '.join(problems[:8])}"
            + ("" if len(problems) <= 8 else f" (+{len(problems) - 8} more)")
        )


def _expected_adapter_shapes(model, config, targets, among_lora_layers: bool) -> dict[str, tuple | None]:
    """PEFT key -> shape for every tensor the adapter must hold (None: shape not checked)."""
    from peft_fast.patch import _matches_modules_to_save

    shapes: dict[str, tuple | None] = {}
    for name in targets:
        module = model.get_submodule(name)
        if among_lora_layers:
            module = module.base_layer
        out_features, in_features = _features(module)
        rank = config.rank_for(name)
        shapes[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = (rank, in_features)
        shapes[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = (out_features, rank)
    target_set = set(targets)
    if config.bias != "none":
        for name, param in model.named_parameters():
            if not name.endswith(".bias"):
                continue
            owner = name.removesuffix(".base_layer.bias").removesuffix(".bias")
            if config.bias == "all" or owner in target_set:
                key = name if ".base_layer." in name or owner not in target_set else f"{owner}.base_layer.bias"
                shapes[_PEFT_PREFIX + key] = tuple(param.shape)
    for name, module in model.named_modules():
        if _matches_modules_to_save(name, config.modules_to_save):
            for param_name, param in module.named_parameters():
                shapes[f"{_PEFT_PREFIX}{name}.{param_name}"] = tuple(param.shape)
    return shapes


def _features(module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear, NF4Linear or GPT-2 Conv1D."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.out_features, module.in_features
    weight = module.weight  # Conv1D: [in, out]
    return weight.shape[1], weight.shape[0]


_PROMPT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "ADAPTION_PROMPT")


def _save_other_method(model, directory, adapter_name: str | None) -> Path:
    """save_adapter for models patched with (IA)³, bottleneck adapters or a prompt method."""
    from peft_fast.adapters import _state as adapter_state
    from peft_fast.adapters import save_adapters
    from peft_fast.ia3 import ia3_layers, save_ia3
    from peft_fast.prompt_methods import _state as prompt_state
    from peft_fast.prompt_methods import save_prompt_adapter

    if next(ia3_layers(model), None) is not None:
        return save_ia3(model, directory)
    if adapter_state(model) is not None:
        return save_adapters(model, directory, adapter_name)
    if prompt_state(model) is not None:
        return save_prompt_adapter(model, directory)
    raise ValueError("this model carries no peft_fast adapter (call peft_fast.patch first)")


def _load_other_method(model, directory, adapter_name: str, is_trainable: bool):
    """load_adapter for non-LoRA adapter directories; None when the directory holds a LoRA adapter."""
    config_path = adapter_directory(directory) / ADAPTER_CONFIG
    if not config_path.is_file():
        return None
    document = read_json(config_path)
    peft_type = document.get("peft_type")
    if peft_type == "IA3":
        from peft_fast.ia3 import load_ia3

        return load_ia3(model, directory, adapter_name, is_trainable)
    if peft_type in _PROMPT_TYPES:
        from peft_fast.prompt_methods import load_prompt_adapter

        return load_prompt_adapter(model, directory, adapter_name, is_trainable)
    if peft_type is None and "hidden_size" in document and "config" in document:
        from peft_fast.adapters import load_adapters

        return load_adapters(model, directory, adapter_name, is_trainable)
    return None
