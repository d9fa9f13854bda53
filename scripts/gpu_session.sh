#!/usr/bin/env bash
# One device-tool call for a session that has a GPU (issue "GPU proof"): the CUDA test suite and
# the static report's ops timed beside their predictions, and the full benchmark, everything
# written under $OUT (under 10 minutes in all). Run from the repository root on the device:
#
#   here, once:  echo /.whl/ >> .git/info/exclude
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
#                (plus matplotlib and its pure-python deps if the image lacks them)
#   device:      run(command="bash scripts/gpu_session.sh", carry=[".whl"])
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 - > "$OUT/versions.txt" 2>&1 <<'PY'
import torch, triton, transformers
print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())
for m in ("peft", "bitsandbytes"):
    try:
        print(m, __import__(m).__version__)
    except Exception as e:
        print(m, "missing", e)
PY
PYTHONUNBUFFERED=1 timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests \
  --ignore=tests/test_train.py 2>&1 | tee "$OUT/pytest-cuda.log" | tail -30
# The static Hopper report's ops, timed with L2 rotation beside its predictions (issue 15, part 4).
PYTHONUNBUFFERED=1 timeout 120 python3 -m tools.hopper.time_ops --out "$OUT/hopper" 2>&1 | tail -25
# bench rewrites its JSON/markdown after each suite: a timeout keeps what was measured.
# The measured suites only (step_model is a CPU-side model: it runs anywhere, in CI).
PYTHONUNBUFFERED=1 timeout 180 python3 -m peft_fast.cli bench --suites dequantize,lora_linear,saved_bytes,train_step,quantize_memory --out "$OUT" 2>&1 | tail -80 > "$OUT/bench.log"
tail -60 "$OUT/bench.log"
