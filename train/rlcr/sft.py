"""SFT warm-up: teach the completion format with the loss on completion tokens only.

`SFTTask` adapts any source of (prompt ids, completion ids) examples to the
`train.loop` task protocol, so the warm-up reuses the project's jitted, sharded
`Trainer` step, Orbax checkpoints (resume), metrics and progress bar. Batches are
a pure function of (split, index), as the loop requires for exact resumption.

Layout of one example (right-padded to seq_len + 1 tokens, then shifted):
  sequence = prompt + completion (+ pad)
  inputs = sequence[:-1], targets = sequence[1:],
  loss_mask = 1 where the target is a completion token (EOS included).
Positions are 0.. from the first prompt token, as in decoding a left-padded
prompt with the cache (padding only ever follows the real tokens here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

__all__ = ["sft_arrays", "SFTTask", "synthetic_examples_fn", "run_sft"]

ExamplesFn = Callable[[str, int, int], Sequence[tuple[Sequence[int], Sequence[int]]]]


def sft_arrays(examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int,
               pad_id: int) -> dict[str, np.ndarray]:
  """inputs/targets int32 [B, seq_len] and loss_mask f32 [B, seq_len] (see module doc)."""
  B = len(examples)
  seq = np.full((B, seq_len + 1), pad_id, np.int32)
  loss = np.zeros((B, seq_len + 1), np.float32)
  for i, (p, c) in enumerate(examples):
    n = len(p) + len(c)
    if len(p) == 0 or len(c) == 0:
      raise ValueError(f"examples: example {i} has an empty prompt or completion")
    if n > seq_len + 1:
      raise ValueError(f"examples: example {i} has {n} tokens > seq_len + 1 = {seq_len + 1}")
    seq[i, :len(p)] = p
    seq[i, len(p):n] = c
    loss[i, len(p):n] = 1.0
  return dict(inputs=seq[:, :-1], targets=seq[:, 1:], loss_mask=loss[:, 1:])


class SFTTask:
  """`train.loop` task over SFT examples: batch(split, index, n) -> inputs/targets/loss_mask."""

  def __init__(self, examples_fn: ExamplesFn, *, seq_len: int, vocab_size: int, pad_id: int,
               name: str = "rlcr-sft"):
    self.examples_fn, self.seq_len, self.vocab_size = examples_fn, seq_len, vocab_size
    self.pad_id, self.name = pad_id, name

  def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
    return sft_arrays(self.examples_fn(split, index, batch_size), self.seq_len, self.pad_id)


def synthetic_examples_fn(task, tokenizer) -> ExamplesFn:
  """Examples of a `SyntheticQA` task: [BOS] + prompt bytes -> completion + [EOS].

  Batch `index` of a split uses `task.sft_examples(n, split=split, seed=index)`.
  """
  def fn(split: str, index: int, n: int):
    out = []
    for ex in task.sft_examples(n, split=split, seed=index):
      p = [tokenizer.bos_id, *tokenizer.encode(ex.prompt).tolist()]
      c = [*tokenizer.encode(ex.completion).tolist(), tokenizer.eos_id]
      out.append((p, c))
    return out
  return fn


def run_sft(model_cfg, train_cfg, task: SFTTask, run_dir, *, mesh=None, progress: bool = True,
            log=print):
  """Train (or resume, or just restore when finished) the warm-up in run_dir.

  Returns (trainer, params, final metrics); params is the pure dict of the last state.
  """
  from train.loop import run
  from train.trainer import Trainer

  trainer = Trainer(model_cfg, train_cfg, mesh=mesh)
  out = run(trainer, task, Path(run_dir), progress=progress, log=log)
  return trainer, out["state"].params, out["final"]
