"""The task interface shared by synthetic tasks and text corpora.

A task hands out batches as plain numpy arrays:

  batch(split, index, batch_size) -> {'inputs': int32[B, T], 'targets': int32[B, T],
                                      'loss_mask': float32[B, T]}

Batch `index` holds examples index*B ... index*B + B - 1 of the split. Every
example is a pure function of (seed, split, example index), so a batch does not
depend on anything drawn before it, and the first N test examples are the same
whatever batch size an evaluation uses.
"""

from __future__ import annotations

import abc
import hashlib
import zlib

import numpy as np


class DataError(ValueError):
  """Bad data on disk (missing file, malformed record) or a split too small; one line."""


def stable_tag(text: str) -> int:
  """A 32-bit integer for a name, identical across processes and Python versions."""
  return zlib.crc32(text.encode("utf-8"))


def example_rng(seed: int, task: str, split: str, example: int) -> np.random.Generator:
  """The generator of one example: its own seed stream from (seed, task, split, example)."""
  entropy = [int(seed), stable_tag(task), stable_tag(split), int(example)]
  return np.random.default_rng(np.random.SeedSequence(entropy))


def hash_unit(data: bytes) -> float:
  """A uniform number in [0, 1) from a 64-bit BLAKE2b digest of `data`."""
  digest = hashlib.blake2b(data, digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0 ** 64


def check_seed(seed) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
  return int(seed)


class Task(abc.ABC):
  """A source of fixed-length token batches with named splits.

  Attributes: name, vocab_size, seq_len (T of every batch), splits, seed, config.
  """

  name: str
  vocab_size: int
  seq_len: int
  splits: tuple[str, ...]
  seed: int

  @abc.abstractmethod
  def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
    """Batch `index` of `split`: inputs/targets int32[B, T], loss_mask float32[B, T]."""

  def num_examples(self, split: str) -> int | None:
    """How many distinct examples `split` holds, or None for an unbounded generator."""
    self._check_split(split)
    return None

  def _check_split(self, split: str) -> None:
    if split not in self.splits:
      raise ValueError(f"split: unknown split {split!r} for task {self.name!r} "
                       f"(known: {', '.join(self.splits)})")

  def _check_batch_args(self, split: str, index: int, batch_size: int) -> None:
    self._check_split(split)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
      raise ValueError(f"index: expected a non-negative integer, got {index!r}")
    if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
        or batch_size <= 0):
      raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
            f"seq_len={self.seq_len}, splits={self.splits}, seed={self.seed})")


def make_batch(inputs_BT: np.ndarray, targets_BT: np.ndarray,
               loss_mask_BT: np.ndarray) -> dict[str, np.ndarray]:
  """The batch dict with the interface's dtypes."""
  return {
      "inputs": np.ascontiguousarray(inputs_BT, dtype=np.int32),
      "targets": np.ascontiguousarray(targets_BT, dtype=np.int32),
      "loss_mask": np.ascontiguousarray(loss_mask_BT, dtype=np.float32),
  }
