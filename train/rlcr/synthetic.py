"""Synthetic verifiable QA with irreducible, per-class uncertainty (RLCR default task).

Each question names a key and a nonce: ``"Q: k07 n418?"``. The key fixes an
answer distribution over the digits 0-9; the gold answer of a prompt is drawn
from that distribution by a keyed hash of (seed, key, nonce). The gold is thus a
deterministic function of the prompt string (so `gold(prompt)` needs no state),
but to a model the nonce is noise: the best it can do is learn each key's
distribution, answer its mode, and state the mode's probability.

Keys are split evenly over uncertainty classes. A class is a tuple of integer
weights over a common denominator D (default D = 4):

  class  weights   answer probs          Bayes accuracy = calibrated confidence
  0      (4,)      1.0                   1.00
  1      (3, 1)    0.75, 0.25            0.75
  2      (2, 1, 1) 0.5, 0.25, 0.25       0.50
  3      (1,1,1,1) 0.25 each             0.25

The hash value mod D picks the answer, so the class probabilities are exact.
Train and test share the keys (the facts must be memorized) but use disjoint
nonces, so a model cannot pass the test by memorizing (key, nonce) pairs.

SFT warm-up targets use the RLCR format with the gold answer of the prompt (so
answer frequencies follow the key's distribution) and a confidence that is NOT
calibrated: by default a uniformly random one-decimal value "0.0".."1.0"
(independent of the question), so the SFT model emits every confidence and RL
has exploration to work with and a miscalibration to fix. `sft_confidence="one"`
always writes "1.0" (the overconfident RLVR-like start); "oracle" writes the
class's calibrated value (an upper-bound control, not for the real recipe);
"overconfident" mixes an informative but overconfident value, p ** (1/3) on the
grid (0.25 -> 0.6, 0.5 -> 0.8, 0.75 -> 0.9, 1 -> 1.0), like an LLM's verbal
confidence, with the uniform one (`sft_mix` = share of the informative value).

Completion bytes: the 8 RLCR tags alone take 82 bytes, so a byte-level model
sees ~90-byte completions (e.g. ``<think>k07</think><answer>3</answer><analysis>
</analysis><confidence>0.7</confidence>``); registering each tag in `TAGS` as
one token brings that to 8 tag tokens + ~8 content bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import NamedTuple

import numpy as np

from train.rlcr.rewards import format_completion

__all__ = ["SyntheticQAConfig", "SyntheticQA", "SFTExample", "DEFAULT_CLASSES",
           "SFT_CONFIDENCE_MODES"]

DEFAULT_CLASSES = ((4,), (3, 1), (2, 1, 1), (1, 1, 1, 1))
SFT_CONFIDENCE_MODES = ("random", "one", "oracle", "overconfident")
SPLITS = ("train", "test")
_PROMPT = re.compile(r"Q: k([0-9]+) n([0-9]+)\?")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticQAConfig:
  """Task shape. Defaults: 32 keys x 4 classes, 1000 nonces of which 16 are test."""
  seed: int = 0
  n_keys: int = 32
  n_nonces: int = 1000
  n_test_nonces: int = 16          # test set = all keys x these nonces (512 prompts)
  classes: tuple[tuple[int, ...], ...] = DEFAULT_CLASSES
  sft_confidence: str = "random"   # one of SFT_CONFIDENCE_MODES
  sft_mix: float = 0.5             # "overconfident": share of p**sft_power (rest uniform)
  sft_power: float = 1 / 3         # "overconfident": 0.25 -> 0.6, 0.5 -> 0.8, 0.75 -> 0.9, 1 -> 1
  think: bool = True               # SFT <think> echoes the key ("k07"); else empty
  analysis: str = ""               # SFT <analysis> text (constant)

  def __post_init__(self):
    def bad(field, msg):
      raise ValueError(f"SyntheticQAConfig.{field}: {msg}")
    try:
      object.__setattr__(self, "classes", tuple(tuple(w) for w in self.classes))
    except TypeError:
      bad("classes", f"expected a sequence of weight sequences, got {self.classes!r}")
    if not all(isinstance(x, int) and not isinstance(x, bool) for w in self.classes for x in w):
      bad("classes", f"weights must be ints, got {self.classes!r}")
    for f in ("seed", "n_keys", "n_nonces", "n_test_nonces"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, int):
        bad(f, f"expected an int, got {v!r}")
    if self.seed < 0:
      bad("seed", f"must be >= 0, got {self.seed}")
    if not self.classes:
      bad("classes", "need at least one class")
    denoms = {sum(w) for w in self.classes}
    if len(denoms) != 1 or any(len(w) == 0 or len(w) > 10 or min(w) < 1 for w in self.classes):
      bad("classes", "each class needs 1-10 positive int weights with one common sum, got "
          f"{self.classes!r}")
    if self.n_keys < len(self.classes) or self.n_keys > 100:
      bad("n_keys", f"must be in [{len(self.classes)}, 100], got {self.n_keys}")
    if not 2 <= self.n_nonces <= 1000:
      bad("n_nonces", f"must be in [2, 1000], got {self.n_nonces}")
    if not 1 <= self.n_test_nonces < self.n_nonces:
      bad("n_test_nonces", f"must be in [1, n_nonces), got {self.n_test_nonces}")
    if self.sft_confidence not in SFT_CONFIDENCE_MODES:
      bad("sft_confidence", f"unknown mode {self.sft_confidence!r} "
          f"(known: {', '.join(SFT_CONFIDENCE_MODES)})")
    for f, lo, hi in (("sft_mix", 0.0, 1.0), ("sft_power", 0.0, 1.0)):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        bad(f, f"must be a number in [{lo}, {hi}], got {v!r}")
    if self.sft_power == 0:
      bad("sft_power", "must be > 0")
    if any(t in self.analysis for t in ("<", ">")):
      bad("analysis", "must not contain '<' or '>'")


class SFTExample(NamedTuple):
  prompt: str
  completion: str
  gold: str


class SyntheticQA:
  """Deterministic synthetic QA task; see the module docstring.

  >>> task = SyntheticQA(seed=0)
  >>> p = task.prompts("test")[0]          # e.g. "Q: k00 n417?"
  >>> task.gold(p), task.optimal_confidence(p)
  """

  def __init__(self, seed: int = 0, **overrides):
    self.config = SyntheticQAConfig(seed=seed, **overrides)
    cfg = self.config
    rng = np.random.default_rng([cfg.seed, 0x5EED])
    n_cls = len(cfg.classes)
    self._denom = sum(cfg.classes[0])
    # Balanced class assignment, shuffled over keys.
    self._key_class = rng.permutation(np.arange(cfg.n_keys) % n_cls)
    # Per key: distinct digits, most likely first.
    self._key_answers = [
        [str(d) for d in rng.choice(10, size=len(cfg.classes[c]), replace=False)]
        for c in self._key_class
    ]
    perm = rng.permutation(cfg.n_nonces)
    self._test_nonces = np.sort(perm[:cfg.n_test_nonces])
    self._train_nonces = np.sort(perm[cfg.n_test_nonces:])
    self._test_set = frozenset(self._test_nonces.tolist())
    self._salt = f"jaxlab-rlcr-synthetic-{cfg.seed}".encode()

  # -- prompts -------------------------------------------------------------
  @staticmethod
  def prompt(key: int, nonce: int) -> str:
    return f"Q: k{key:02d} n{nonce:03d}?"

  def parse_prompt(self, prompt: str) -> tuple[int, int]:
    """(key, nonce) of a prompt of this task; ValueError naming `prompt` otherwise."""
    m = _PROMPT.fullmatch(prompt) if isinstance(prompt, str) else None
    if m is None:
      raise ValueError(f"prompt: not a synthetic-task prompt: {prompt!r}")
    key, nonce = int(m.group(1)), int(m.group(2))
    cfg = self.config
    if key >= cfg.n_keys or nonce >= cfg.n_nonces or prompt != self.prompt(key, nonce):
      raise ValueError(f"prompt: key/nonce out of range for this task: {prompt!r}")
    return key, nonce

  def _nonces(self, split: str) -> np.ndarray:
    if split == "train":
      return self._train_nonces
    if split == "test":
      return self._test_nonces
    raise ValueError(f"split: unknown split {split!r} (known: {', '.join(SPLITS)})")

  def prompts(self, split: str) -> list[str]:
    """All prompts of a split, key-major (train: n_keys x (n_nonces - n_test_nonces))."""
    nonces = self._nonces(split)
    return [self.prompt(k, int(n)) for k in range(self.config.n_keys) for n in nonces]

  def sample_prompts(self, split: str, n: int, rng: np.random.Generator) -> list[str]:
    """`n` prompts drawn uniformly with replacement from a split using `rng`."""
    nonces = self._nonces(split)
    keys = rng.integers(0, self.config.n_keys, size=n)
    picks = rng.integers(0, nonces.size, size=n)
    return [self.prompt(int(k), int(nonces[j])) for k, j in zip(keys, picks)]

  def split_of(self, prompt: str) -> str:
    return "test" if self.parse_prompt(prompt)[1] in self._test_set else "train"

  # -- answers ---------------------------------------------------------------
  def key_class(self, prompt: str) -> int:
    """Uncertainty class index of the prompt's key."""
    return int(self._key_class[self.parse_prompt(prompt)[0]])

  def answer_probs(self, prompt: str) -> dict[str, float]:
    """The key's answer distribution {digit: probability}, most likely first."""
    key, _ = self.parse_prompt(prompt)
    w = self.config.classes[self._key_class[key]]
    return {a: wi / self._denom for a, wi in zip(self._key_answers[key], w)}

  def optimal_answer(self, prompt: str) -> str:
    return next(iter(self.answer_probs(prompt)))

  def optimal_confidence(self, prompt: str) -> float:
    """Bayes accuracy of the best answer = the calibrated confidence for it."""
    return max(self.answer_probs(prompt).values())

  def p_correct(self, prompt: str, answer: str | None) -> float:
    """Probability (over the nonce hash) that `answer` is the gold for this key."""
    if answer is None:
      return 0.0
    return self.answer_probs(prompt).get(answer.strip(), 0.0)

  def gold(self, prompt: str) -> str:
    """The gold answer of a prompt (deterministic; a hash of seed, key and nonce)."""
    key, nonce = self.parse_prompt(prompt)
    w = self.config.classes[self._key_class[key]]
    h = hashlib.blake2b(f"{key}:{nonce}".encode(), digest_size=8, key=self._salt).digest()
    # Exact class probabilities when D divides 2^64 (D = 4); else bias < D / 2^64.
    r = int.from_bytes(h, "little") % self._denom
    for a, wi in zip(self._key_answers[key], w):
      if r < wi:
        return a
      r -= wi
    raise AssertionError("unreachable")

  # -- SFT -------------------------------------------------------------------
  def completion(self, prompt: str, answer: str, confidence: float | str) -> str:
    """RLCR-format completion for `prompt` with the configured think/analysis text."""
    key, _ = self.parse_prompt(prompt)
    conf = confidence if isinstance(confidence, str) else f"{confidence:.2g}"
    think = f"k{key:02d}" if self.config.think else ""
    return format_completion(answer, conf, think=think, analysis=self.config.analysis)

  def sft_examples(self, n: int, *, split: str = "train", seed: int = 0) -> list[SFTExample]:
    """`n` SFT warm-up examples (prompt, completion, gold), deterministic in (task seed, seed).

    The answer is the prompt's gold; the confidence follows `sft_confidence`:
    "random" uniform on 0.0..1.0; "one" always 1.0; "oracle" the calibrated value;
    "overconfident" the calibrated value p raised to `sft_power` and rounded to the
    grid (informative but overconfident) with probability `sft_mix`, else uniform.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
      raise ValueError(f"n: expected a non-negative int, got {n!r}")
    rng = np.random.default_rng([self.config.seed, seed, 1])
    prompts = self.sample_prompts(split, n, rng)
    grid = [f"{i / 10:.1f}" for i in range(11)]
    conf_idx = rng.integers(0, 11, size=n)
    mode = self.config.sft_confidence
    if mode == "overconfident":  # drawn after the shared streams: prompts match other modes
      own = rng.random(n) < self.config.sft_mix
    out = []
    for i, (p, ci) in enumerate(zip(prompts, conf_idx)):
      g = self.gold(p)
      if mode == "random":
        conf = grid[ci]
      elif mode == "overconfident":
        over = self.optimal_confidence(p) ** self.config.sft_power
        conf = f"{round(over * 10) / 10:.1f}" if own[i] else grid[ci]
      elif mode == "one":
        conf = "1.0"
      else:
        conf = f"{self.optimal_confidence(p):g}"
      out.append(SFTExample(p, self.completion(p, g, conf), g))
    return out

  # -- reference numbers -----------------------------------------------------
  def expected_scores(self, prompts: list[str], answers: list[str | None],
                      confs: list[float | None]) -> dict[str, float]:
    """Noise-free scores: expectations over the hidden coin instead of the drawn golds.

    With p_i = p_correct(prompt_i, answer_i) and q_i the confidence (None -> 0):
    accuracy = mean p; brier = mean p(1-q)^2 + (1-p)q^2; rlcr_reward = accuracy - brier
    (malformed samples are not modelled: pass only well-formed ones).
    """
    if not len(prompts) == len(answers) == len(confs) or not prompts:
      raise ValueError("prompts/answers/confs: need equal non-zero lengths")
    p = np.array([self.p_correct(pr, a) for pr, a in zip(prompts, answers)])
    q = np.array([0.0 if c is None else float(c) for c in confs])
    if np.any(q < 0) or np.any(q > 1) or not np.all(np.isfinite(q)):
      raise ValueError("confs: values must be in [0, 1] or None")
    brier = float(np.mean(p * (1 - q) ** 2 + (1 - p) * q ** 2))
    acc = float(p.mean())
    return {"accuracy": acc, "brier": brier, "rlcr_reward": acc - brier}

  def class_table(self) -> list[dict]:
    """Per class: weights, number of keys, Bayes accuracy, and the optimal RLCR reward p^2."""
    rows = []
    for c, w in enumerate(self.config.classes):
      p = max(w) / self._denom
      rows.append({"class": c, "weights": w, "n_keys": int(np.sum(self._key_class == c)),
                   "bayes_accuracy": p, "optimal_brier": p * (1 - p), "optimal_reward": p * p})
    return rows
