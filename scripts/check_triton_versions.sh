#!/usr/bin/env bash
# The GPU image runs Triton 3.6 while CI installs the newest Triton: the kernels must work on both.
# For each version this compiles every kernel the ops launch for sm_90, in every dtype and
# autotune config (PTX + ptxas, no GPU needed: python -m tools.hopper.compile_sweep) and, for
# Triton 3.6, also runs the kernel tests under the interpreter (the main test run covers the
# newest). Each version also runs the static Hopper cost report (python -m tools.hopper.report),
# ratcheted against bench/hopper/baseline-triton-<major.minor>.json: it fails when an op's
# predicted/floor ratio gets more than 3 % worse or a kernel with a loop spills. Regenerate a
# baseline after a kernel change with
# `<venv>/bin/python -m tools.hopper.report --out build/hopper --write-baseline`.
# Run from the repository root (the tools package is imported from it); used by .ci/run after
# README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Hopper report of one venv's Triton, against that version's baseline.
hopper_report() {
    local python="$1" minor
    minor="$("$python" -c "import triton; print('.'.join(triton.__version__.split('.')[:2]))")"
    "$python" -m tools.hopper.report --jobs 2 --out "build/hopper-report/triton-$minor" \
        --baseline "bench/hopper/baseline-triton-$minor.json"
}

# 1. The newest Triton, in the venv the main test run built.
.venv/bin/python -m tools.hopper.compile_sweep --jobs "$(nproc)"
hopper_report .venv/bin/python

# 2. Triton 3.6 (the GPU image's), in a venv of its own. NumPy < 2.4: Triton 3.6's interpreter
# converts one-element arrays to Python ints, which NumPy 2.4 turned into an error (GPU runs do
# not use the interpreter, so this pin concerns the tests only).
rm -rf .venv-triton36
python3 -m venv .venv-triton36
.venv-triton36/bin/pip install --quiet torch==2.13.0
.venv-triton36/bin/pip install --quiet -e ".[test]" "triton==3.6.0" "numpy<2.4"
.venv-triton36/bin/python -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__"
.venv-triton36/bin/python -m tools.hopper.compile_sweep --jobs "$(nproc)"
hopper_report .venv-triton36/bin/python
.venv-triton36/bin/python -m pytest -q -p no:cacheprovider tests/test_nf4.py tests/test_kernel_lora_linear.py \
    tests/test_kernel_adapter.py tests/test_kernel_ia3.py tests/test_ops_lora_linear.py tests/test_adapters.py \
    tests/test_ia3.py tests/test_kernel_dropout.py
