#!/usr/bin/env bash
# One device-tool call for a session that has a GPU (issue "GPU proof"), in priority order, each
# phase under its own time limit so the call ends inside its limit and keeps what it measured:
#   1. the CUDA test suite (kernels on the GPU against the torch path and float64), xdist, -v log;
#   2. the static Hopper report's ops timed beside their predictions, with cuBLAS and PEFT +
#      bitsandbytes' layer beside them; the runtime choice's timings per bucket (choices.jsonl);
#   3. the end-to-end QLoRA step (8B-slice: four Llama-3-8B-wide layers, S = 2048, batch 1,
#      checkpointing off and on), peft_fast against PEFT + bitsandbytes, and the dequantize suite.
# Everything lands in one tarball, $OUT/gpu-results.tgz (the device returns at most 8 files), and
# the markdown tables beside it. Phase limits (seconds): PYTEST_S, TIMEOPS_S, BENCH_S.
#
#   here, once:  echo /.whl/ >> .git/info/exclude
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2 peft==0.21.2
#   device:      run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=420)
set -uo pipefail
OUT=${OUT:-/tmp/out}
RESULTS=/tmp/gpu_results
rm -rf "$RESULTS" && mkdir -p "$OUT" "$RESULTS"
START=$(date +%s)
phase() { echo "[gpu_session] +$(( $(date +%s) - START )) s: $*" | tee -a "$RESULTS/phases.txt"; }

phase "install carried wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 PEFT_FAST_CACHE_DIR=$RESULTS/choice-cache

phase "environment"
{ nvidia-smi; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv; } \
  > "$RESULTS/nvidia-smi.txt" 2>&1
python3 - > "$RESULTS/versions.txt" 2>&1 <<'PY'
import torch, triton, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "transformers", transformers.__version__, "device", torch.cuda.get_device_name())
props = torch.cuda.get_device_properties(0)
print("sms", props.multi_processor_count, "memory_GiB", round(props.total_memory / 2**30, 1))
for m in ("peft", "bitsandbytes", "xdist", "pytest_timeout"):
    try:
        mod = __import__(m)
        print(m, getattr(mod, "__version__", "present"), getattr(mod, "__file__", ""))
    except Exception as e:
        print(m, "missing", e)
PY
cat "$RESULTS/versions.txt"

phase "pytest (CUDA)"
XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n 12"
PER_TEST=""
python3 -c "import pytest_timeout" 2>/dev/null && PER_TEST="--timeout 100"
timeout "${PYTEST_S:-150}" python3 -m pytest -v -p no:cacheprovider $XDIST $PER_TEST -rfE tests \
  --ignore=tests/test_train.py > "$RESULTS/pytest-cuda.log" 2>&1
echo "pytest rc $?" >> "$RESULTS/phases.txt"
grep -E "^(FAILED|ERROR)|\] (FAILED|ERROR) " "$RESULTS/pytest-cuda.log" | sort -u > "$RESULTS/pytest-failures.txt"
echo "pytest: $(grep -c ' PASSED ' "$RESULTS/pytest-cuda.log") passed, $(grep -c ' SKIPPED ' "$RESULTS/pytest-cuda.log") skipped, $(wc -l < "$RESULTS/pytest-failures.txt") failed/error lines"
tail -3 "$RESULTS/pytest-cuda.log"

phase "Hopper report ops timed (with PEFT + bitsandbytes beside, the runtime choice logged)"
PEFT_FAST_CHOICE_LOG=$RESULTS/choices-time-ops.jsonl timeout "${TIMEOPS_S:-110}" \
  python3 -m tools.hopper.time_ops --out "$RESULTS" > "$RESULTS/time-ops.log" 2>&1
echo "time_ops rc $?" >> "$RESULTS/phases.txt"

phase "bench: train step (8B-slice, ckpt off/on) and dequantize"
PEFT_FAST_CHOICE_LOG=$RESULTS/choices-bench.jsonl timeout "${BENCH_S:-100}" \
  python3 -m peft_fast.cli bench --quick --suites train_step,dequantize --out "$RESULTS/bench" > "$RESULTS/bench.log" 2>&1
echo "bench rc $?" >> "$RESULTS/phases.txt"

phase "pack"
tar czf "$OUT/gpu-results.tgz" -C /tmp gpu_results
cp "$RESULTS/hopper-timings.md" "$RESULTS/pytest-failures.txt" "$RESULTS/phases.txt" "$OUT/" 2>/dev/null
ls "$RESULTS"/bench/*.md >/dev/null 2>&1 && cp "$RESULTS"/bench/*.md "$OUT/"
cat "$RESULTS/phases.txt"
head -40 "$RESULTS/pytest-failures.txt"
cat "$RESULTS/hopper-timings.md" 2>/dev/null | cut -c1-200
grep -E "train_step|nf4_dequantize" "$RESULTS"/bench/*.md 2>/dev/null | head -20
