#!/usr/bin/env bash
# Every GPU check of issues 4, 5 and 7 in one device call of at most ~9 minutes
# (a session has 15 minutes of device time, machine start included):
#   1. compiled Mosaic-GPU kernels vs their references + 64 greedy tokens pallas == xla
#   2. jaxlab bench decode --config llama-1b-bench (all variants, per-op table, sweep)
#   3. fwd+bwd attention benchmark at 32K tokens/batch (log-linear, PaTH, softmax)
#   4. jaxlab bench decode --config llama-8b-bench (fewer variants and steps)
# Each stage has its own timeout (pytest gets SIGINT so it still prints its summary),
# so a hang loses one stage, not the run. Exactly 8 result files land in $OUT.
# Usage (repository root): OUT=/tmp/out bash scripts/gpu_session.sh
set -u
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::DeprecationWarning}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

{
  date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv 2>&1
  $PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__); print(jax.devices())"
} > "$OUT/env.txt" 2>&1
stamp "env: $(tail -n 1 "$OUT/env.txt")"

timeout -s INT ${PYTEST_TIMEOUT:-90} $PY -m pytest tests/test_kernels_ops.py tests/test_kernels_decode.py \
  -q -rfE --tb=short -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
stamp "pytest rc=$? ($(tail -n 1 "$OUT/pytest.txt"))"

timeout ${B1_TIMEOUT:-140} $PY -m jaxlab.bench.decode --config llama-1b-bench --ops --sweep \
  --variants xla-unrolled,pallas,xla-scan,model --json "$OUT/llama-1b.json" > "$OUT/llama-1b.txt" 2>&1
stamp "llama-1b-bench rc=$?"

timeout ${ATTN_TIMEOUT:-170} $PY -m jaxlab.bench.attention_gpu --repeats 3 \
  --out "$OUT/attention.jsonl" > "$OUT/attention.txt" 2>&1
stamp "attention bench rc=$?"

timeout ${B8_TIMEOUT:-100} $PY -m jaxlab.bench.decode --config llama-8b-bench \
  --variants xla-unrolled,pallas --steps 32 --repeats 2 --warmup 2 \
  --json "$OUT/llama-8b.json" > "$OUT/llama-8b.txt" 2>&1
stamp "llama-8b-bench rc=$?"

echo "=== pytest ==="; tail -n 40 "$OUT/pytest.txt"
for f in llama-1b attention llama-8b; do
  echo "=== $f ==="; grep -v -i "warning" "$OUT/$f.txt" | tail -n 40
done
