"""RLCR / RLVR rewards: completion parser, answer matching, calibration reward.

Completion format (RLCR, the official "tabc" pattern):

  <think> ... </think><answer> ... </answer><analysis> ... </analysis><confidence> q </confidence>

Format rule (`well_formed`), equivalent to the official regex
`.*?</think>\\s*<answer>.*?</answer>\\s*<analysis>.*?</analysis>\\s*<confidence>.*?</confidence>\\s*\\Z`
(DOTALL) plus the confidence check:
  * `</think>` must appear; an opening `<think>` is optional (the official rule
    does not require it, so a prompt may prefill it);
  * then, in order and separated by whitespace only: `<answer>...</answer>`,
    `<analysis>...</analysis>`, `<confidence>...</confidence>`;
  * the confidence block ends the string (trailing whitespace allowed);
  * the LAST `<confidence>` block must hold a plain decimal number in [0, 1].
Block contents are free text (they may even contain other tags); the last
complete block of each kind is the one that counts for the answer and the
confidence. RLVR ("ta" pattern) needs only `</think>` then `<answer>...</answer>`
ending the string: a trailing confidence block makes an RLVR completion
malformed, exactly as in the official RLVR baseline.

Rewards (R in the paper, up to the official positive affine map):
  RLCR: R = 1[correct] - (q - 1[correct])^2  in [-1, 1]; malformed -> penalty.
  RLVR: R = 1[correct]                      in {0, 1};  malformed -> penalty.
The official code pays 0.5*format + 0.5*accuracy + 0.5*brier, i.e.
1 + 0.5*R for a well-formed RLCR sample and 0 for a malformed one, which is
R = -2 in our units; hence the default RLCR penalty -2.0 (RLVR: 0.5 + 0.5*c vs 0,
i.e. -1.0). With group-mean advantages the affine map only rescales the step.

Answer matching (`answers_match`): if both strings parse as numbers (see
`parse_number`) they match iff numerically equal; otherwise SQuAD-normalized
exact match. A custom `judge(answer, gold) -> bool` replaces it.
"""

from __future__ import annotations

import fractions
import math
import re
import string
from typing import Callable, NamedTuple, Sequence

import numpy as np

__all__ = [
    "TAGS", "FORMATS", "Parsed", "BatchScores", "parse_completion", "parse_confidence",
    "normalize_answer", "parse_number", "answer_key", "answers_match", "is_correct",
    "rlcr_reward", "rlvr_reward", "rlcr_rewards", "rlvr_rewards", "score_batch",
    "group_advantages", "format_completion", "DEFAULT_RLCR_PENALTY", "DEFAULT_RLVR_PENALTY",
]

# The eight tag strings; a byte-level tokenizer may reserve one id for each.
TAGS = ("<think>", "</think>", "<answer>", "</answer>", "<analysis>", "</analysis>",
        "<confidence>", "</confidence>")
FORMATS = ("rlcr", "rlvr")
DEFAULT_RLCR_PENALTY = -2.0
DEFAULT_RLVR_PENALTY = -1.0

Judge = Callable[[str, str], bool]


class Parsed(NamedTuple):
  """What a completion says: last answer, last valid confidence, format flag."""
  answer: str | None        # stripped content of the last <answer> block; None if none
  confidence: float | None  # last <confidence> as a float in [0, 1]; None if missing/bad
  well_formed: bool         # passes the official format rule of the chosen format


class BatchScores(NamedTuple):
  """Per-completion results of `score_batch` (all arrays have length N)."""
  answers: list[str | None]
  confidence_N: np.ndarray   # float64, NaN where missing or invalid
  well_formed_N: np.ndarray  # bool
  correct_N: np.ndarray      # bool: the answer matches gold (format NOT required)
  reward_N: np.ndarray       # float64 reward of the chosen format


# ---------------------------------------------------------------------------
# Parsing

# Anchors between free-text blocks; `\s` is Unicode whitespace, as in the
# official regex (Python's str.isspace agrees with it).
_ANCHORS = {
    "rlcr": (re.compile(r"</think>\s*<answer>"), re.compile(r"</answer>\s*<analysis>"),
             re.compile(r"</analysis>\s*<confidence>")),
    "rlvr": (re.compile(r"</think>\s*<answer>"),),
}
_END_TAG = {"rlcr": "</confidence>", "rlvr": "</answer>"}
# ASCII decimal or scientific notation; no nan/inf, underscores or Unicode digits.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise ValueError(f"fmt: unknown format {fmt!r} (known: {', '.join(FORMATS)})")


def _structure_ok(text: str, fmt: str) -> bool:
  """Official regex without backtracking: anchors matched leftmost, in order.

  Each anchor ("</think> ws <answer>", ...) is a fixed tag pair around optional
  whitespace, cannot overlap itself, and the free text between anchors may be
  empty, so taking the earliest match of each anchor in turn decides existence
  exactly; the final close tag must end the (right-stripped) string.
  """
  pos = 0
  for anchor in _ANCHORS[fmt]:
    m = anchor.search(text, pos)
    if m is None:
      return False
    pos = m.end()
  body = text.rstrip()
  end_tag = _END_TAG[fmt]
  return body.endswith(end_tag) and len(body) - len(end_tag) >= pos


def _last_block(text: str, open_tag: str, close_tag: str) -> str | None:
  """Content of the last match of `open(.*?)close` scanning left to right (findall)."""
  pos, last = 0, None
  while True:
    i = text.find(open_tag, pos)
    if i < 0:
      return last
    j = text.find(close_tag, i + len(open_tag))
    if j < 0:
      return last
    last = text[i + len(open_tag):j]
    pos = j + len(close_tag)


def parse_confidence(s: str | None) -> float | None:
  """A plain ASCII decimal in [0, 1] (surrounding whitespace allowed), else None."""
  if s is None:
    return None
  s = s.strip()
  if not _DECIMAL.fullmatch(s):
    return None
  q = float(s)
  if not math.isfinite(q) or q < 0.0 or q > 1.0:
    return None
  return q + 0.0  # -0.0 -> 0.0


def parse_completion(text: str, *, fmt: str = "rlcr") -> Parsed:
  """Parse one completion; never raises on any string input.

  `answer`/`confidence` are extracted even from malformed completions (useful
  for evaluation); rewards must look at `well_formed` first. For fmt="rlvr"
  the confidence is still extracted if present but is not part of the format.
  """
  _check_format(fmt)
  if not isinstance(text, str):
    raise TypeError(f"text: expected str, got {type(text).__name__}")
  answer = _last_block(text, "<answer>", "</answer>")
  answer = None if answer is None else answer.strip()
  confidence = parse_confidence(_last_block(text, "<confidence>", "</confidence>"))
  ok = _structure_ok(text, fmt)
  if fmt == "rlcr":
    ok = ok and confidence is not None
  return Parsed(answer, confidence, ok)


def format_completion(answer: str, confidence: float | str | None = None, *, think: str = "",
                      analysis: str = "") -> str:
  """Render a completion in the RLCR format (or RLVR when confidence is None)."""
  out = f"<think>{think}</think><answer>{answer}</answer>"
  if confidence is None:
    return out
  return out + f"<analysis>{analysis}</analysis><confidence>{confidence}</confidence>"


# ---------------------------------------------------------------------------
# Answer matching

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
  """SQuAD normalization: lowercase, drop punctuation, drop articles, collapse spaces."""
  s = s.lower()
  s = "".join(ch for ch in s if ch not in _PUNCT)
  s = _ARTICLES.sub(" ", s)
  return " ".join(s.split())


_INT = r"(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)"      # 1000 or 1,000 (groups of 3)
_NUM = re.compile(rf"([+-]?)({_INT}(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]{{1,3}}))?")
_FRAC = re.compile(r"([+-]?[0-9]+)\s*/\s*([0-9]+)")
_LATEX_FRAC = re.compile(r"([+-]?)\\[dt]?frac\{\s*([0-9]+)\s*\}\{\s*([0-9]+)\s*\}")
_BOXED = re.compile(r"\\boxed\{(.*)\}", re.DOTALL)
_MAX_NUMBER_CHARS = 200


def parse_number(s: str) -> fractions.Fraction | None:
  """Exact value of a short numeric answer, or None.

  Accepts (after stripping whitespace, one `\\boxed{...}` and one pair of `$`):
  integers and decimals with an optional sign, thousands commas in groups of
  three ("1,000"), a trailing dot ("3."), exponents up to 3 digits ("1e3"),
  fractions "a/b" and "\\frac{a}{b}" with b != 0. ASCII digits only.
  """
  s = s.strip()
  if len(s) > _MAX_NUMBER_CHARS:
    return None
  m = _BOXED.fullmatch(s)
  if m:
    s = m.group(1).strip()
  if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
    s = s[1:-1].strip()
  m = _NUM.fullmatch(s)
  if m:
    sign, mant, exp = m.groups()
    v = fractions.Fraction(mant.replace(",", "") + ("0" if mant.endswith(".") else ""))
    if exp is not None:
      v *= fractions.Fraction(10) ** int(exp)
    return -v if sign == "-" else v
  m = _FRAC.fullmatch(s)
  if m and int(m.group(2)) != 0:
    return fractions.Fraction(int(m.group(1)), int(m.group(2)))
  m = _LATEX_FRAC.fullmatch(s)
  if m and int(m.group(3)) != 0:
    v = fractions.Fraction(int(m.group(2)), int(m.group(3)))
    return -v if m.group(1) == "-" else v
  return None


def answer_key(answer: str) -> str:
  """Canonical key so equivalent answers group together (used by votes)."""
  v = parse_number(answer)
  if v is not None:
    return f"#{v.numerator}/{v.denominator}"
  return "s:" + normalize_answer(answer)


def answers_match(answer: str, gold: str) -> bool:
  """Numeric equality when both parse as numbers, else SQuAD exact match."""
  a, g = parse_number(answer), parse_number(gold)
  if a is not None and g is not None:
    return a == g
  return normalize_answer(answer) == normalize_answer(gold)


def is_correct(answer: str | None, gold: str | Sequence[str], *,
               judge: Judge | None = None) -> bool:
  """Whether `answer` matches `gold` (a str, or a list/tuple of accepted golds); None is wrong."""
  golds = [gold] if isinstance(gold, str) else list(gold) if isinstance(gold, (list, tuple)) else []
  if not golds or not all(isinstance(g, str) for g in golds):
    raise TypeError(f"gold: expected a str or a non-empty sequence of str, got {gold!r}")
  if answer is None:
    return False
  fn = answers_match if judge is None else judge
  for g in golds:
    verdict = fn(answer, g)
    if not isinstance(verdict, (bool, np.bool_)):
      raise TypeError(f"judge: must return bool, got {type(verdict).__name__}")
    if verdict:
      return True
  return False


# ---------------------------------------------------------------------------
# Rewards

def _check_penalty(malformed_penalty: float, upper: float) -> float:
  p = malformed_penalty
  if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)):
    raise TypeError(f"malformed_penalty: expected a number, got {p!r}")
  p = float(p)
  if not math.isfinite(p) or p >= upper:
    raise ValueError(f"malformed_penalty: must be finite and < {upper} (the lowest well-formed "
                     f"reward), got {p}")
  return p


def rlcr_reward(completion: str, gold: str | Sequence[str], *, judge: Judge | None = None,
                malformed_penalty: float = DEFAULT_RLCR_PENALTY) -> float:
  """1[correct] - (q - 1[correct])^2 if well-formed, else `malformed_penalty` (< -1)."""
  pen = _check_penalty(malformed_penalty, -1.0)
  p = parse_completion(completion, fmt="rlcr")
  if not p.well_formed:
    return pen
  c = float(is_correct(p.answer, gold, judge=judge))
  return c - (p.confidence - c) ** 2


def rlvr_reward(completion: str, gold: str | Sequence[str], *, judge: Judge | None = None,
                malformed_penalty: float = DEFAULT_RLVR_PENALTY) -> float:
  """1[correct] if well-formed in the RLVR (think/answer) format, else the penalty (< 0)."""
  pen = _check_penalty(malformed_penalty, 0.0)
  p = parse_completion(completion, fmt="rlvr")
  if not p.well_formed:
    return pen
  return float(is_correct(p.answer, gold, judge=judge))


def score_batch(completions: Sequence[str], golds: Sequence[str | Sequence[str]], *,
                fmt: str = "rlcr", judge: Judge | None = None,
                malformed_penalty: float | None = None) -> BatchScores:
  """Parse and score N completions against N golds (one gold entry per completion)."""
  _check_format(fmt)
  if isinstance(completions, str) or isinstance(golds, str):
    raise TypeError("completions/golds: expected sequences, got a str")
  if len(completions) != len(golds):
    raise ValueError(f"golds: length {len(golds)} != len(completions) {len(completions)}")
  if malformed_penalty is None:
    malformed_penalty = DEFAULT_RLCR_PENALTY if fmt == "rlcr" else DEFAULT_RLVR_PENALTY
  pen = _check_penalty(malformed_penalty, -1.0 if fmt == "rlcr" else 0.0)
  n = len(completions)
  answers: list[str | None] = []
  conf = np.full(n, np.nan)
  ok = np.zeros(n, bool)
  correct = np.zeros(n, bool)
  reward = np.empty(n)
  for i, (text, gold) in enumerate(zip(completions, golds)):
    p = parse_completion(text, fmt=fmt)
    answers.append(p.answer)
    if p.confidence is not None:
      conf[i] = p.confidence
    ok[i] = p.well_formed
    correct[i] = is_correct(p.answer, gold, judge=judge)
    c = float(correct[i])
    if not p.well_formed:
      reward[i] = pen
    elif fmt == "rlcr":
      reward[i] = c - (p.confidence - c) ** 2
    else:
      reward[i] = c
  return BatchScores(answers, conf, ok, correct, reward)


def rlcr_rewards(completions: Sequence[str], golds: Sequence[str | Sequence[str]], *,
                 judge: Judge | None = None,
                 malformed_penalty: float = DEFAULT_RLCR_PENALTY) -> np.ndarray:
  """Vector of `rlcr_reward` over a batch (float64, length N)."""
  return score_batch(completions, golds, fmt="rlcr", judge=judge,
                     malformed_penalty=malformed_penalty).reward_N


def rlvr_rewards(completions: Sequence[str], golds: Sequence[str | Sequence[str]], *,
                 judge: Judge | None = None,
                 malformed_penalty: float = DEFAULT_RLVR_PENALTY) -> np.ndarray:
  """Vector of `rlvr_reward` over a batch (float64, length N)."""
  return score_batch(completions, golds, fmt="rlvr", judge=judge,
                     malformed_penalty=malformed_penalty).reward_N


def group_advantages(reward_N: np.ndarray, group_size: int) -> np.ndarray:
  """GRPO advantages of the official recipe: r - mean of its group, NO std division.

  `reward_N` holds consecutive groups of `group_size` samples of one prompt.
  """
  r = np.asarray(reward_N, dtype=np.float64)
  if r.ndim != 1:
    raise ValueError(f"reward_N: expected 1-D, got shape {r.shape}")
  if (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
      or group_size < 1):
    raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
  if r.size % group_size:
    raise ValueError(f"group_size: {group_size} does not divide len(reward_N) = {r.size}")
  r_GS = r.reshape(-1, group_size)
  return (r_GS - r_GS.mean(axis=1, keepdims=True)).reshape(-1)
