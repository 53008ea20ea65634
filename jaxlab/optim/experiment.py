"""Train one small byte-level LM under AdamW, GaLore (SVD), random projection and one-sided
LoRA at equal rank; write loss curves (PNG + JSON) and a markdown table.

  python -m jaxlab.optim.experiment                 # defaults: < 10 min CPU (2 cores)
  python -m jaxlab.optim.experiment --steps 100 --learning-rates 3e-3 --out-dir /tmp/x

adamw, galore and random run at every learning rate of --learning-rates (one compiled
step per method: the rate is a traced multiplier); the variants of random (random-reset,
lora, lora-fixed) run at random's best rate. Data: the `corpus` task of jaxlab.data
(byte tokenizer) over a fixed list of Python standard-library source files of the
running interpreter (so the text is on every machine; it changes with the Python
version), or --data-files. Every run sees the same batches, the same initial model and
the same learning-rate schedule shape (linear warm-up, cosine decay to 10%).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import sysconfig
import time

STDLIB_FILES = ("argparse.py", "dataclasses.py", "inspect.py", "typing.py", "pathlib.py",
                "functools.py", "enum.py", "textwrap.py", "ast.py", "tokenize.py")


def stdlib_files() -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  files = [os.path.join(root, f) for f in STDLIB_FILES]
  missing = [f for f in files if not os.path.exists(f)]
  if missing:
    raise FileNotFoundError(f"--data-files: standard-library file {missing[0]} not found; "
                            "pass --data-files")
  return files


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
  """adamw, galore and random run at every learning rate; the variants of random
  (random-reset, lora = its adapter dual with the same keys, lora-fixed) run at the best
  learning rate of random."""
  steps: int = 300
  rank: int = 32
  update_every: int = 50
  learning_rates: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
  scale: float = 1.0
  batch_size: int = 16
  seq_len: int = 64
  d_model: int = 128
  n_layers: int = 2
  eval_every: int = 25
  eval_batches: int = 4
  seed: int = 0
  methods: tuple[str, ...] = ("adamw", "galore", "random", "random-reset", "lora", "lora-fixed")


_DUALS = ("random-reset", "lora", "lora-fixed")


def run(cfg: ExperimentConfig, data_files: list[str] | None = None, log=print) -> dict:
  """Train every (method, learning rate); returns {"config", ..., "runs": {"method@lr": {...}},
  "best": {method: "method@lr"}}."""
  import jax
  import numpy as np
  from flax import nnx

  from jaxlab.data import get_task
  from jaxlab.models import LM, ModelConfig
  from jaxlab.optim.methods import MethodConfig, build, make_eval, make_train_step
  from jaxlab.optim.projected import state_bytes

  files = data_files or stdlib_files()
  task = get_task("corpus", seed=cfg.seed, data_files=tuple(files), sample_by="paragraph",
                  seq_len=cfg.seq_len)
  mcfg = ModelConfig(vocab_size=task.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
                     n_heads=max(1, cfg.d_model // 32), ffn_dim=2 * cfg.d_model,
                     max_seq_len=cfg.seq_len)
  test = [task.batch("test", i, cfg.batch_size) for i in range(cfg.eval_batches)]
  train = [task.batch("train", i, cfg.batch_size) for i in range(cfg.steps)]

  def fresh(method):
    # learning_rate=1: the schedule's shape; each run passes its rate as lr_mult.
    mc = MethodConfig(method=method, rank=cfg.rank, learning_rate=1.0, total_steps=cfg.steps,
                      update_every=cfg.update_every, scale=cfg.scale, seed=cfg.seed)
    return build(LM(mcfg, rngs=nnx.Rngs(cfg.seed)), mc)

  runs, best = {}, {}
  order = [m for m in cfg.methods if m not in _DUALS] + [m for m in cfg.methods if m in _DUALS]
  for method in order:
    setup0 = fresh(method)
    step, evaluate = make_train_step(setup0), make_eval(setup0)  # compiled once per method
    lrs = cfg.learning_rates
    if method in _DUALS and "random" in best:
      lrs = (runs[best["random"]]["learning_rate"],)
    for lr in lrs:
      setup = fresh(method)
      params, opt_state, rest = setup.params, setup.opt_state, setup.rest
      opt_bytes = state_bytes(opt_state)
      curve, losses = [], []
      t0 = time.perf_counter()
      for i in range(cfg.steps + 1):
        if i % cfg.eval_every == 0 or i == cfg.steps:
          ev = float(np.mean([float(evaluate(params, rest, b)) for b in test]))
          curve.append((i, ev))
        if i == cfg.steps:
          break
        if setup.merge is not None and i > 0 and i % cfg.update_every == 0:
          params, rest = setup.merge(params, rest)
        params, opt_state, loss = step(params, opt_state, rest, train[i], lr)
        losses.append(float(loss))
      jax.block_until_ready(params)
      key = f"{method}@{lr:g}"
      tail = losses[-max(1, len(losses) // 10):]
      runs[key] = dict(method=method, learning_rate=lr, test_curve=curve,
                       train_loss_last10pct=sum(tail) / len(tail),
                       opt_state_bytes=opt_bytes, trainable_bytes=state_bytes(params),
                       seconds=time.perf_counter() - t0)
      log(f"{key:>16s}: test loss {curve[-1][1]:.4f} ({runs[key]['seconds']:.0f} s)")
      if method not in best or curve[-1][1] < runs[best[method]]["test_curve"][-1][1]:
        best[method] = key
  from jaxlab.bench.common import machine, today
  return dict(config=dataclasses.asdict(cfg), data_files=[os.path.basename(f) for f in files],
              python=sys.version.split()[0], machine=machine(), date=today(), runs=runs,
              best=best)


def table(result: dict) -> str:
  """Markdown: final test loss per (method, learning rate), state bytes, time; * = best lr."""
  runs, best = result["runs"], result["best"]
  base = next((r["opt_state_bytes"] for r in runs.values() if r["method"] == "adamw"), None)
  lrs = sorted({r["learning_rate"] for r in runs.values()})
  lines = ["| method | " + " | ".join(f"test loss @ lr {lr:g}" for lr in lrs)
           + " | optimizer state | vs AdamW | s / run |",
           "|---|" + "---|" * (len(lrs) + 3)]
  for method in dict.fromkeys(r["method"] for r in runs.values()):
    mine = {r["learning_rate"]: (k, r) for k, r in runs.items() if r["method"] == method}
    cells = []
    for lr in lrs:
      if lr not in mine:
        cells.append("")
        continue
      k, r = mine[lr]
      cells.append(f"{r['test_curve'][-1][1]:.4f}" + (" *" if best[method] == k else ""))
    any_run = next(iter(mine.values()))[1]
    ratio = f"{any_run['opt_state_bytes'] / base:.3f}" if base else ""
    secs = sum(r["seconds"] for _, r in mine.values()) / len(mine)
    lines.append(f"| {method} | " + " | ".join(cells)
                 + f" | {any_run['opt_state_bytes'] / 1024:.0f} KiB | {ratio} | {secs:.0f} |")
  return "\n".join(lines)


def dual_gap(result: dict) -> float | None:
  """max |test loss(lora) - test loss(random)| along the curve at the same learning rate."""
  runs = result["runs"]
  lora = [r for r in runs.values() if r["method"] == "lora"]
  if not lora:
    return None
  lr = lora[0]["learning_rate"]
  rnd = [r for r in runs.values() if r["method"] == "random" and r["learning_rate"] == lr]
  if not rnd:
    return None
  return max(abs(a[1] - b[1]) for a, b in zip(lora[0]["test_curve"], rnd[0]["test_curve"]))


def plot(result: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cfg, runs, best = result["config"], result["runs"], result["best"]
  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  styles = {"lora": dict(linestyle="--"), "lora-fixed": dict(linestyle=":"),
            "random-reset": dict(linestyle="-.")}
  for method, key in best.items():
    xs, ys = zip(*runs[key]["test_curve"])
    ax[0].plot(xs, ys, label=f"{method} (lr {runs[key]['learning_rate']:g})",
               **styles.get(method, {}))
    sweep = sorted((r["learning_rate"], r["test_curve"][-1][1]) for r in runs.values()
                   if r["method"] == method)
    if len(sweep) > 1:
      ax[1].plot(*zip(*sweep), marker="o", label=method)
  ax[0].set(title="test loss at each method's best learning rate", xlabel="step",
            ylabel="nats / byte")
  lo = min(r["test_curve"][-1][1] for r in runs.values())
  ax[0].set_ylim(lo - 0.1, lo + 1.5)
  ax[1].set(title=f"final test loss vs learning rate ({cfg['steps']} steps)",
            xlabel="peak learning rate", xscale="log")
  for a in ax:
    a.legend()
    a.grid(alpha=0.3)
  fig.suptitle(f"byte LM d={cfg['d_model']} L={cfg['n_layers']} T={cfg['seq_len']}, rank "
               f"{cfg['rank']}, refresh/merge every {cfg['update_every']} steps")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxlab.optim.experiment", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  d = ExperimentConfig()
  for f in dataclasses.fields(ExperimentConfig):
    if f.name == "methods":
      p.add_argument("--methods", default=",".join(d.methods), help="comma-separated")
    elif f.name == "learning_rates":
      p.add_argument("--learning-rates", default=",".join(f"{x:g}" for x in d.learning_rates),
                     help="comma-separated peak learning rates")
    else:
      p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(d, f.name)),
                     default=getattr(d, f.name))
  p.add_argument("--data-files", nargs="*", default=None)
  p.add_argument("--out-dir", default="docs", help="writes optim_experiment.{json,png} here")
  args = p.parse_args(argv)
  kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(ExperimentConfig)}
  kw["methods"] = tuple(m for m in args.methods.split(",") if m)
  try:
    kw["learning_rates"] = tuple(float(x) for x in args.learning_rates.split(",") if x)
  except ValueError:
    p.error(f"--learning-rates: expected comma-separated numbers, got {args.learning_rates!r}")
  cfg = ExperimentConfig(**kw)
  from jaxlab.optim.methods import METHODS
  for m in cfg.methods:
    if m not in METHODS:
      p.error(f"--methods: unknown method {m!r} (known: {', '.join(METHODS)})")
  result = run(cfg, args.data_files)
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, "optim_experiment.json"), "w") as f:
    json.dump(result, f)
  plot(result, os.path.join(args.out_dir, "optim_experiment.png"))
  print(f"\n{result['machine']}, {result['date']}, Python {result['python']}\n")
  print(table(result))
  gap = dual_gap(result)
  if gap is not None:
    print(f"\nmax |test loss(lora) - test loss(random)| along the curve: {gap:.2e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
