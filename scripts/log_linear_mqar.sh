#!/usr/bin/env bash
# MQAR comparison of issue 4 (docs/log_linear.md): softmax attention, Mamba-2, log-linear
# Mamba-2, Gated DeltaNet and log-linear Gated DeltaNet at equal width (d_model 64, 2 layers,
# 2 heads), then the table and plot. Each run resumes if interrupted.
# Usage: bash scripts/log_linear_mqar.sh [RUN_ROOT]   (about 50 minutes on a 2-core CPU)
set -euo pipefail
ROOT=${1:-runs/log_linear_mqar}
STEPS=${STEPS:-2500}
for m in attention mamba2 log_linear_mamba2 gated_deltanet log_linear_gated_deltanet; do
  jaxlab train lm --mixer "$m" --d-model 64 --layers 2 --heads 2 \
    --task mqar --task-option num_kv_pairs=8 --task-option seq_len=64 --task-option vocab_size=128 \
    --steps "$STEPS" --batch-size 64 --lr 3e-3 --eval-every 250 --checkpoint-every 500 \
    --seed 0 --run-dir "$ROOT/$m" --no-progress
done
python -m jaxlab.bench.log_linear --mqar-report "$ROOT" --png "$ROOT/log_linear_mqar.png" \
  --title "MQAR, 8 pairs, T = 64, d_model 64, 2 layers ($STEPS steps)"
