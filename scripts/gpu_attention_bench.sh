#!/usr/bin/env bash
# Issues 4 and 5 on one GPU, in one call of about 5 minutes: fwd+bwd of softmax attention
# (jax.nn.dot_product_attention), log-linear Mamba-2 / Gated DeltaNet (chunked) and PaTH
# (blockwise) at 32K tokens per batch, 16 heads, head dim 64, bf16, T = 2K (B=8), 8K (B=2),
# 32K (B=1), against the H200 anchors of papers.md. Rows are appended to
# $OUT/attention.jsonl as they finish, so a timeout keeps the shapes already measured.
# Usage (repository root): OUT=/tmp/out bash scripts/gpu_attention_bench.sh
set -u
OUT=${OUT:-runs/gpu_attention}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::DeprecationWarning}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__); print(jax.devices())"
} > "$OUT/env.txt" 2>&1
timeout ${ATTN_TIMEOUT:-300} $PY -m jaxlab.bench.attention_gpu --out "$OUT/attention.jsonl" \
  > "$OUT/attention.txt" 2>&1
echo "attention bench rc=$?"
tail -n 20 "$OUT/attention.txt"
