"""Synthetic diagnostic tasks: MQAR, flip-flop, and the S5 / A5 word problems.

Each example is drawn from its own seed stream (seed, task, split, example) and
then accepted only if a 64-bit hash of its token sequence falls in its split's
bucket: held-out splits take hashes in [0, HOLDOUT), "train" the rest. So a test
sequence can never occur in training, whatever the seed or the number of draws.
The labels (targets, loss_mask) are a pure function of the sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import numpy as np

from jaxlab.config import require
from jaxlab.data.base import DataError, Task, example_rng, hash_unit, make_batch

HOLDOUT = 0.25      # share of the sequence space reserved for held-out splits
MAX_TRIES = 1000    # draws per example before declaring the sequence space too small


class SyntheticTask(Task):
  """A generator of token sequences with hash-disjoint train / held-out splits."""

  def __init__(self, name: str, config: Any, seed: int):
    self.name = name
    self.config = config
    self.seed = seed

  # -- per task -------------------------------------------------------------
  def _split_params(self, split: str) -> Any:
    """What `_draw` needs for `split` (e.g. the flip-flop probabilities)."""
    return None

  def _draw(self, rng: np.random.Generator, params: Any) -> np.ndarray:
    """One candidate token sequence (1-D int array)."""
    raise NotImplementedError

  def _label(self, seqs_BL: np.ndarray) -> dict[str, np.ndarray]:
    """The batch (inputs, targets, loss_mask) of stacked sequences."""
    raise NotImplementedError

  # -- shared -----------------------------------------------------------------
  @staticmethod
  def is_heldout_sequence(seq: np.ndarray) -> bool:
    """True if `seq` belongs to the held-out part of the sequence space."""
    return hash_unit(np.asarray(seq, dtype="<i4").tobytes()) < HOLDOUT

  def example_sequence(self, split: str, example: int) -> np.ndarray:
    """The token sequence of example `example` of `split` (before the input/target shift)."""
    self._check_split(split)
    rng = example_rng(self.seed, self.name, split, example)
    params = self._split_params(split)
    heldout = split != "train"
    for _ in range(MAX_TRIES):
      seq = self._draw(rng, params)
      if self.is_heldout_sequence(seq) == heldout:
        return seq
    raise DataError(f"task {self.name!r}: no sequence for split {split!r} after {MAX_TRIES} "
                    f"draws; the sequence space is too small for disjoint splits "
                    f"(increase seq_len)")

  def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
    self._check_batch_args(split, index, batch_size)
    start = int(index) * int(batch_size)
    seqs = [self.example_sequence(split, start + b) for b in range(int(batch_size))]
    return self._label(np.stack(seqs))


# ----------------------------------------------------------------------------- MQAR


@dataclasses.dataclass(frozen=True, kw_only=True)
class MQARConfig:
  """Multi-query associative recall (Zoology / Based).

  Layout of the T+1 tokens (inputs are the first T, targets the last T):
    k1 v1 k2 v2 ... kN vN | query region: 0-filled, with Q (key, value) pairs at
    random even offsets, each key one of k1..kN (distinct).
  Token 0 fills the gaps; keys come from [1, 1 + K), values from [1 + K, vocab_size),
  K = (vocab_size - 1) // 2. Scored: the targets at query keys (= their values).
  """
  num_kv_pairs: int = 4
  seq_len: int = 32
  vocab_size: int = 64
  num_queries: int | None = None    # None: one query per pair

  def __post_init__(self):
    c = "MQARConfig"
    for f in ("num_kv_pairs", "seq_len", "vocab_size"):
      v = getattr(self, f)
      require(v > 0, c, f, f"must be > 0, got {v}")
    q = self.queries
    require(0 < q <= self.num_kv_pairs, c, "num_queries",
            f"must be in [1, num_kv_pairs={self.num_kv_pairs}], got {q}")
    require(self.num_keys >= self.num_kv_pairs, c, "vocab_size",
            f"{self.vocab_size} leaves {self.num_keys} key tokens for "
            f"{self.num_kv_pairs} distinct keys (need vocab_size >= {2 * self.num_kv_pairs + 1})")
    require(self.num_slots >= q, c, "seq_len",
            f"{self.seq_len} has room for {self.num_slots} queries after "
            f"{self.num_kv_pairs} pairs, need {q} (need seq_len >= "
            f"{2 * self.num_kv_pairs + 2 * q - 1})")

  @property
  def queries(self) -> int:
    return self.num_kv_pairs if self.num_queries is None else self.num_queries

  @property
  def num_keys(self) -> int:
    return (self.vocab_size - 1) // 2

  @property
  def num_slots(self) -> int:
    """Places for a (key, value) query pair in the query region."""
    return (self.seq_len + 1 - 2 * self.num_kv_pairs) // 2


class MQARTask(SyntheticTask):
  splits = ("train", "test")

  def __init__(self, config: MQARConfig, seed: int):
    super().__init__("mqar", config, seed)
    self.vocab_size = config.vocab_size
    self.seq_len = config.seq_len
    self.key_lo = 1
    self.value_lo = 1 + config.num_keys

  def _draw(self, rng, params):
    c = self.config
    n, q = c.num_kv_pairs, c.queries
    keys = rng.choice(c.num_keys, size=n, replace=False) + self.key_lo
    values = rng.integers(self.value_lo, c.vocab_size, size=n)
    seq = np.zeros(c.seq_len + 1, np.int32)
    seq[0:2 * n:2] = keys
    seq[1:2 * n:2] = values
    asked = rng.choice(n, size=q, replace=False)
    pos = 2 * n + 2 * rng.choice(c.num_slots, size=q, replace=False)
    seq[pos] = keys[asked]
    seq[pos + 1] = values[asked]
    return seq

  def _label(self, seqs_BL):
    """Scored: key tokens in the query region (there, keys occur only as queries)."""
    inputs, targets = seqs_BL[:, :-1], seqs_BL[:, 1:]
    t = np.arange(self.seq_len)[None, :]
    is_key = (inputs >= self.key_lo) & (inputs < self.value_lo)
    mask = is_key & (t >= 2 * self.config.num_kv_pairs)
    return make_batch(inputs, targets, mask)


# ----------------------------------------------------------------------------- flip-flop

# Tokens: bits first so that a bit token equals its value.
FF_ZERO, FF_ONE, FF_WRITE, FF_READ, FF_IGNORE = 0, 1, 2, 3, 4
FF_TOKENS = ("0", "1", "w", "r", "i")

# Liu et al. 2023: FFL(p_i) with p_w = p_r = (1 - p_i) / 2.
FF_OOD = {
    "test_ood_sparse": (0.01, 0.01, 0.98),
    "test_ood_dense": (0.45, 0.45, 0.10),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlipFlopConfig:
  """Flip-flop language (Liu et al. 2023, "Exposing attention glitches").

  seq_len/2 instructions, each followed by a bit: w (write the bit), r (read: the
  bit equals the last written one), i (ignore: random bit). The first instruction
  is w and the last is r. Scored: the targets at r positions (the read bit).
  "train" and "test" use (p_write, p_read, p_ignore); "test_ood_sparse" uses
  FFL(0.98) and "test_ood_dense" FFL(0.1), whatever the options.
  """
  seq_len: int = 512
  p_write: float = 0.1
  p_read: float = 0.1
  p_ignore: float = 0.8

  def __post_init__(self):
    c = "FlipFlopConfig"
    require(self.seq_len >= 4 and self.seq_len % 2 == 0, c, "seq_len",
            f"must be an even number >= 4, got {self.seq_len}")
    for f in ("p_write", "p_read", "p_ignore"):
      v = getattr(self, f)
      require(0.0 <= v <= 1.0, c, f, f"must be in [0, 1], got {v}")
    total = self.p_write + self.p_read + self.p_ignore
    require(abs(total - 1.0) < 1e-6, c, "p_ignore",
            f"p_write + p_read + p_ignore must be 1, got {total}")


class FlipFlopTask(SyntheticTask):
  splits = ("train", "test", "test_ood_sparse", "test_ood_dense")
  vocab_size = len(FF_TOKENS)

  def __init__(self, config: FlipFlopConfig, seed: int):
    super().__init__("flipflop", config, seed)
    self.seq_len = config.seq_len

  def _split_params(self, split):
    c = self.config
    p = FF_OOD.get(split, (c.p_write, c.p_read, c.p_ignore))
    return np.asarray(p, np.float64) / sum(p)

  def _draw(self, rng, probs):
    n = self.seq_len // 2
    instr = np.array([FF_WRITE, FF_READ, FF_IGNORE])[rng.choice(3, size=n, p=probs)]
    instr[0], instr[-1] = FF_WRITE, FF_READ
    bits = rng.integers(0, 2, size=n)
    is_read = instr == FF_READ
    last_write = np.maximum.accumulate(np.where(instr == FF_WRITE, np.arange(n), 0))
    bits[is_read] = bits[last_write[is_read]]
    seq = np.empty(2 * n, np.int32)
    seq[0::2], seq[1::2] = instr, bits
    return seq

  def _label(self, seqs_BL):
    targets = np.zeros_like(seqs_BL)
    targets[:, :-1] = seqs_BL[:, 1:]
    return make_batch(seqs_BL, targets, seqs_BL == FF_READ)


# ----------------------------------------------------------------------------- S5 / A5


@functools.lru_cache(maxsize=None)
def permutation_group(name: str) -> tuple[np.ndarray, np.ndarray]:
  """(perms int8[G, 5], table int32[G, G]) for "s5" or "a5".

  Elements are permutations p of (0..4) as image arrays (p[i] = image of i) in
  lexicographic order, so id 0 is the identity. table[a, b] is the id of
  "apply a, then b": the permutation i -> b[a[i]].
  """
  perms = list(itertools.permutations(range(5)))
  if name == "a5":
    perms = [p for p in perms
             if sum(p[i] > p[j] for i in range(5) for j in range(i + 1, 5)) % 2 == 0]
  elif name != "s5":
    raise ValueError(f"name: unknown permutation group {name!r} (known: a5, s5)")
  arr = np.asarray(perms, np.int8)
  ids = {p: i for i, p in enumerate(perms)}
  table = np.empty((len(perms), len(perms)), np.int32)
  for a, pa in enumerate(perms):
    for b, pb in enumerate(perms):
      table[a, b] = ids[tuple(pb[pa[i]] for i in range(5))]
  return arr, table


@dataclasses.dataclass(frozen=True, kw_only=True)
class PermutationConfig:
  """Word problem of S5 / A5 (Merrill et al. 2024, "The illusion of state").

  Inputs: seq_len uniform group elements g_1..g_T (token = element id). Target at t:
  the id of the running product "g_1, then g_2, ..., then g_t". Every position is scored.
  """
  seq_len: int = 16

  def __post_init__(self):
    require(self.seq_len > 0, "PermutationConfig", "seq_len", f"must be > 0, got {self.seq_len}")


class PermutationTask(SyntheticTask):
  splits = ("train", "test")

  def __init__(self, group: str, config: PermutationConfig, seed: int):
    super().__init__(group, config, seed)
    self.perms, self.table = permutation_group(group)
    self.vocab_size = len(self.perms)
    self.seq_len = config.seq_len

  def _draw(self, rng, params):
    return rng.integers(0, self.vocab_size, size=self.seq_len).astype(np.int32)

  def _label(self, seqs_BL):
    state = seqs_BL[:, 0]
    targets = np.empty_like(seqs_BL)
    targets[:, 0] = state
    for t in range(1, seqs_BL.shape[1]):
      state = self.table[state, seqs_BL[:, t]]
      targets[:, t] = state
    return make_batch(seqs_BL, targets, np.ones(seqs_BL.shape, np.float32))

  def element(self, element_id: int) -> tuple[int, ...]:
    """The permutation (image tuple) of an element id."""
    return tuple(int(x) for x in self.perms[element_id])
