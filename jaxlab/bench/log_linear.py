"""Forward-time and memory benchmark of the log-linear ops (chunked vs naive vs recurrent).

`bench(ts)` returns one row per (op, impl, T): {"op", "impl", "T", "ms", "peak_mb",
"note"}. ms is the median wall time of `repeats` jitted forward calls after one
warm-up; peak_mb is XLA's compiled memory analysis (arguments + outputs + temps
- aliased) of the same function. Forms that would not fit or take too long are
skipped and listed as rows with ms = None and a note saying why.

    python -m jaxlab.bench.log_linear --ts 1024 2048 4096 8192 16384
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from jaxlab.ops import log_linear as ll

OPS = ("log_linear_attention", "log_linear_gated_delta")
IMPLS = ("chunked", "naive", "recurrent")


def _inputs(T, batch, heads, groups, dk, dv, key):
  """fla's distribution (papers.md 1.2) with non-negative lambdas."""
  ks = jax.random.split(key, 7)
  L = ll.num_levels(T)
  dt = jax.nn.softplus(jax.random.normal(ks[0], (batch, T, heads)) - 4.0)
  x = jax.random.normal(ks[1], (batch, T, heads, dv))
  return dict(
      q=jax.random.normal(ks[2], (batch, T, groups, dk)),
      k=jax.random.normal(ks[3], (batch, T, groups, dk)) / dk ** 0.5,
      v=x * dt[..., None],
      g=-jnp.exp(jax.random.uniform(ks[4], (heads,))) * dt,
      beta=jax.nn.sigmoid(jax.random.normal(ks[5], (batch, T, heads))),
      level_scales=jax.nn.softplus(jax.random.normal(ks[6], (batch, T, heads, L))))


def _fn(op, impl):
  if op == "log_linear_attention":
    return lambda x: ll.log_linear_attention(x["q"], x["k"], x["v"], x["g"], x["level_scales"],
                                             impl=impl)
  return lambda x: ll.log_linear_gated_delta(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                             x["level_scales"], impl=impl)


def _peak_mb(compiled) -> float:
  m = compiled.memory_analysis()
  if m is None:
    return float("nan")
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return total / 2 ** 20


def _skip(op, impl, T, naive_max_t, gdn_naive_max_t, recurrent_max_t):
  if impl == "naive":
    cap = gdn_naive_max_t if op == "log_linear_gated_delta" else naive_max_t
    if T > cap:
      return (f"skipped: T x T fp32 matrices per head (and for GDN an O(T^3) triangular "
              f"solve) beyond T={cap}")
  if impl == "recurrent" and T > recurrent_max_t:
    return f"skipped: token-by-token scan too slow beyond T={recurrent_max_t}"
  return None


def bench(ts: list[int], *, repeats: int = 3, batch: int = 1, heads: int = 4, groups: int = 1,
          dk: int = 64, dv: int = 64, ops=OPS, impls=IMPLS, naive_max_t: int = 8192,
          gdn_naive_max_t: int = 4096, recurrent_max_t: int = 16384,
          seed: int = 0) -> list[dict]:
  """Rows {op, impl, T, ms, peak_mb, note} for every op x impl x T (see module doc)."""
  rows = []
  for T in ts:
    x = _inputs(int(T), batch, heads, groups, dk, dv, jax.random.PRNGKey(seed))
    for op in ops:
      for impl in impls:
        note = _skip(op, impl, T, naive_max_t, gdn_naive_max_t, recurrent_max_t)
        if note:
          rows.append(dict(op=op, impl=impl, T=int(T), ms=None, peak_mb=None, note=note))
          continue
        compiled = jax.jit(_fn(op, impl)).lower(x).compile()
        jax.block_until_ready(compiled(x))
        times = []
        for _ in range(repeats):
          t0 = time.perf_counter()
          jax.block_until_ready(compiled(x))
          times.append(1000 * (time.perf_counter() - t0))
        rows.append(dict(op=op, impl=impl, T=int(T), ms=statistics.median(times),
                         peak_mb=_peak_mb(compiled), note=""))
  return rows


def format_table(rows) -> str:
  """Markdown table of bench rows."""
  out = ["| op | impl | T | fwd ms | peak MB | note |", "|---|---|---|---|---|---|"]
  for r in rows:
    ms = "-" if r["ms"] is None else f"{r['ms']:.1f}"
    mb = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
    out.append(f"| {r['op']} | {r['impl']} | {r['T']} | {ms} | {mb} | {r.get('note', '')} |")
  return "\n".join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--ts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--dk", type=int, default=64)
  p.add_argument("--dv", type=int, default=64)
  p.add_argument("--impls", nargs="+", default=list(IMPLS))
  p.add_argument("--json", help="also write the rows here")
  a = p.parse_args(argv)
  rows = bench(a.ts, repeats=a.repeats, heads=a.heads, dk=a.dk, dv=a.dv, impls=a.impls)
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print(format_table(rows))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
