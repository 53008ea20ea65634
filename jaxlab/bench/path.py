"""PaTH attention benchmark: time and compiled peak memory vs T, blockwise vs naive.

`bench(ts)` returns one row per (op, impl, T):
  op       "fwd" or "fwd+bwd" (output and all six input gradients)
  impl     "naive" (materialized T x T, fp32) or "blockwise"
  T        sequence length
  ms       median wall time of `repeats` runs after one warm-up (None: not run)
  peak_mb  arguments + outputs + XLA temporaries of the compiled program, from
           `jax.jit(f).lower(...).compile().memory_analysis()` (None: not compiled)
  note     why a row was not run or not compiled
Naive is skipped where its T x T buffers are infeasible (fwd above naive_max_t["fwd"],
fwd+bwd above naive_max_t["fwd+bwd"]: its reference scan keeps every step's keys for the
backward, O(T^2 K)). Rows above run_max_t are compiled (memory) but not timed.

`experiment(out_dir)` trains small LMs on flip-flop and S5/A5 with each mixer through the
same job builder, Trainer and loop as `jaxlab train lm`, but evaluates every split of the
task (flip-flop: test, test_ood_sparse, test_ood_dense), and writes results.json, a
markdown table and a PNG.

Run: python -m jaxlab.bench.path bench --ts 1024 2048 4096 8192 16384
     python -m jaxlab.bench.path experiment --out-dir runs/path_experiment
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from jaxlab.bench.common import markdown_table, peak_mb, time_ms
from jaxlab.ops.path import _path_attention

NAIVE_MAX_T = {"fwd": 4096, "fwd+bwd": 1024}
RUN_MAX_T = {"fwd": 16384, "fwd+bwd": 4096}


def _inputs(T, *, batch, heads, kv_heads, head_dim, gate, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (batch, T, heads, head_dim))
  k = jax.random.normal(ks[1], (batch, T, kv_heads, head_dim))
  v = jax.random.normal(ks[2], (batch, T, kv_heads, head_dim))
  w = jax.random.normal(ks[3], (batch, T, kv_heads, head_dim))
  w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
  beta = jax.random.uniform(ks[4], (batch, T, kv_heads), minval=1.5, maxval=2.0)
  g = jnp.log(jax.random.uniform(ks[5], (batch, T, heads), minval=0.95, maxval=1.0)) if gate else None
  return dict(q=q, k=k, v=v, w=w, beta=beta, g=g)


def _program(op, impl, block):
  def f(x):
    return _path_attention(**x, impl=impl, block_size=block)
  if op == "fwd":
    return f

  def f_bwd(x):
    o, vjp = jax.vjp(f, x)
    return o, vjp(jnp.ones_like(o))[0]
  return f_bwd


def bench(ts: list[int], *, repeats: int = 3, batch: int = 1, heads: int = 2,
          kv_heads: int = 2, head_dim: int = 64, block: int = 64, gate: bool = True,
          ops=("fwd", "fwd+bwd"), impls=("naive", "blockwise"),
          naive_max_t=None, run_max_t=None) -> list[dict]:
  """Rows {op, impl, T, ms, peak_mb, note} for every T in ts (see module doc)."""
  naive_max_t = {**NAIVE_MAX_T, **(naive_max_t or {})}
  run_max_t = {**RUN_MAX_T, **(run_max_t or {})}
  rows = []
  for T in ts:
    x = _inputs(T, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, gate=gate)
    for op in ops:
      for impl in impls:
        row = dict(op=op, impl=impl, T=T, ms=None, peak_mb=None, note="")
        if impl == "naive" and T > naive_max_t[op]:
          row["note"] = f"skipped: naive {op} keeps O(T^2) buffers (limit T <= {naive_max_t[op]})"
          rows.append(row)
          continue
        compiled = jax.jit(_program(op, impl, block)).lower(x).compile()
        row["peak_mb"] = peak_mb(compiled)
        if T > run_max_t[op]:
          row["note"] = f"compiled only (timed up to T = {run_max_t[op]})"
        else:
          row["ms"] = statistics.median(time_ms(compiled, x, repeats=repeats))
        rows.append(row)
  return rows


def format_table(rows) -> str:
  return markdown_table(rows, [("op", "op"), ("impl", "impl"), ("T", "T"), ("ms", "ms"),
                               ("peak MB", "peak_mb"), ("note", "note")])


# ----------------------------------------------------------------------------- experiment

# Per task: task options and training length (CPU budget: the whole grid < 15 CPU min).
EXPERIMENT_TASKS = {
    "flipflop": dict(task_options=dict(seq_len=64), steps=250),
    "s5": dict(task_options=dict(seq_len=16), steps=1000),
    "a5": dict(task_options=dict(seq_len=16), steps=1000),
}
EXPERIMENT_MIXERS = ("attention", "path", "path_fox")


def experiment(out_dir, *, tasks=tuple(EXPERIMENT_TASKS), mixers=EXPERIMENT_MIXERS, seed=0,
               d_model=64, layers=1, heads=2, batch_size=32, learning_rate=3e-3,
               eval_every=50, steps=None, seq_len=None) -> list[dict]:
  """Train every (task, mixer) at equal size; rows with per-split token error and
  exact match of the final model. Runs live in out_dir/<task>-<mixer> (resumable)."""
  import json
  from pathlib import Path

  from jaxlab.data import get_task
  from jaxlab.models.transformer import count_params
  from train.lm import build_job
  from train.loop import evaluate, run
  from train.trainer import Trainer

  out_dir = Path(out_dir)
  rows = []
  for task_name in tasks:
    spec = EXPERIMENT_TASKS[task_name]
    n_steps = steps or spec["steps"]
    for mixer in mixers:
      topts = dict(spec["task_options"], **({} if seq_len is None else dict(seq_len=seq_len)))
      job = build_job(task=task_name, task_options=topts,
                      model_overrides=dict(mixer=mixer, d_model=d_model, n_layers=layers,
                                           n_heads=heads),
                      train_overrides=dict(steps=n_steps, batch_size=batch_size,
                                           learning_rate=learning_rate,
                                           warmup_steps=max(1, n_steps // 10),
                                           eval_every=eval_every, checkpoint_every=n_steps,
                                           seed=seed))
      run_dir = out_dir / f"{task_name}-{mixer}"
      row_file = run_dir / "result.json"
      if row_file.exists():  # finished earlier: keep its row (and its CPU time)
        rows.append(json.loads(row_file.read_text()))
        continue
      task = get_task(job.task, seed=job.train.seed, **job.task_options)
      trainer = Trainer(job.model, job.train)
      cpu0 = time.process_time()
      out = run(trainer, task, run_dir, progress=False, eval_splits=task.splits,
                log=lambda *_: None)
      params = out["state"].params
      row = dict(task=task_name, mixer=mixer, steps=n_steps, seq_len=task.seq_len,
                 layers=layers, d_model=d_model, heads=heads,
                 params=count_params(trainer.model(params)),
                 cpu_s=round(time.process_time() - cpu0, 1))
      for split in task.splits:
        if split != "train":
          ev = evaluate(trainer, params, task, split=split)
          row[f"{split}/error"] = 1.0 - ev[f"{split}/token_accuracy"]
          row[f"{split}/exact_match"] = ev[f"{split}/exact_match"]
      row_file.write_text(json.dumps(row))
      rows.append(row)
      print(json.dumps(row), flush=True)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
  plot_experiment(rows, out_dir, out_dir / "path_experiment.png")
  return rows


def experiment_table(rows) -> str:
  cols = sorted({k[:-len("/error")] for r in rows for k in r if k.endswith("/error")},
                key=lambda s: (s != "test", s))
  out = ["| task | mixer | params | " + " | ".join(f"{c} error" for c in cols) + " | test exact match | CPU s |",
         "|---|---|---|" + "---|" * len(cols) + "---|---|"]
  for r in rows:
    errs = " | ".join("" if f"{c}/error" not in r else f"{100 * r[f'{c}/error']:.2f}%" for c in cols)
    out.append(f"| {r['task']} (T={r['seq_len']}, {r['steps']} steps) | {r['mixer']} | "
               f"{r['params']} | {errs} | {r['test/exact_match']:.3f} | {r['cpu_s']} |")
  return "\n".join(out)


def plot_experiment(rows, out_dir, path):
  """One panel per task: test token error (log scale) vs step, one line per mixer."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from pathlib import Path

  from train.metrics import read_metrics

  tasks = list(dict.fromkeys(r["task"] for r in rows))
  fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for r in rows:
      if r["task"] != task:
        continue
      recs = [x for x in read_metrics(Path(out_dir) / f"{task}-{r['mixer']}")
              if "test/token_accuracy" in x]
      ax.plot([x["step"] for x in recs], [max(1e-4, 1 - x["test/token_accuracy"]) for x in recs],
              marker=".", label=r["mixer"])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("test token error")
    ax.set_title(task)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  b = sub.add_parser("bench", help="time / peak memory vs T")
  b.add_argument("--ts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
  b.add_argument("--repeats", type=int, default=3)
  b.add_argument("--block", type=int, default=64)
  e = sub.add_parser("experiment", help="flip-flop and S5/A5 with attention, path, path_fox")
  e.add_argument("--out-dir", default="runs/path_experiment")
  e.add_argument("--tasks", nargs="+", default=list(EXPERIMENT_TASKS))
  e.add_argument("--mixers", nargs="+", default=list(EXPERIMENT_MIXERS))
  e.add_argument("--seed", type=int, default=0)
  e.add_argument("--steps", type=int, default=None, help="override every task's steps")
  e.add_argument("--layers", type=int, default=1)
  e.add_argument("--batch-size", type=int, default=32)
  e.add_argument("--seq-len", type=int, default=None, help="override every task's seq_len")
  a = p.parse_args(argv)
  if a.cmd == "bench":
    rows = bench(a.ts, repeats=a.repeats, block=a.block)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"jax {jax.__version__} {jax.default_backend()}, {datetime.date.today()}")
    print(format_table(rows))
  else:
    rows = experiment(a.out_dir, tasks=a.tasks, mixers=a.mixers, seed=a.seed, steps=a.steps,
                      layers=a.layers, batch_size=a.batch_size, seq_len=a.seq_len)
    print(experiment_table(rows))


if __name__ == "__main__":
  main()
