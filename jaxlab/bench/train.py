"""`jaxlab bench train`: compile time and steady-state tokens/s of the default LM config."""

from __future__ import annotations

import time


def add_arguments(p):
  p.add_argument("--steps", type=int, default=30, help="timed steps after warm-up")
  p.add_argument("--batch-size", type=int, default=None)
  p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--out", default=None, help="append JSON rows to this file")


def bench(steps: int = 30, batch_size: int | None = None, compute_dtype: str = "float32") -> dict:
  import jax
  from jaxlab.data import get_task
  from train.lm import build_job
  from train.trainer import Trainer

  over = dict(compute_dtype=compute_dtype, checkpoint_every=0, eval_every=0)
  if batch_size:
    over["batch_size"] = batch_size
  job = build_job(train_overrides=over)
  task = get_task(job.task, seed=0, **job.task_options)
  t0 = time.perf_counter()
  tr = Trainer(job.model, job.train)
  state = tr.init_state()
  b = task.batch("train", 0, job.train.batch_size)
  state, m = tr.train_step(state, b)
  jax.block_until_ready(m["loss"])
  compile_s = time.perf_counter() - t0
  batches = [task.batch("train", i + 1, job.train.batch_size) for i in range(steps)]
  t0 = time.perf_counter()
  for b in batches:
    state, m = tr.train_step(state, b)
  jax.block_until_ready(m["loss"])
  dt = time.perf_counter() - t0
  tokens = steps * job.train.batch_size * task.seq_len
  return dict(config=f"{job.task} d{job.model.d_model} L{job.model.n_layers} "
              f"B{job.train.batch_size} T{task.seq_len}", dtype=compute_dtype,
              compile_s=compile_s, step_ms=1e3 * dt / steps, tokens_per_s=tokens / dt)


def main(args) -> int:
  from jaxlab.bench.common import emit
  emit([bench(args.steps, args.batch_size, args.compute_dtype)], args.out, title="bench train")
  return 0
