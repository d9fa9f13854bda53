"""The runtime choice between an op's implementations: time each once per shape bucket on the GPU, keep the fastest.

The static cost model (``tools/hopper``) predicts lower bounds, not timings: it cannot see every
cost a Hopper kernel pays. So an op with more than one way to run (a fused Triton kernel, or our
dequantize kernel + a cuBLAS GEMM + the LoRA term as one addmm, ...) lists its candidates per
shape bucket, in the static model's order (the predicted fastest first, hopeless ones already
pruned), and on a GPU the first call in a bucket times each candidate with CUDA events (warm-up,
then ``REPEATS`` runs, the median) and keeps the fastest. So peft_fast is never slower than the
library path it competes with, up to timing noise, whatever the model got wrong.

The choice is cached on disk per device name and library versions, as Triton's autotuner caches
its configs (``$PEFT_FAST_CACHE_DIR``, default ``~/.cache/peft_fast``). Environment:

- ``PEFT_FAST_TUNE=0``: never time; take each bucket's first (statically preferred) candidate;
- ``PEFT_FAST_FORCE="op=candidate,..."``: always run that candidate for that op;
- ``PEFT_FAST_CHOICE_LOG=path``: append one JSON line per timed bucket (op, bucket, device and
  versions, each candidate's milliseconds, the one kept) — what a GPU session reports.

Off the GPU (the Triton interpreter, fake tensors of a traced step, CUDA-graph capture) nothing
is timed and the static order decides. Candidates must compute the same function (tolerance by
dtype): tests check every candidate against the others.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["REPEATS", "WARMUP", "Candidate", "Choice", "cache_path", "forced"]

WARMUP = 1
REPEATS = 5


@dataclass(frozen=True)
class Candidate:
    """One way to run an op: a name (stable: it is what the cache stores) and a function of the op's arguments."""

    name: str
    run: Callable


def forced() -> dict[str, str]:
    """``PEFT_FAST_FORCE`` as {op: candidate}."""
    spec = os.environ.get("PEFT_FAST_FORCE", "").strip()
    pairs = [item.split("=", 1) for item in spec.split(",") if item.strip()]
    bad = [item for item in pairs if len(item) != 2 or not item[0].strip() or not item[1].strip()]
    if bad:
        raise ValueError(f"PEFT_FAST_FORCE must be 'op=candidate[,op=candidate...]', got {spec!r}")
    return {op.strip(): name.strip() for op, name in pairs}


def _tuning_enabled() -> bool:
    return os.environ.get("PEFT_FAST_TUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def cache_path() -> Path:
    """Where choices are kept: ``$PEFT_FAST_CACHE_DIR/choices.json`` (default under ``~/.cache/peft_fast``)."""
    root = os.environ.get("PEFT_FAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "peft_fast")
    return Path(root) / "choices.json"


def _versions() -> str:
    import importlib.metadata

    import triton

    try:
        ours = importlib.metadata.version("peft-fast")
    except importlib.metadata.PackageNotFoundError:
        ours = "unknown"
    return f"torch {torch.__version__}, triton {triton.__version__}, peft_fast {ours}"


class _DiskCache:
    """{device and versions: {op: {bucket: candidate}}} in one JSON file, rewritten atomically on each new choice."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def _read(self, path: Path) -> dict:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, scope: str, op: str, bucket: str) -> str | None:
        entry = self._read(cache_path()).get(scope, {}).get(op, {}).get(bucket)
        return entry if isinstance(entry, str) else None

    def put(self, scope: str, op: str, bucket: str, name: str) -> None:
        path = cache_path()
        with self.lock:
            data = self._read(path)
            data.setdefault(scope, {}).setdefault(op, {})[bucket] = name
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".choices.", suffix=".tmp", dir=path.parent)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only home: the choice still holds for this process


_DISK = _DiskCache()


def _timeable(args: Sequence) -> bool:
    """Real CUDA tensors outside a CUDA-graph capture (fake tensors of a traced step are not timed)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or not all(t.is_cuda for t in tensors) or not torch.cuda.is_available():
        return False
    if any(type(t).__name__ == "FakeTensor" for t in tensors):
        return False
    return not torch.cuda.is_current_stream_capturing()


def cuda_event_timer(run: Callable[[], object]) -> float:
    """Median milliseconds of ``run`` over REPEATS calls after WARMUP, by CUDA events."""
    for _ in range(WARMUP):
        run()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Choice:
    """The implementations of one op, chosen per shape bucket.

    ``candidates(*args)`` gives the bucket's candidates in the static order (at least one);
    ``bucket(*args)`` a hashable key (M bucket × N × K × dtype × rank × dropout, ...). ``timer``
    measures a zero-argument callable in milliseconds (CUDA events by default; tests inject
    timings); ``timeable(args)`` says whether timing may happen for these arguments.
    """

    def __init__(
        self,
        op: str,
        bucket: Callable[..., Hashable],
        candidates: Callable[..., Sequence[Candidate]],
        *,
        timer: Callable[[Callable[[], object]], float] = cuda_event_timer,
        timeable: Callable[[Sequence], bool] = _timeable,
        device_name: Callable[[Sequence], str] | None = None,
    ) -> None:
        self.op, self.bucket, self.candidates = op, bucket, candidates
        self.timer, self.timeable = timer, timeable
        self.device_name = device_name or _device_name
        self.chosen: dict[Hashable, str] = {}
        self.timings: dict[Hashable, dict[str, float]] = {}

    def choose(self, *args) -> Candidate:
        """The candidate for these arguments (timing the bucket's candidates on its first call)."""
        options = list(self.candidates(*args))
        if not options:
            raise RuntimeError(f"{self.op}: no candidate implementation for these arguments")
        by_name = {c.name: c for c in options}
        wanted = forced().get(self.op)
        if wanted is not None:
            if wanted not in by_name:
                raise ValueError(f"PEFT_FAST_FORCE: {self.op} has no candidate {wanted!r} here; it has {list(by_name)}")
            return by_name[wanted]
        if len(options) == 1 or not _tuning_enabled() or not self.timeable(args):
            return options[0]
        key = self.bucket(*args)
        name = self.chosen.get(key)
        if name is None:
            scope = f"{self.device_name(args)} | {_versions()}"
            name = _DISK.get(scope, self.op, repr(key))
            if name not in by_name:
                name = self._time(key, options, args)
                _DISK.put(scope, self.op, repr(key), name)
            self.chosen[key] = name
        return by_name.get(name, options[0])

    def __call__(self, *args):
        return self.choose(*args).run(*args)

    def _time(self, key: Hashable, options: Sequence[Candidate], args: Sequence) -> str:
        timings = {c.name: self.timer(lambda c=c: c.run(*args)) for c in options}
        self.timings[key] = timings
        name = min(options, key=lambda c: timings[c.name]).name
        _log_choice(self.op, key, f"{self.device_name(args)} | {_versions()}", timings, name)
        return name


def _log_choice(op: str, key: Hashable, scope: str, timings: dict[str, float], chosen: str) -> None:
    """One JSON line in ``$PEFT_FAST_CHOICE_LOG`` (if set) for a bucket just timed."""
    path = os.environ.get("PEFT_FAST_CHOICE_LOG")
    if not path:
        return
    line = json.dumps({"op": op, "bucket": repr(key), "scope": scope, "ms": timings, "chosen": chosen})
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError:
        pass  # a log that cannot be written never stops the op


def _device_name(args: Sequence) -> str:
    tensor = next(a for a in args if isinstance(a, torch.Tensor))
    return torch.cuda.get_device_name(tensor.device)
