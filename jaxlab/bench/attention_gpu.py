"""Training-shape attention benchmark (issues 4 and 5): fwd+bwd at a fixed token budget.

The issues' GPU protocol: 16 heads, head dim 64, bf16 q/k/v, T = 2K (B = 8), 8K (B = 2),
32K (B = 1); time of one forward + backward (gradients of every input). The issues also
say "32K tokens per batch", which only holds at T = 32K: the listed B (16K tokens at 2K
and 8K) is what the anchors' FLOP rates match (softmax at B = 16 would need ~570 TFLOP/s),
so B comes from that list unless --tokens is given. Rows compare our pure-JAX training forms with the anchors measured on an
H200 with flash-linear-attention's Triton kernels (papers.md), and with softmax
attention from `jax.nn.dot_product_attention` in the same run.

    python -m jaxlab.bench.attention_gpu --out rows.jsonl       # the GPU protocol
    python -m jaxlab.bench.attention_gpu --tokens 256 --ts 64 128 --heads 2   # CPU smoke run

Each row is printed and appended to --out as soon as it is measured, so a run cut short
keeps what it finished. Configurations run from small to large T.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jaxlab.bench.common import markdown_table, time_ms

# fwd+bwd ms on an H200 at T = 2K / 8K / 32K (papers.md; fla Triton kernels, torch SDPA).
ANCHORS_MS = {
    "log_linear_mamba2": {2048: 6.45, 8192: 11.0, 32768: 37.2},
    "path": {2048: 5.30, 8192: 14.8, 32768: 98.1},
    "softmax": {2048: 0.85, 8192: 2.41, 32768: 18.0},
}
# The issues' batch size per T (the anchors were measured at these shapes).
PROTOCOL_BATCH = {2048: 8, 8192: 2, 32768: 1}
OPS = ("softmax", "log_linear_mamba2", "log_linear_gdn", "path")


def _inputs(op, B, T, H, D, dtype, key):
  ks = jax.random.split(key, 8)
  n = lambda k, shape: jax.random.normal(k, shape, jnp.float32)
  x = dict(q=n(ks[0], (B, T, H, D)).astype(dtype), k=n(ks[1], (B, T, H, D)).astype(dtype),
           v=n(ks[2], (B, T, H, D)).astype(dtype))
  if op.startswith("log_linear"):
    from jaxlab.ops import log_linear as ll
    x["k"] = (x["k"].astype(jnp.float32) / math.sqrt(D)).astype(dtype)
    x["g"] = -jax.nn.softplus(n(ks[3], (B, T, H)) - 4.0)
    x["level_scales"] = jax.nn.softplus(n(ks[4], (B, T, H, ll.num_levels(T))))
    if op == "log_linear_gdn":
      x["beta"] = jax.nn.sigmoid(n(ks[5], (B, T, H)))
  elif op == "path":
    w = n(ks[6], (B, T, H, D))
    x["w"] = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    x["beta"] = 2.0 * jax.nn.sigmoid(n(ks[7], (B, T, H)))
  return x


def _forward(op, softmax_impl):
  from jaxlab import ops
  if op == "softmax":
    return lambda x: jax.nn.dot_product_attention(x["q"], x["k"], x["v"], is_causal=True,
                                                  implementation=softmax_impl)
  if op == "log_linear_mamba2":
    return lambda x: ops.log_linear_attention(x["q"], x["k"], x["v"], x["g"],
                                              x["level_scales"], impl="chunked")
  if op == "log_linear_gdn":
    return lambda x: ops.log_linear_gated_delta(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                                x["level_scales"], impl="chunked")
  if op == "path":
    return lambda x: ops.path_attention(x["q"], x["k"], x["v"], x["w"], x["beta"],
                                        impl="blockwise")
  raise ValueError(f"op: unknown {op!r} (known: {', '.join(OPS)})")


def _fwd_bwd(op, softmax_impl):
  f = _forward(op, softmax_impl)

  def loss(x):
    return jnp.sum(f(x).astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss))


def softmax_implementation() -> str | None:
  """'cudnn' where jax.nn.dot_product_attention has it (NVIDIA GPUs), else None (XLA)."""
  if jax.default_backend() != "gpu":
    return None
  try:
    q = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
    jax.block_until_ready(jax.nn.dot_product_attention(q, q, q, is_causal=True,
                                                       implementation="cudnn"))
    return "cudnn"
  except Exception as e:  # noqa: BLE001 - reported, not hidden
    print(f"# cudnn attention unavailable ({type(e).__name__}: {str(e)[:120]}); softmax rows "
          "use XLA", file=sys.stderr)
    return None


def batch_size(T: int, tokens: int | None) -> int:
  """B for sequence length T: tokens // T when a token budget is given, else the
  issues' B (16K tokens per batch for lengths they do not list)."""
  if tokens is not None:
    return max(1, tokens // T)
  return PROTOCOL_BATCH.get(T, max(1, 16384 // T))


def bench(ts=(2048, 8192, 32768), *, tokens: int | None = None, heads: int = 16, head_dim: int = 64,
          dtype=jnp.bfloat16, ops=OPS, repeats: int = 5, out=None, log=print) -> list[dict]:
  """One row per (op, T): {op, T, B, ms, compile_s, anchor_ms, ratio, note}."""
  softmax_impl = softmax_implementation()
  rows = []
  for T in sorted(ts):
    B = batch_size(T, tokens)
    for op in ops:
      row = dict(op=op, T=T, B=B, heads=heads, head_dim=head_dim,
                 dtype=jnp.dtype(dtype).name, device=jax.devices()[0].device_kind,
                 jax=jax.__version__, ms=None, compile_s=None,
                 anchor_ms=ANCHORS_MS.get(op, {}).get(T), ratio=None, note="")
      if op == "softmax":
        row["note"] = f"jax.nn.dot_product_attention implementation={softmax_impl or 'xla'}"
      try:
        x = _inputs(op, B, T, heads, head_dim, dtype, jax.random.PRNGKey(0))
        t0 = time.perf_counter()
        fn = _fwd_bwd(op, softmax_impl).lower(x).compile()
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        row["ms"] = statistics.median(time_ms(fn, x, repeats=repeats))
        if row["anchor_ms"]:
          row["ratio"] = row["ms"] / row["anchor_ms"]
      except Exception as e:  # noqa: BLE001 - an OOM on one shape must not lose the others
        row["note"] = (row["note"] + "; " if row["note"] else "") + \
            f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
      rows.append(row)
      log(json.dumps(row))
      if out:
        with open(out, "a") as f:
          f.write(json.dumps(row) + "\n")
  return rows


def format_table(rows) -> str:
  return markdown_table(rows, [("op", "op"), ("T", "T"), ("B", "B"), ("fwd+bwd ms", "ms"),
                               ("anchor ms (H200, fla / SDPA)", "anchor_ms"),
                               ("ours / anchor", "ratio"), ("compile s", "compile_s"),
                               ("note", "note")], digits=2)

def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--ts", type=int, nargs="+", default=[2048, 8192, 32768])
  p.add_argument("--tokens", type=int, default=None,
                 help="tokens per batch (B = tokens // T); default: the issues' B = 8 / 2 / 1 "
                      "at T = 2K / 8K / 32K")
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", help="append JSON rows here as they are measured")
  a = p.parse_args(argv)
  if min(a.ts) <= 0 or (a.tokens is not None and a.tokens <= 0) or a.repeats <= 0:
    p.error("--ts, --tokens and --repeats must be positive")
  rows = bench(a.ts, tokens=a.tokens, heads=a.heads, head_dim=a.head_dim,
               dtype=jnp.dtype(a.dtype), ops=a.ops, repeats=a.repeats, out=a.out)
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print(format_table(rows))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
