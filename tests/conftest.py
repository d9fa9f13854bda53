"""Test set-up: Triton kernels run under the interpreter when no GPU is present.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, i.e. before
``peft_fast.kernels`` is imported, so it is set here at collection time.

One CPU thread per process (torch's intra-op pool, OpenMP, and NumPy's BLAS, which the
interpreter uses), unless the variables are already set: every tensor here is tiny, and on a
shared 2-core machine a second thread mostly spins waiting for the first; measured on two busy
cores, a kernel + parity file pair took 39-57 s on one thread and 204-208 s on two. Subprocesses
the tests start inherit it.

Markers (pyproject.toml): ``slow`` studies are deselected by default (``-m slow`` runs them);
``cuda`` tests are skipped here when there is no GPU.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # also when torch was imported before this file

# Device on which the kernel tests run: the GPU when there is one, else CPU + interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_configure(config) -> None:
    """Refuse, with the fix, an interpreter that cannot run a loop over a runtime bound.

    Triton 3.6's interpreter turns a scalar argument into a one-element array and calls int() on
    it in ``range(0, K, ...)``; NumPy 2.4 made that an error, so every kernel test would fail
    with an obscure TypeError. Probe it once with a two-line kernel instead.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton
    import triton.language as tl

    @triton.jit
    def _loop_probe(out_ptr, n):
        total = 0
        for i in range(0, n, 1):
            total += i
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_probe[(1,)](out, 3)
    except Exception as exc:
        import numpy

        raise pytest.UsageError(
            f"the Triton {triton.__version__} interpreter cannot run our kernels with NumPy {numpy.__version__} "
            f"({type(exc).__name__}: {exc}); install numpy<2.4 or a newer Triton"
        ) from None
    assert int(out) == 3


# The fused step's per-family tests under the Triton interpreter (~4 s each): the fast suite keeps
# two families of different layouts (pre-norm Llama, Gemma 2's sandwich norms and softcap); the
# others run with the slow studies (`-m slow`, CI's second step). The torch backend runs every family.
FAST_INTERPRETER_FAMILIES = ("llama", "gemma2")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items) -> None:
    """Marks the interpreter's other families ``slow``; skips ``@pytest.mark.cuda`` without a GPU, in one place."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (item.path.name == "test_fused_step.py" and params.get("backend") == "triton"
                and params.get("family", "llama") not in FAST_INTERPRETER_FAMILIES):  # fmt: skip
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="no GPU (cuda marker)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(no_gpu)


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
