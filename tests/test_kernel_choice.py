"""The runtime choice between implementations (peft_fast/kernels/choice.py), with injected timings on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from peft_fast.kernels.choice import Candidate, Choice, cache_path


def make_choice(timings: dict[str, float], calls: list, timeable=True):
    def candidates(x):
        return [Candidate(name, lambda x, name=name: (calls.append(name), x * 2)[1]) for name in timings]

    def timer(run):
        before = len(calls)
        run()
        return timings[calls[before]]

    return Choice("test_op", lambda x: (x.shape[0], x.dtype), candidates, timer=timer,
                  timeable=lambda args: timeable, device_name=lambda args: "Fake GPU")  # fmt: skip


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PEFT_FAST_FORCE", raising=False)
    monkeypatch.delenv("PEFT_FAST_TUNE", raising=False)


def test_the_fastest_candidate_is_kept_per_bucket_and_cached_on_disk():
    calls = []
    choice = make_choice({"fused": 3.0, "library": 1.0, "other": 2.0}, calls)
    x = torch.ones(4)
    assert torch.equal(choice(x), x * 2)
    assert calls[:3] == ["fused", "library", "other"] and calls[3] == "library"  # timed once each, then run
    calls.clear()
    choice(x)
    assert calls == ["library"]  # the bucket is decided
    assert choice.timings[(4, torch.float32)] == {"fused": 3.0, "library": 1.0, "other": 2.0}
    stored = json.loads(cache_path().read_text())
    (scope,) = stored
    assert scope.startswith("Fake GPU | torch ") and stored[scope]["test_op"] == {"(4, torch.float32)": "library"}
    # A new process (a new Choice) reads the disk cache and times nothing.
    calls.clear()
    fresh = make_choice({"fused": 3.0, "library": 1.0, "other": 2.0}, calls)
    fresh(x)
    assert calls == ["library"] and not fresh.timings
    # Another bucket is timed on its own.
    calls.clear()
    choice(torch.ones(8))
    assert calls[:3] == ["fused", "library", "other"]


def test_no_timing_off_the_gpu_or_when_disabled(monkeypatch):
    calls = []
    choice = make_choice({"fused": 3.0, "library": 1.0}, calls, timeable=False)
    choice(torch.ones(2))
    assert calls == ["fused"]  # the static order's first
    calls.clear()
    monkeypatch.setenv("PEFT_FAST_TUNE", "0")
    choice = make_choice({"fused": 3.0, "library": 1.0}, calls)
    choice(torch.ones(2))
    assert calls == ["fused"] and not choice.timings


def test_a_forced_candidate_always_runs_and_a_bad_one_is_a_clear_error(monkeypatch):
    calls = []
    monkeypatch.setenv("PEFT_FAST_FORCE", "other_op=x, test_op=library")
    choice = make_choice({"fused": 1.0, "library": 3.0}, calls)
    choice(torch.ones(2))
    assert calls == ["library"]
    monkeypatch.setenv("PEFT_FAST_FORCE", "test_op=nonesuch")
    with pytest.raises(ValueError, match="has no candidate 'nonesuch'"):
        choice(torch.ones(2))
    monkeypatch.setenv("PEFT_FAST_FORCE", "test_op")
    with pytest.raises(ValueError, match="PEFT_FAST_FORCE must be"):
        choice(torch.ones(2))


def test_a_stale_or_broken_cache_is_ignored(tmp_path):
    cache_path().write_text("{not json")
    calls = []
    choice = make_choice({"fused": 2.0, "library": 1.0}, calls)
    choice(torch.ones(3))
    assert calls[-1] == "library"
    stored = json.loads(cache_path().read_text())
    scope = next(iter(stored))
    stored[scope]["test_op"]["(5, torch.float32)"] = "removed_candidate"
    cache_path().write_text(json.dumps(stored))
    calls.clear()
    choice(torch.ones(5))
    assert calls[:2] == ["fused", "library"]  # an unknown cached name is timed again
