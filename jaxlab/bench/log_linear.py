"""Forward-time and memory benchmark of the log-linear ops (chunked vs naive vs recurrent).

`bench(ts)` returns one row per (op, impl, T): {"op", "impl", "T", "ms", "peak_mb",
"note", "mode"}. ms is the best (minimum) wall time of `repeats` jitted calls after
one warm-up (the minimum is the least disturbed by other load on a shared
machine); peak_mb is XLA's compiled memory analysis (arguments + outputs + temps
- aliased) of the same function. mode="fwd" times the forward; mode="fwd_bwd"
times value-and-gradient w.r.t. every input (autodiff), to see the memory the
backward needs. Forms that would not fit or take too long are skipped and listed
as rows with ms = None and a note saying why.

    python -m jaxlab.bench.log_linear --ts 1024 2048 4096 8192 16384
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from jaxlab.bench.common import markdown_table, peak_mb, time_ms
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


def _fn(op, impl, mode="fwd"):
  if op == "log_linear_attention":
    f = lambda x: ll.log_linear_attention(x["q"], x["k"], x["v"], x["g"], x["level_scales"],
                                          impl=impl)
  else:
    f = lambda x: ll.log_linear_gated_delta(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                            x["level_scales"], impl=impl)
  if mode == "fwd":
    return f
  if mode != "fwd_bwd":
    raise ValueError(f"mode: unknown {mode!r} (known: fwd, fwd_bwd)")
  return jax.value_and_grad(lambda x: jnp.sum(f(x) ** 2))


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
          mode: str = "fwd", seed: int = 0) -> list[dict]:
  """Rows {op, impl, T, ms, peak_mb, note, mode} for every op x impl x T (module doc)."""
  rows = []
  for T in ts:
    x = _inputs(int(T), batch, heads, groups, dk, dv, jax.random.PRNGKey(seed))
    for op in ops:
      for impl in impls:
        note = _skip(op, impl, T, naive_max_t, gdn_naive_max_t, recurrent_max_t)
        if note:
          rows.append(dict(op=op, impl=impl, T=int(T), ms=None, peak_mb=None, note=note,
                           mode=mode))
          continue
        compiled = jax.jit(_fn(op, impl, mode)).lower(x).compile()
        rows.append(dict(op=op, impl=impl, T=int(T), ms=min(time_ms(compiled, x, repeats=repeats)),
                         peak_mb=peak_mb(compiled), note="", mode=mode))
  return rows


def format_table(rows) -> str:
  """Markdown table of bench rows."""
  return markdown_table(rows, [("op", "op"), ("impl", "impl"), ("T", "T"), ("mode", "mode"),
                               ("ms", "ms"), ("peak MB", "peak_mb"), ("note", "note")])

MQAR_MIXERS = ("attention", "mamba2", "log_linear_mamba2", "gated_deltanet",
               "log_linear_gated_deltanet")


def mqar_report(root, png=None, mixers=MQAR_MIXERS, title=None) -> str:
  """Markdown table (and optional PNG of test token accuracy vs step) of the
  `jaxlab train lm` runs in root/<mixer>/metrics.jsonl (see docs/log_linear.md)."""
  import os
  curves = {}
  for m in mixers:
    path = os.path.join(root, m, "metrics.jsonl")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      recs = [json.loads(line) for line in f if "test/loss" in line]
    curves[m] = recs
  out = ["| mixer | steps | test loss | test token acc | test exact match |",
         "|---|---|---|---|---|"]
  for m, recs in curves.items():
    r = recs[-1]
    out.append(f"| {m} | {r['step']} | {r['test/loss']:.3f} | {r['test/token_accuracy']:.3f} "
               f"| {r['test/exact_match']:.3f} |")
  if png:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for m, recs in curves.items():
      steps = [r["step"] for r in recs]
      axes[0].plot(steps, [r["test/loss"] for r in recs], marker="o", ms=3, label=m)
      axes[1].plot(steps, [r["test/token_accuracy"] for r in recs], marker="o", ms=3, label=m)
    axes[0].set(xlabel="step", ylabel="test loss", yscale="log")
    axes[1].set(xlabel="step", ylabel="test token accuracy", ylim=(0, 1))
    axes[1].legend(fontsize=8)
    fig.suptitle(title or os.path.basename(os.path.normpath(root)))
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
  return "\n".join(out)


def mqar_accuracy_by_query(run_dir, *, examples: int = 256, bucket: int = 8) -> dict[int, float]:
  """Test token accuracy of a finished `jaxlab train lm` MQAR run, by query position.

  Every pair is queried once, so a late query can be answered by elimination (the values
  not yet asked for) without recall; accuracy on the early queries shows real lookup.
  Returns {first position of the bucket: accuracy} over `examples` test sequences.
  """
  import os

  import numpy as np

  from jaxlab.data import get_task
  from train.checkpoint import Checkpoints
  from train.lm import build_job
  from train.trainer import Trainer
  with open(os.path.join(run_dir, "config.json")) as f:
    cfg = json.load(f)
  if cfg.get("task") != "mqar":
    raise ValueError(f"run_dir: {run_dir} is a {cfg.get('task')!r} run, not mqar")
  job = build_job(task=cfg["task"], task_options=cfg["task_options"],
                  model_overrides=cfg["model"], train_overrides=cfg["train"])
  task = get_task(job.task, seed=job.train.seed, **job.task_options)
  trainer = Trainer(job.model, job.train)
  ckpts = Checkpoints(os.path.join(run_dir, "checkpoints"), every=1)
  state = ckpts.restore(trainer.abstract_state)
  ckpts.close()
  b = task.batch("test", 0, examples)
  _, preds = trainer.eval_batch(state.params, b)
  ok = np.asarray(preds) == b["targets"]
  mask = np.asarray(b["loss_mask"]).astype(bool)
  _, pos = np.nonzero(mask)
  hits = ok[mask]
  return {int(p): float(hits[pos // bucket * bucket == p].mean())
          for p in np.unique(pos // bucket * bucket)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--ts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--dk", type=int, default=64)
  p.add_argument("--dv", type=int, default=64)
  p.add_argument("--impls", nargs="+", default=list(IMPLS))
  p.add_argument("--ops", nargs="+", default=list(OPS))
  p.add_argument("--mode", default="fwd", choices=("fwd", "fwd_bwd"))
  p.add_argument("--naive-max-t", type=int, default=8192)
  p.add_argument("--recurrent-max-t", type=int, default=16384)
  p.add_argument("--json", help="also write the rows here")
  p.add_argument("--mqar-report", metavar="RUN_ROOT",
                 help="instead of benchmarking, tabulate (and plot, with --png) the MQAR runs "
                      "in RUN_ROOT/<mixer>/metrics.jsonl")
  p.add_argument("--png", help="plot for --mqar-report")
  p.add_argument("--title", help="plot title for --mqar-report (default: RUN_ROOT's name)")
  p.add_argument("--mqar-by-query", metavar="RUN_DIR",
                 help="instead of benchmarking, print the test accuracy of one finished MQAR "
                      "run by query position (early queries need recall, late ones can be "
                      "answered by elimination)")
  a = p.parse_args(argv)
  if a.mqar_by_query:
    acc = mqar_accuracy_by_query(a.mqar_by_query)
    print("| query positions | " + " | ".join(f"{p}-{p + 7}" for p in acc) + " |")
    print("|---|" + "---|" * len(acc))
    print("| token accuracy | " + " | ".join(f"{v:.2f}" for v in acc.values()) + " |")
    return
  if a.mqar_report:
    print(mqar_report(a.mqar_report, a.png, title=a.title))
    return
  rows = bench(a.ts, repeats=a.repeats, heads=a.heads, dk=a.dk, dv=a.dv, impls=a.impls,
               ops=a.ops, mode=a.mode, naive_max_t=a.naive_max_t,
               gdn_naive_max_t=min(4096, a.naive_max_t), recurrent_max_t=a.recurrent_max_t)
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print(format_table(rows))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
