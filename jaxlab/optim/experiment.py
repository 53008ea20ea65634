"""Train one small byte-level LM under AdamW, GaLore (SVD), random projection and one-sided
LoRA at equal rank; write loss curves (PNG + JSON) and a markdown table.

  python -m jaxlab.optim.experiment                       # defaults: ~5 min on 2 CPU cores
  python -m jaxlab.optim.experiment --steps 100 --methods adamw,random --out-dir /tmp/x

Data: the `corpus` task of jaxlab.data (byte tokenizer) over a fixed list of Python
standard-library source files of the running interpreter (so the text is on every
machine; it changes with the Python version), or --data-files. Every method sees the
same batches, the same initial model and the same learning-rate schedule.
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
  steps: int = 500
  rank: int = 32
  update_every: int = 100
  learning_rate: float = 3e-3
  scale: float = 1.0
  batch_size: int = 16
  seq_len: int = 128
  d_model: int = 128
  n_layers: int = 2
  eval_every: int = 50
  eval_batches: int = 4
  seed: int = 0
  methods: tuple[str, ...] = ("adamw", "galore", "random", "lora", "lora-fixed")


def run(cfg: ExperimentConfig, data_files: list[str] | None = None, log=print) -> dict:
  """Train every method; returns {"config", "machine", "runs": {method: {...}}}."""
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
  runs = {}
  for method in cfg.methods:
    model = LM(mcfg, rngs=nnx.Rngs(cfg.seed))
    mc = MethodConfig(method=method, rank=cfg.rank, learning_rate=cfg.learning_rate,
                      total_steps=cfg.steps, update_every=cfg.update_every, scale=cfg.scale,
                      seed=cfg.seed)
    setup = build(model, mc)
    step, evaluate = make_train_step(setup), make_eval(setup)
    params, opt_state, rest = setup.params, setup.opt_state, setup.rest
    opt_bytes = state_bytes(opt_state)
    curve, train = [], []
    t0 = time.perf_counter()
    for i in range(cfg.steps + 1):
      if i % cfg.eval_every == 0 or i == cfg.steps:
        ev = float(np.mean([float(evaluate(params, rest, b)) for b in test]))
        curve.append((i, ev))
        log(f"{method:>10s} step {i:4d} test loss {ev:.4f}")
      if i == cfg.steps:
        break
      if setup.merge is not None and i > 0 and i % cfg.update_every == 0:
        params, rest = setup.merge(params, rest)
      params, opt_state, loss = step(params, opt_state, rest, task.batch("train", i, cfg.batch_size))
      train.append(float(loss))
    jax.block_until_ready(params)
    runs[method] = dict(test_curve=curve, train_loss=train, opt_state_bytes=opt_bytes,
                        trainable_bytes=state_bytes(params), seconds=time.perf_counter() - t0)
  from jaxlab.bench.common import machine, today
  return dict(config=dataclasses.asdict(cfg), data_files=[os.path.basename(f) for f in files],
              python=sys.version.split()[0], machine=machine(), date=today(), runs=runs)


def table(result: dict) -> str:
  """Markdown: final test loss, mean train loss of the last 10%, state bytes, time."""
  runs = result["runs"]
  base = runs.get("adamw", {}).get("opt_state_bytes")
  lines = ["| method | final test loss | train loss (last 10%) | optimizer state | vs AdamW | s |",
           "|---|---|---|---|---|---|"]
  for m, r in runs.items():
    tail = r["train_loss"][-max(1, len(r["train_loss"]) // 10):]
    ratio = f"{r['opt_state_bytes'] / base:.3f}" if base else ""
    lines.append(f"| {m} | {r['test_curve'][-1][1]:.4f} | {sum(tail) / len(tail):.4f} | "
                 f"{r['opt_state_bytes'] / 1024:.0f} KiB | {ratio} | {r['seconds']:.0f} |")
  return "\n".join(lines)


def plot(result: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cfg = result["config"]
  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  styles = {"lora": dict(linestyle="--"), "lora-fixed": dict(linestyle=":")}
  for m, r in result["runs"].items():
    xs, ys = zip(*r["test_curve"])
    ax[0].plot(xs, ys, label=m, **styles.get(m, {}))
    tr = r["train_loss"]
    k = 10
    smooth = [sum(tr[max(0, i - k + 1):i + 1]) / len(tr[max(0, i - k + 1):i + 1])
              for i in range(len(tr))]
    ax[1].plot(range(1, len(tr) + 1), smooth, label=m, **styles.get(m, {}))
  ax[0].set(title="test loss (nats/byte)", xlabel="step")
  ax[1].set(title="train loss (10-step mean)", xlabel="step")
  for a in ax:
    a.legend()
    a.grid(alpha=0.3)
  fig.suptitle(f"byte LM d={cfg['d_model']} L={cfg['n_layers']}, rank {cfg['rank']}, "
               f"refresh/merge every {cfg['update_every']} steps")
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
    else:
      p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(d, f.name)),
                     default=getattr(d, f.name))
  p.add_argument("--data-files", nargs="*", default=None)
  p.add_argument("--out-dir", default="docs", help="writes optim_experiment.{json,png} here")
  args = p.parse_args(argv)
  kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(ExperimentConfig)}
  kw["methods"] = tuple(m for m in args.methods.split(",") if m)
  cfg = ExperimentConfig(**kw)
  from jaxlab.optim.methods import METHODS
  for m in cfg.methods:
    if m not in METHODS:
      p.error(f"--methods: unknown method {m!r} (known: {', '.join(METHODS)})")
  result = run(cfg, args.data_files)
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, "optim_experiment.json"), "w") as f:
    json.dump(result, f, indent=1)
  plot(result, os.path.join(args.out_dir, "optim_experiment.png"))
  print(f"\n{result['machine']}, {result['date']}, Python {result['python']}\n")
  print(table(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
