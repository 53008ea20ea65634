#!/usr/bin/env bash
# The GPU checks of issue 7 in one device call. Stages run in order of priority under one
# time budget (BUDGET, default 570 s from the start of the script; each stage's timeout is
# clipped to what is left, and a stage with under 30 s left is skipped), so the call stays
# under the device tool's 600 s limit; a session has 15 minutes of device time, machine
# start included (~35 s on 2026-11-26):
#   1. compiled Mosaic-GPU kernels vs their references on the GPU itself (JAX_PLATFORMS=
#      cuda; PYTEST_FILES, PYTEST_TIMEOUT): the tensor-core forms first, the fused ops,
#      the decode tests (64 greedy tokens pallas == xla, PDL), then every op and int8;
#      tests/test_kernels_s8.py second: the first run of int8 WGMMA (gemv "mma-s8")
#   2. jaxlab bench decode --config llama-1b-bench, each step chained several ways (--loop,
#      twenty-first session; B1_LOOP, default step,inplace,device, and B1B_LOOP, default
#      step,inplace: rows <variant>, <variant>+inplace, the step with every buffer kept
#      from step to step, and <variant>+device, all steps of a repeat in one call; the
#      profile's "host" lines say how many command-buffer updates each step had), in two
#      runs: (a) xla-unrolled, pallas,
#      pallas-mma-128, pallas-mma-1k (B1_VARIANTS; each Pallas step compiled in ~70 s on
#      JAX 0.11.2 until the seventeenth session, which lowers each kernel once per step
#      instead of once per layer: expect seconds, and check the "compile s" column);
#      B1_ARGS="--ops --sweep mma,fill" adds the per-op table and sweep
#      (~2 min; measured 2026-11-27); (b) xla-unrolled again as this run's baseline, then
#      pallas-mma-best, pallas-prefetch, pallas-mma-prefetch (pallas-mma-128 with PDL
#      prefetch), pallas-pdl, pallas-mma-down-t, then int8:
#      xla-int8, pallas-int8 and pallas-int8-mma (int8 tiles on the tensor cores,
#      eighteenth session), pallas-int8-s8 (int8 WGMMA against the vector's int8
#      digits, twentieth session), then pallas-mlp2k, pallas-mlp2k-prefetch,
#      pallas-mlp2k-fill, pallas-mlp2k-nochain, pallas-unfused (B1B_VARIANTS, in that order:
#      the budget cuts the last ones); profiles
#   3. which kernels of each step run inside XLA's command buffers: read from the
#      dump of stage 2a at no extra compile; THUNKS=1 (with THUNK_VARIANTS) dumps other
#      variants in runs of their own, ~1 min each
#   4. with WRITE=1: the XLA baseline's cache row write as one scatter, ~45 s
#   5. HYBRID=1 (default; 0 skips): --config hybrid-1b-bench (PaTH / log-linear decode kernels), ~1-2 min
#   6. with ATTN=1: fwd+bwd attention benchmark at the shapes of issues 4 and 5 (closed;
#      their figures are in docs/benchmarks.md), ~2.3 minutes
#   7. B8=1 (default unless ATTN=1; B8= skips): jaxlab bench decode --config llama-8b-bench (the inlined
#      Pallas 8B step compiled in ~110 s before the seventeenth session; pallas-shared and
#      pallas now compile to the same program, so their times should match)
#   8. GATED=1 (default; GATED= skips): --config gated-1b-bench (PaTH-FoX / FoX layers)
#   9. LONG=1 (default; LONG= skips): the 1B step and per-op rows at a 32K-slot KV cache
#   (stages 5, 7, 8 and 9 run only while the budget lasts: with the old ~70 s compiles they
#   did not fit, so they were opt-in)
#  10. with CMDBUF=1: the 1B steps again with an explicit list of command-buffer types
#      including CUSTOM_CALL (an experiment, worth it only if stage 3's thunk summary shows
#      Mosaic custom calls launched from the host, which a deviceless compile with the
#      H100's driver version does not; the list replaces XLA's default one)
# Opt-in stages compete for the same budget: lower B1's share (B1_TIMEOUT) or skip
# stages to fit them. Each stage has its own timeout (pytest gets SIGINT so it still
# prints its summary), so a hang loses one stage, not the run. At most 8 result files
# land in $OUT (the device tool's limit): env, pytest, llama-1b.{txt,json},
# llama-1b-variants.json, profile.tgz, attention.{jsonl,txt} (ATTN=1), llama-8b.txt (B8,
# on by default unless ATTN=1: both would make 9 files).
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
BUDGET=${BUDGET:-570}
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
# cap N: N, or the seconds left in the budget less a 10 s margin if that is smaller
cap() {
  local left=$(( BUDGET - ($(date +%s) - T0) - 10 ))
  local t=$(( $1 < left ? $1 : left )); echo $(( t < 1 ? 1 : t ))   # timeout 0 would not time out
}
# room N: whether a stage wanting up to N seconds can start (at least 30 s left)
room() { [ "$(cap "$1")" -ge 30 ] || { stamp "skipped: $2 (budget)"; false; }; }

{
  date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv 2>&1
  $PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__); print(jax.devices())"
} > "$OUT/env.txt" 2>&1
stamp "env: $(tail -n 1 "$OUT/env.txt")"

# newest first (a timeout cuts the tail): the tensor-core GEMV (its "compile" cases run
# WGMMA for real), the chain, PDL, the two-kernel MLP, the decode tests (their PDL and
# two-kernel cases first), then the fused ops, every op, int8; the `slow` ones too (fast
# when compiled; the interpreter-only tests skip themselves on a GPU)
# JAX_PLATFORMS=cuda: tests/conftest.py defaults it to cpu, and before 2026-11-27 this
# stage ran every test on the GPU machine's CPU (the interpreters), not compiled.
# (2026-11-27 compiled tests/test_kernels_ops.py's first 45 tests: those files come last)
PYTEST_FILES=${PYTEST_FILES:-tests/test_kernels_mma.py tests/test_kernels_s8.py tests/test_kernels_fused.py \
  tests/test_kernels_decode.py tests/test_kernels_chain.py tests/test_kernels_pdl.py \
  tests/test_kernels_mlp2k.py tests/test_kernels_ops.py tests/test_kernels_int8.py}
# PYTEST_WORKERS processes share the GPU (no preallocation): the compiled tests spend
# their time in Mosaic / ptxas compiles on the CPU (one at a time: 45 tests in 110 s)
JAX_PLATFORMS=${PYTEST_PLATFORMS:-cuda} XLA_PYTHON_CLIENT_PREALLOCATE=false \
  timeout -s INT $(cap ${PYTEST_TIMEOUT:-120}) $PY -m pytest -n ${PYTEST_WORKERS:-6} \
  $PYTEST_FILES -q -rfE --tb=short -m "slow or not slow" \
  -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
stamp "pytest rc=$? ($(tail -n 1 "$OUT/pytest.txt"))"

# 2a. the per-op table (Pallas vs XLA per op, incl. the two-kernel MLP row) and sweep,
# with the baseline and the default Pallas step
# XLA dumps each compiled step (--xla_dump_to) on the way: the thunk summary after the
# run says which kernels of each step run inside command buffers (CUDA graphs) and which
# the host launches one by one. Compiled here for an H100 with its driver version, every
# Pallas step is one command buffer, Mosaic calls included (nineteenth session); this
# checks it on the GPU. Its modules are numbered in the order the variants compiled;
# xla-unrolled's has no custom calls.
PROF=$(mktemp -d)
DUMP=$(mktemp -d)
XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$DUMP" \
  timeout $(cap ${B1_TIMEOUT:-300}) $PY -m jaxlab.bench.decode --config llama-1b-bench \
  ${B1_ARGS-} --loop ${B1_LOOP:-step,inplace,device} \
  --variants ${B1_VARIANTS:-xla-unrolled,pallas,pallas-mma-128,pallas-mma-1k} \
  --profile "$PROF" --json "$OUT/llama-1b.json" > "$OUT/llama-1b.txt" 2>&1
stamp "llama-1b-bench ops rc=$?"
{ echo; echo "=== thunks of the steps above (command buffers or host launches) ==="; } >> "$OUT/llama-1b.txt"
$PY -m jaxlab.bench.thunks "$DUMP" --match _step_unrolled >> "$OUT/llama-1b.txt" 2>&1
rm -rf "$DUMP"
# 2b. the other Pallas steps, most telling first; each variant's
# figures are logged as it finishes, so a timeout loses only the later ones
if room 60 "llama-1b-bench variants"; then
  { echo; echo "=== llama-1b-bench: more variants ==="; } >> "$OUT/llama-1b.txt"
  timeout $(cap ${B1B_TIMEOUT:-230}) $PY -m jaxlab.bench.decode --config llama-1b-bench \
    --loop ${B1B_LOOP:-step,inplace} --variants ${B1B_VARIANTS:-xla-unrolled,pallas-mma-best,pallas-prefetch,pallas-mma-prefetch,pallas-pdl,pallas-mma-down-t,xla-int8,pallas-int8,pallas-int8-mma,pallas-int8-s8,pallas-mlp2k,pallas-mlp2k-prefetch,pallas-mlp2k-fill,pallas-mlp2k-nochain,pallas-unfused} \
    --profile "$PROF" --json "$OUT/llama-1b-variants.json" >> "$OUT/llama-1b.txt" 2>&1
  stamp "llama-1b-bench variants rc=$?"
fi
tar -czf "$OUT/profile.tgz" -C "$PROF" . 2>/dev/null   # raw traces (Perfetto JSON, xplane)

# Which kernels of the 1B step run inside XLA's command buffers (CUDA graphs) and which
# are launched one by one from the host: the timed Pallas step sits ~360 us above its
# kernels' busy time, XLA's does not (sixth session). Stage 2a's dump covers its
# variants; THUNKS=1 runs this for THUNK_VARIANTS.
if [ "${THUNKS:-0}" != 0 ]; then
  { echo; echo "=== thunks: kernels inside / outside command buffers ==="; } >> "$OUT/llama-1b.txt"
  for v in ${THUNK_VARIANTS:-pallas}; do
    room ${THUNKS_TIMEOUT:-55} "thunks $v" || continue
    D=$(mktemp -d)
    XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$D" timeout $(cap ${THUNKS_TIMEOUT:-55}) $PY -m \
      jaxlab.bench.decode --config llama-1b-bench --variants $v --steps 8 --repeats 1 \
      --warmup 1 > /dev/null 2>&1
    echo "--- $v" >> "$OUT/llama-1b.txt"
    $PY -m jaxlab.bench.thunks "$D" --match _step_unrolled >> "$OUT/llama-1b.txt" 2>&1
    stamp "thunks $v rc=$?"
  done
fi

# The XLA baseline's cache row write as one scatter instead of slice + select + update
# (WRITE=0 skips): the best plain-XLA step is the fair baseline. (The Pallas step writes
# the row inside its RoPE kernel.)
if [ "${WRITE:-0}" != 0 ] && room ${WRITE_TIMEOUT:-45} "write=scatter"; then
  { echo; echo "=== rope_append write=scatter ==="; } >> "$OUT/llama-1b.txt"
  timeout $(cap ${WRITE_TIMEOUT:-45}) $PY -m jaxlab.bench.decode --config llama-1b-bench \
    --variants xla-unrolled --kernel-options '{"rope_append": {"write": "scatter"}}' \
    >> "$OUT/llama-1b.txt" 2>&1
  stamp "write=scatter rc=$?"
fi

# PaTH / log-linear decode kernels inside the 1B-shaped step (appended to llama-1b.txt;
# HYBRID=1 runs it; measured on an H100 and an H200 in the sixth session).
if [ "${HYBRID-1}" != 0 ] && room ${HYB_TIMEOUT:-150} "hybrid-1b-bench"; then
  { echo; echo "=== hybrid-1b-bench ==="; } >> "$OUT/llama-1b.txt"
  timeout $(cap ${HYB_TIMEOUT:-150}) $PY -m jaxlab.bench.decode --config hybrid-1b-bench --ops \
    --variants xla-unrolled,pallas --steps 32 --repeats 2 --warmup 2 >> "$OUT/llama-1b.txt" 2>&1
  stamp "hybrid-1b-bench rc=$?"
fi

# Issues 4/5 shapes (ATTN=1): T = 2K/8K/32K at B = 8/2/1. PaTH's 32K row is skipped by
# default (~14 s a call on an H100 on 2026-11-26; ATTN_PATH_TS="2048 8192 32768" adds it).
if [ -n "${ATTN:-}" ] && room ${ATTN_TIMEOUT:-100} "attention"; then
  timeout $(cap ${ATTN_TIMEOUT:-100}) $PY -m jaxlab.bench.attention_gpu --repeats 3 \
    --ops softmax log_linear_mamba2 log_linear_gdn --out "$OUT/attention.jsonl" \
    > "$OUT/attention.txt" 2>&1
  stamp "attention bench (softmax, log-linear) rc=$?"
  timeout $(cap ${PATH_TIMEOUT:-40}) $PY -m jaxlab.bench.attention_gpu --repeats 3 --ops path \
    --ts ${ATTN_PATH_TS:-2048 8192} --out "$OUT/attention.jsonl" >> "$OUT/attention.txt" 2>&1
  stamp "attention bench (PaTH) rc=$?"
fi

[ -n "${ATTN:-}" ] && B8_DEFAULT= || B8_DEFAULT=1
if [ -n "${B8-$B8_DEFAULT}" ] && room ${B8_TIMEOUT:-180} "llama-8b-bench"; then
  timeout $(cap ${B8_TIMEOUT:-180}) $PY -m jaxlab.bench.decode --config llama-8b-bench \
    --variants ${B8_VARIANTS:-xla-unrolled,pallas-shared,pallas} --steps 32 --repeats 2 --warmup 2 \
    > "$OUT/llama-8b.txt" 2>&1
  stamp "llama-8b-bench rc=$?"
fi

# PaTH-FoX / FoX layers (GATED=1): the gate-bias attention kernels in the 1B-shaped step.
if [ -n "${GATED-1}" ] && room ${GATED_TIMEOUT:-120} "gated-1b-bench"; then
  { echo; echo "=== gated-1b-bench ==="; } >> "$OUT/llama-1b.txt"
  timeout $(cap ${GATED_TIMEOUT:-120}) $PY -m jaxlab.bench.decode --config gated-1b-bench --ops \
    --variants xla-unrolled,pallas --steps 32 --repeats 2 --warmup 2 \
    >> "$OUT/llama-1b.txt" 2>&1
  stamp "gated-1b-bench rc=$?"
fi

# Long cache (LONG=1): the 1B step and the per-op rows at a 32K-slot KV cache, where
# attention is 1 GB of the bytes per token (the issue's 32K data point for JAX's own
# Pallas decode_attention: 1.0 TB/s vs XLA's 2.5 on an H200), with the attention rows on
# the tensor cores (sweep group attn: scores mma, mma-pv), where each CTA streams 32 blocks.
if [ -n "${LONG-1}" ] && room ${LONG_TIMEOUT:-120} "kv 32768"; then
  { echo; echo "=== llama-1b-bench, kv 32768 ==="; } >> "$OUT/llama-1b.txt"
  timeout $(cap ${LONG_TIMEOUT:-120}) $PY -m jaxlab.bench.decode --config llama-1b-bench --kv-len 32768 \
    --ops --sweep attn --variants xla-unrolled,pallas --steps 32 --repeats 2 --warmup 2 \
    >> "$OUT/llama-1b.txt" 2>&1
  stamp "llama-1b-bench kv 32768 rc=$?"
fi

if [ -n "${CMDBUF:-}" ] && room ${CMDBUF_TIMEOUT:-120} "command buffers"; then
  { echo; echo "=== command buffers incl. custom calls ==="; } >> "$OUT/llama-1b.txt"
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN" \
    timeout $(cap ${CMDBUF_TIMEOUT:-120}) $PY -m jaxlab.bench.decode --config llama-1b-bench \
    --variants xla-unrolled,pallas-shared,pallas --steps 32 --repeats 2 --warmup 2 \
    >> "$OUT/llama-1b.txt" 2>&1
  stamp "command-buffer experiment rc=$?"
fi

echo "=== pytest ==="; tail -n 40 "$OUT/pytest.txt"
for f in llama-1b attention llama-8b; do
  [ -f "$OUT/$f.txt" ] && { echo "=== $f ==="; grep -v -i "warning" "$OUT/$f.txt" | tail -n 40; }
done
