#!/usr/bin/env bash
# Issue 7 (batch-1 decode kernels) on one Hopper GPU, in one call of ~8 minutes:
#   1. the kernel + decode tests with the *compiled* Mosaic-GPU kernels (fp32 and bf16)
#   2. jaxlab bench decode --config llama-1b-bench (all variants, per-op table, tuning sweep)
#   3. jaxlab bench decode --config llama-8b-bench (pallas, xla-unrolled, model)
# Results: $OUT/{env.txt,pytest.txt,llama-1b.{txt,json},llama-8b.{txt,json}}; a summary is
# printed at the end. Each stage has its own timeout, so a hang loses one stage, not the run.
# Usage (repository root): OUT=/tmp/out bash scripts/gpu_decode_bench.sh
set -u
OUT=${OUT:-runs/gpu_decode}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"     # this checkout's jaxlab and kernels
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::DeprecationWarning}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv 2>&1
  $PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__); print(jax.devices())"
} > "$OUT/env.txt" 2>&1
stamp "env: $(tail -n 1 "$OUT/env.txt")"

# 1. Correctness of the compiled kernels (interpret=None -> compile on a GPU backend).
if $PY -c "import pytest" 2>/dev/null; then
  timeout 150 $PY -m pytest tests/test_kernels_ops.py tests/test_kernels_decode.py \
    tests/test_kernels_lowering.py -q -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
  stamp "pytest rc=$? ($(tail -n 1 "$OUT/pytest.txt"))"
else
  echo "pytest not installed" > "$OUT/pytest.txt"; stamp "pytest: not installed, skipped"
fi

# 2. Llama-1B shape: every variant, per-op Pallas vs XLA, and a small tuning sweep.
timeout 180 $PY -m jaxlab.bench.decode --config llama-1b-bench --ops --sweep \
  --json "$OUT/llama-1b.json" > "$OUT/llama-1b.txt" 2>&1
stamp "llama-1b-bench rc=$?"

# 3. Llama-8B shape (16 GB of bf16 weights + a transposed copy): fewer variants and steps.
timeout 140 $PY -m jaxlab.bench.decode --config llama-8b-bench \
  --variants pallas,xla-unrolled,model --steps 32 --repeats 2 \
  --json "$OUT/llama-8b.json" > "$OUT/llama-8b.txt" 2>&1
stamp "llama-8b-bench rc=$?"

echo "=== pytest (tail) ==="; tail -n 15 "$OUT/pytest.txt"
for f in llama-1b llama-8b; do
  echo "=== $f ==="; grep -v -i "warning" "$OUT/$f.txt" | tail -n 30
done
