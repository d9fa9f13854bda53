"""PEFT-format adapter directories: the names, the (weights, config) pair that never mixes, shape checks.

An adapter is a pair of files (weights + config) that must never mix: :func:`write_adapter_pair`
puts the digest of the config into the weights' safetensors metadata and writes both under a
lock on the directory; :func:`read_adapter_pair` refuses a pair whose digest differs (an
interrupted or concurrent save). Built on :mod:`peft_fast.io`'s atomic writes, locks and reader.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch

from peft_fast import io
from peft_fast.io import atomic_write_files, json_object, read_json, read_safetensors

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "CONFIG_DIGEST_KEY",
    "PEFT_PREFIX",
    "AdapterFiles",
    "adapter_directory",
    "check_adapter_tensors",
    "config_digest",
    "module_features",
    "output_directory",
    "read_adapter",
    "read_adapter_files",
    "read_adapter_pair",
    "read_adapter_tensors",
    "write_adapter_pair",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (the tuner) .model


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
    return _read_adapter_tensors(path)[0]


def _read_adapter_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of an adapter's weights, both from one open file.

    Not ``safetensors.safe_open`` / ``load_file``: measured with safetensors 0.8.0 while another
    process replaced the file over and over, about 1 in 100 opens returned the metadata of one
    version of the file and the tensors of another (it opens the path more than once), which
    defeats the config digest. Plain reads of one handle: :func:`peft_fast.io.read_safetensors`.
    """
    try:
        tensors, metadata = read_safetensors(path)
    except ValueError as exc:
        detail = str(exc).removeprefix(f"{path}: ")
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt?): {detail}") from None
    not_float = [f"{key} ({t.dtype})" for key, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        # copy_ would cast them silently (int adapter weights are certainly not what was trained).
        raise ValueError(f"{path}: adapter tensors must be floating point; got {', '.join(not_float[:5])}")
    return tensors, metadata


# In the weights' safetensors metadata (PEFT and safetensors ignore metadata they do not know):
# the SHA-256 of the config they were saved with (config_digest), so a loader refuses them beside
# another config.
CONFIG_DIGEST_KEY = "peft_fast.config_sha256"
# Top-level config fields that say where an adapter came from, not how to read its weights: left
# out of the digest, so a config whose base_model_name_or_path was edited by hand (a common fix when
# a base model moves) still loads. The rest of the file must be the one saved with the weights.
_PROVENANCE_FIELDS = frozenset(
    {"auto_mapping", "base_model_name_or_path", "inference_mode", "model_name", "peft_version", "revision", "version"}
)


def config_digest(document: dict) -> str:
    """The SHA-256 (hex) of an adapter config's canonical JSON, its provenance fields left out.

    Canonical: ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)``, UTF-8;
    so re-indenting the file does not change it either.
    """
    kept = {key: value for key, value in document.items() if key not in _PROVENANCE_FIELDS}
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_adapter_pair(
    directory: str | os.PathLike,
    weights_name: str,
    tensors: dict[str, torch.Tensor],
    config: dict | bytes,
    config_name: str = ADAPTER_CONFIG,
) -> Path:
    """Write an adapter's weights (``tensors``, safetensors) and config (a JSON document, or its bytes) as one pair.

    What a save guarantees: (1) the weights' metadata holds ``peft_fast.config_sha256``, the
    :func:`config_digest` of the config written with them, so :func:`read_adapter_pair` refuses a
    config and weights that were not written together; (2) both are complete and fsynced as
    temporaries before the first rename, and the weights are renamed first: a kill or an error
    between the two renames leaves the new weights beside the old config, which their digest
    refuses (weights without a digest, e.g. PEFT's, are never left beside a config they were not
    saved with); (3) all of it happens under
    an exclusive :func:`directory_lock`, so writers (processes or threads) take turns and a reader
    (which takes the shared lock) never sees half of a save; (4) temporaries that killed saves of
    these two files left behind are removed first (:func:`remove_stale_temporaries`). A dict is
    written as ``json.dumps(indent=2, sort_keys=True)`` plus a newline, PEFT's layout.
    """
    from safetensors.torch import save as safetensors_bytes

    if isinstance(config, dict):
        config = (json.dumps(config, indent=2, sort_keys=True, default=str) + "\n").encode()
    # The digest of what a reader will parse from these bytes.
    metadata = {"format": "pt", CONFIG_DIGEST_KEY: config_digest(json_object(config, Path(config_name)))}
    weights = safetensors_bytes(tensors, metadata=metadata)
    directory = output_directory(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with io.directory_lock(directory, exclusive=True):
        io.remove_stale_temporaries(directory, (weights_name, config_name))
        # The weights first: see (2) above.
        with atomic_write_files(directory / weights_name, directory / config_name) as (weights_file, config_file):
            weights_file.write(weights)
            config_file.write(config)
    return directory


class AdapterFiles(NamedTuple):
    """An adapter's two files, read together: its config, its tensors, and whether they belong together."""

    config: dict
    tensors: dict[str, torch.Tensor]
    mixed: str | None  # the error to raise when the two files were not written together, else None

    def check_written_together(self) -> None:
        """The ValueError when the files were not written together: a loader calls it after its own checks.

        Last, so that a config that does not fit the model (or that peft_fast cannot run) gets
        its own error, and first among the steps that change the model.
        """
        if self.mixed is not None:
            raise ValueError(self.mixed)


def read_adapter_pair(
    directory: str | os.PathLike, weights_name: str = ADAPTER_WEIGHTS, config_name: str = ADAPTER_CONFIG
) -> AdapterFiles:
    """The config (a dict) and tensors of an adapter's two files, which must exist.

    Read under the shared :func:`directory_lock`. ``mixed`` is set when the weights' metadata
    holds the digest of another config (:func:`write_adapter_pair`, :func:`config_digest`): an
    error naming both files, raised by :meth:`AdapterFiles.check_written_together`. Weights
    without a digest (PEFT's, or saved before it existed) are never ``mixed``.
    """
    directory = Path(directory)
    config_path, weights_path = directory / config_name, directory / weights_name
    with io.directory_lock(directory, exclusive=False):
        document = read_json(config_path)
        tensors, metadata = _read_adapter_tensors(weights_path)
    expected, mixed = metadata.get(CONFIG_DIGEST_KEY), None
    if expected is not None and expected != config_digest(document):
        mixed = (
            f"{weights_path} and {config_path} were not written together: the weights were saved with another "
            f"{config_name} (an interrupted or concurrent save, files copied from two saves, or a config edited "
            f"by hand: the digest in the weights' metadata {CONFIG_DIGEST_KEY!r} differs); save the adapter again"
        )
    return AdapterFiles(document, tensors, mixed)


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, tensors) of a PEFT-format adapter directory.

    A ValueError when the two were not written together (:func:`read_adapter_files` defers that).
    """
    files = read_adapter_files(directory)
    files.check_written_together()
    return files.config, files.tensors


def read_adapter_files(directory: str | os.PathLike) -> AdapterFiles:
    """:func:`read_adapter_pair` of a PEFT-format adapter directory, with clear errors for missing files."""
    directory = adapter_directory(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {ADAPTER_CONFIG}")
    if not weights_path.is_file():
        pickled = directory / "adapter_model.bin"
        if pickled.is_file():
            raise ValueError(f"{pickled} is a pickle; peft_fast loads safetensors adapters only")
        raise FileNotFoundError(f"{directory} has no {ADAPTER_WEIGHTS}")
    return read_adapter_pair(directory)


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


def module_features(module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear, NF4Linear or GPT-2 Conv1D."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.out_features, module.in_features
    weight = module.weight  # Conv1D: [in, out]
    return weight.shape[1], weight.shape[0]
