"""The training loop around a Trainer: data, periodic eval, metrics, resumable checkpoints."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

from train.checkpoint import Checkpoints
from train.metrics import MetricsWriter
from train.trainer import Trainer, TrainState, to_host


# Debug hook for the resume test: SIGKILL this process right after this step.
_KILL_AT_STEP = int(os.environ.get("JAXLAB_DEBUG_KILL_AT_STEP", "0") or 0)


class Task(Protocol):
  name: str
  vocab_size: int
  seq_len: int

  def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
    ...


def evaluate(trainer: Trainer, params, task: Task, *, split: str = "test") -> dict[str, float]:
  """Teacher-forced loss, token accuracy and exact match over `eval_batches` test batches."""
  from jaxlab.data.metrics import exact_match
  cfg = trainer.cfg
  losses, ems, accs = [], [], []
  for i in range(cfg.eval_batches):
    b = task.batch(split, i, cfg.eval_batch_size)
    loss, preds = trainer.eval_batch(params, b)
    m = exact_match(preds, b["targets"], b["loss_mask"])
    losses.append(loss)
    ems.append(m["exact_match"])
    accs.append(m["token_accuracy"])
  return {f"{split}/loss": float(np.mean(losses)), f"{split}/exact_match": float(np.mean(ems)),
          f"{split}/token_accuracy": float(np.mean(accs))}


def run(trainer: Trainer, task: Task, run_dir, *, progress: bool = True,
        checkpoint: bool = True, eval_splits: tuple[str, ...] = ("test",),
        log=print) -> dict[str, Any]:
  """Train to `cfg.steps`, resuming from the latest checkpoint in run_dir if any.

  Returns the final metrics (train loss of the last step and the last eval).
  """
  cfg = trainer.cfg
  run_dir = Path(run_dir)
  is_main = jax.process_index() == 0
  writer = MetricsWriter(run_dir, tensorboard=is_main) if is_main else None
  ckpts = (Checkpoints(run_dir / "checkpoints", every=cfg.checkpoint_every or cfg.steps,
                       keep=cfg.keep_checkpoints) if checkpoint else None)
  start = 0
  if ckpts is not None and ckpts.latest_step is not None:
    state: TrainState = ckpts.restore(trainer.abstract_state)
    start = int(to_host(state.step))
    if writer:
      writer.truncate_after(start)
    log(f"resumed from step {start} ({run_dir})")
  else:
    state = trainer.init_state()

  bar = None
  if progress and is_main and start < cfg.steps:
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {task.name}", unit="step",
               file=sys.stderr, dynamic_ncols=True)
  final: dict[str, Any] = {}
  t0 = time.perf_counter()
  compile_s = None
  for step in range(start, cfg.steps):
    batch = task.batch("train", step, cfg.batch_size)
    state, metrics = trainer.train_step(state, batch)
    done = step + 1
    if compile_s is None:
      jax.block_until_ready(metrics["loss"])
      compile_s = time.perf_counter() - t0
    rec = None
    if done % cfg.log_every == 0 or done == cfg.steps:
      rec = {k: float(to_host(v)) for k, v in metrics.items()}
      final.update(rec)
    if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
      ev = {}
      for split in eval_splits:
        ev.update(evaluate(trainer, state.params, task, split=split))
      rec = {**(rec or {}), **ev}
      final.update(ev)
    if rec is not None and writer:
      writer.write(done, rec)
    if bar is not None:
      bar.update(1)
      if rec is not None:
        bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.4f}",
                        **({"em": f"{rec['test/exact_match']:.3f}"} if "test/exact_match" in rec
                           else {}))
    if ckpts is not None:
      ckpts.maybe_save(done, state, force=(done == cfg.steps))
    if done == _KILL_AT_STEP:  # test hook: die hard, as a preempted job would
      os.kill(os.getpid(), signal.SIGKILL)
  if bar is not None:
    bar.close()
  if ckpts is not None:
    ckpts.wait()
    ckpts.close()
  if writer:
    writer.close()
  final["steps"] = cfg.steps
  final["wall_s"] = time.perf_counter() - t0
  if compile_s is not None:
    final["first_step_s"] = compile_s
  return dict(final=final, state=state)
