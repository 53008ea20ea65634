"""Calibration metrics and confidence-based test-time scaling (RLCR evaluation).

Inputs are a confidence vector `conf_N` (finite, in [0, 1]) and a correctness
vector `correct_N` (bool or 0/1). Missing confidences must be filled by the
caller first: the official evaluation uses 0 (`fill_missing_confidence`).

Definitions (match the authors' released evaluation code):
  accuracy = mean(c);  Brier = mean((q - c)^2);
  ECE      = sum_b (n_b / N) |mean_b(q) - mean_b(c)| over 10 equal-width bins
             whose outer edges are opened to -inf/+inf. Bin b holds
             edge[b] <= q < edge[b+1] (interior ties go to the UPPER bin) with
             edge = np.linspace(0, 1, n_bins + 1) in float64. Those float edges
             put 0.3, 0.6 and 0.7 a hair BELOW their edges
             (0.30000000000000004, ...), so q = 0.3/0.6/0.7 land in the lower
             bin while 0.1/0.2/0.4/0.5/0.8/0.9 land in the upper one; this is
             what np.digitize does in the official code and it reproduces the
             released metrics exactly.
  AUROC    = P(q_pos > q_neg) + 0.5 P(q_pos = q_neg) (Mann-Whitney with average
             ranks; equals the trapezoidal ROC area). When all samples are
             correct or all wrong the ROC is undefined (sklearn gives NaN); we
             return 0.5, the value of an uninformative score.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple, Sequence

import numpy as np

__all__ = [
    "accuracy", "brier_score", "expected_calibration_error", "ece", "ece_bins", "auroc",
    "calibration_metrics", "fill_missing_confidence", "reliability_diagram", "BinStats",
    "majority_vote", "confidence_weighted_vote", "max_confidence_select", "compare_selectors",
    "SELECTORS",
]


# ---------------------------------------------------------------------------
# Input checks

def _correct_array(correct, name: str = "correct") -> np.ndarray:
  c = np.asarray(correct)
  if c.ndim != 1 or c.size == 0:
    raise ValueError(f"{name}: expected a non-empty 1-D array, got shape {c.shape}")
  if c.dtype == bool:
    return c.astype(np.float64)
  if not np.issubdtype(c.dtype, np.number):
    raise ValueError(f"{name}: expected bool or 0/1 values, got dtype {c.dtype}")
  c = c.astype(np.float64)
  if not np.all((c == 0) | (c == 1)):
    raise ValueError(f"{name}: expected bool or 0/1 values")
  return c


def _conf_array(conf, n: int, name: str = "conf") -> np.ndarray:
  q = np.asarray(conf, dtype=np.float64)
  if q.shape != (n,):
    raise ValueError(f"{name}: expected shape ({n},) like correct, got {q.shape}")
  if not np.all(np.isfinite(q)) or np.any(q < 0) or np.any(q > 1):
    raise ValueError(f"{name}: values must be finite and in [0, 1] "
                     "(fill missing ones with fill_missing_confidence first)")
  return q


def _pair(conf, correct) -> tuple[np.ndarray, np.ndarray]:
  c = _correct_array(correct)
  return _conf_array(conf, c.size), c


def fill_missing_confidence(conf: Sequence[float | None], fill: float = 0.0) -> np.ndarray:
  """Replace None/NaN confidences by `fill` (official evaluation: unparseable -> 0)."""
  if not 0.0 <= fill <= 1.0:
    raise ValueError(f"fill: must be in [0, 1], got {fill}")
  out = np.array([np.nan if v is None else float(v) for v in conf], dtype=np.float64)
  out[np.isnan(out)] = fill
  return out


# ---------------------------------------------------------------------------
# Metrics

def accuracy(correct) -> float:
  """Fraction correct (pass@1 with one sample per question)."""
  return float(_correct_array(correct).mean())


def brier_score(conf, correct) -> float:
  """mean((q - c)^2); 0 is perfect, 1 is confidently wrong everywhere."""
  q, c = _pair(conf, correct)
  return float(np.mean((q - c) ** 2))


class BinStats(NamedTuple):
  """Equal-width confidence bins (outer edges open; see module docstring)."""
  edges: np.ndarray       # (n_bins + 1,) np.linspace(0, 1, n_bins + 1), nominal edges
  count: np.ndarray       # (n_bins,) int samples per bin
  mean_conf: np.ndarray   # (n_bins,) mean confidence per bin (NaN when empty)
  accuracy: np.ndarray    # (n_bins,) accuracy per bin (NaN when empty)


def ece_bins(conf, correct, n_bins: int = 10) -> BinStats:
  """Per-bin counts, mean confidence and accuracy used by ECE and the diagram."""
  if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
    raise ValueError(f"n_bins: expected a positive int, got {n_bins!r}")
  q, c = _pair(conf, correct)
  edges = np.linspace(0.0, 1.0, n_bins + 1)
  # Number of interior edges <= q: edge[b] <= q < edge[b+1] (upper bin on ties).
  idx = np.searchsorted(edges[1:-1], q, side="right")
  count = np.bincount(idx, minlength=n_bins)
  sum_q = np.bincount(idx, weights=q, minlength=n_bins)
  sum_c = np.bincount(idx, weights=c, minlength=n_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_conf = np.where(count > 0, sum_q / np.maximum(count, 1), np.nan)
    acc = np.where(count > 0, sum_c / np.maximum(count, 1), np.nan)
  return BinStats(edges, count, mean_conf, acc)


def expected_calibration_error(conf, correct, n_bins: int = 10) -> float:
  """sum_b (n_b/N) |conf_b - acc_b| over equal-width bins with open outer edges."""
  b = ece_bins(conf, correct, n_bins)
  nonempty = b.count > 0
  w = b.count[nonempty] / b.count.sum()
  return float(np.sum(w * np.abs(b.mean_conf[nonempty] - b.accuracy[nonempty])))


ece = expected_calibration_error


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks with ties given the mean of the ranks they span."""
  order = np.argsort(x, kind="mergesort")
  xs = x[order]
  starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
  ends = np.r_[starts[1:], xs.size]                  # exclusive
  avg = (starts + 1 + ends) / 2.0                    # mean of ranks starts+1 .. ends
  ranks = np.empty(x.size)
  ranks[order] = np.repeat(avg, ends - starts)
  return ranks


def auroc(conf, correct) -> float:
  """Area under the ROC of confidence for correctness; ties count one half.

  Returns 0.5 when one class is absent (the ROC is undefined there).
  """
  q, c = _pair(conf, correct)
  pos = c == 1
  n_pos, n_neg = int(pos.sum()), int((~pos).sum())
  if n_pos == 0 or n_neg == 0:
    return 0.5
  r = _average_ranks(q)
  u = r[pos].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def calibration_metrics(conf, correct, n_bins: int = 10) -> dict[str, float]:
  """All headline numbers: n, accuracy, mean_confidence, brier, ece, auroc."""
  q, c = _pair(conf, correct)
  return {
      "n": int(c.size),
      "accuracy": float(c.mean()),
      "mean_confidence": float(q.mean()),
      "brier": brier_score(q, c),
      "ece": expected_calibration_error(q, c, n_bins),
      "auroc": auroc(q, c),
  }


def reliability_diagram(conf, correct, path: str | os.PathLike, *, title: str | None = None,
                        n_bins: int = 10) -> str:
  """Write a reliability diagram (accuracy vs confidence per bin) as a PNG; returns path.

  Uses the Agg canvas directly, so the global pyplot backend is untouched.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  q, c = _pair(conf, correct)
  b = ece_bins(q, c, n_bins)
  m = calibration_metrics(q, c, n_bins)
  path = os.fspath(path)
  width = 1.0 / n_bins
  centers = (np.arange(n_bins) + 0.5) * width
  nonempty = b.count > 0

  fig = Figure(figsize=(7.5, 4.0), dpi=100)
  FigureCanvasAgg(fig)
  ax, axh = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
  ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfect calibration")
  ax.bar(centers[nonempty], b.accuracy[nonempty], width=width, edgecolor="black",
         color="tab:blue", alpha=0.8, label="accuracy")
  gap = b.mean_conf[nonempty] - b.accuracy[nonempty]
  ax.bar(centers[nonempty], gap, bottom=b.accuracy[nonempty], width=width, color="tab:red",
         alpha=0.3, edgecolor="tab:red", hatch="//", label="gap to mean confidence")
  ax.plot(b.mean_conf[nonempty], b.accuracy[nonempty], "o", color="black", ms=3)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel("confidence")
  ax.set_ylabel("accuracy")
  ax.legend(loc="upper left", fontsize=7)
  ax.set_title(f"acc={m['accuracy']:.3f}  ECE={m['ece']:.3f}  Brier={m['brier']:.3f}  "
               f"AUROC={m['auroc']:.3f}", fontsize=8)
  axh.bar(centers, b.count, width=width, edgecolor="black", color="tab:gray")
  axh.set_xlim(0, 1)
  axh.set_xlabel("confidence")
  axh.set_ylabel("samples per bin")
  axh.set_title(f"N={m['n']}", fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, format="png")
  return path


# ---------------------------------------------------------------------------
# Test-time scaling over N samples of one question

KeyFn = Callable[[str], str]


def _default_key(answer: str) -> str:
  from train.rlcr.rewards import answer_key
  return answer_key(answer)


def _check_samples(answers: Sequence[str | None], confs=None):
  if isinstance(answers, str):
    raise TypeError("answers: expected a sequence of answers, got a str")
  if len(answers) == 0:
    raise ValueError("answers: need at least one sample")
  if confs is None:
    return None
  if len(confs) != len(answers):
    raise ValueError(f"confs: length {len(confs)} != len(answers) {len(answers)}")
  q = np.array([0.0 if v is None or np.isnan(v) else float(v) for v in confs])
  if np.any(q < 0) or np.any(q > 1):
    raise ValueError("confs: values must be in [0, 1] (None/NaN count as 0)")
  return q


def _grouped_scores(answers, weights, key: KeyFn) -> str | None:
  """Answer whose group has the largest summed weight; ties -> earliest first appearance."""
  score: dict[str, float] = {}
  first: dict[str, str] = {}
  for a, w in zip(answers, weights):
    if a is None:
      continue
    k = key(a)
    if k not in score:
      score[k], first[k] = 0.0, a
    score[k] += w
  if not score:
    return None
  best = max(score.values())
  for k, s in score.items():  # dicts keep insertion order = first appearance
    if s == best:
      return first[k]
  raise AssertionError("unreachable")


def majority_vote(answers: Sequence[str | None], *, key: KeyFn | None = None) -> str | None:
  """Most frequent answer (grouped by `key`, default: numeric value / SQuAD-normalized text).

  None answers do not vote; all None -> None. Ties go to the group that appears
  first in `answers`; the returned string is that group's first member.
  """
  _check_samples(answers)
  return _grouped_scores(answers, [1.0] * len(answers), key or _default_key)


def confidence_weighted_vote(answers: Sequence[str | None], confs: Sequence[float | None], *,
                             key: KeyFn | None = None) -> str | None:
  """argmax_a sum_i q_i 1[a_i = a]; missing confidences weigh 0; ties as in majority_vote."""
  q = _check_samples(answers, confs)
  return _grouped_scores(answers, q.tolist(), key or _default_key)


def max_confidence_select(answers: Sequence[str | None],
                          confs: Sequence[float | None]) -> str | None:
  """Answer of the most confident sample that has an answer; ties -> earliest sample."""
  q = _check_samples(answers, confs)
  best, best_q = None, -1.0
  for a, v in zip(answers, q):
    if a is not None and v > best_q:
      best, best_q = a, v
  return best


SELECTORS = ("majority_vote", "confidence_weighted_vote", "max_confidence_select")


def _select(method: str, answers, confs) -> str | None:
  if method == "majority_vote":
    return majority_vote(answers)
  if method == "confidence_weighted_vote":
    return confidence_weighted_vote(answers, confs)
  if method == "max_confidence_select":
    return max_confidence_select(answers, confs)
  raise ValueError(f"method: unknown selector {method!r} (known: {', '.join(SELECTORS)})")


def compare_selectors(answers_QN: Sequence[Sequence[str | None]],
                      confs_QN: Sequence[Sequence[float | None]],
                      golds_Q: Sequence[str | Sequence[str]], *,
                      ns: Sequence[int] = (1, 2, 4, 8, 16),
                      methods: Sequence[str] = SELECTORS,
                      judge: Callable[[str, str], bool] | None = None,
                      subsets: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
  """Accuracy of each selector with n = ns[j] samples per question.

  With subsets=1 the first n samples of each question are used (deterministic);
  with subsets>1 accuracy is averaged over that many random size-n subsets per
  question (numpy Generator seeded with `seed`). Returns {"n": ns, method:
  accuracy per n}. A selected None answer counts as wrong.
  """
  from train.rlcr.rewards import is_correct

  n_q = len(answers_QN)
  if n_q == 0 or len(confs_QN) != n_q or len(golds_Q) != n_q:
    raise ValueError(f"answers_QN/confs_QN/golds_Q: need equal non-zero lengths, got "
                     f"{n_q}, {len(confs_QN)}, {len(golds_Q)}")
  for m in methods:
    if m not in SELECTORS:
      raise ValueError(f"methods: unknown selector {m!r} (known: {', '.join(SELECTORS)})")
  n_avail = min(len(a) for a in answers_QN)
  ns = [int(n) for n in ns]
  if not ns or min(ns) < 1 or max(ns) > n_avail:
    raise ValueError(f"ns: each n must be in [1, {n_avail}] (samples per question), got {ns}")
  if subsets < 1:
    raise ValueError(f"subsets: expected >= 1, got {subsets}")
  rng = np.random.default_rng(seed)
  out = {m: np.zeros(len(ns)) for m in methods}
  for j, n in enumerate(ns):
    for qi in range(n_q):
      answers, confs = list(answers_QN[qi]), list(confs_QN[qi])
      if len(confs) != len(answers):
        raise ValueError(f"confs_QN: question {qi} has {len(confs)} confidences for "
                         f"{len(answers)} answers")
      for s in range(subsets):
        idx = np.arange(n) if subsets == 1 else rng.choice(len(answers), n, replace=False)
        a_sub = [answers[i] for i in idx]
        q_sub = [confs[i] for i in idx]
        for m in methods:
          out[m][j] += is_correct(_select(m, a_sub, q_sub), golds_Q[qi], judge=judge)
    for m in methods:
      out[m][j] /= n_q * subsets
  return {"n": np.array(ns), **out}
