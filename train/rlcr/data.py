"""Local JSONL loaders for RLCR data (HotpotQA-style and math), as `datasets.Dataset`s.

Input schema, one JSON object per line (blank lines are ignored):

  hotpot: {"question": str, "answer": str | [str, ...], "context"?: CTX, "id"?: str|int}
          CTX is a str, a list of str paragraphs, or HotpotQA's own
          {"title": [...], "sentences": [[...], ...]} / [[title, [sentences]], ...].
  math:   {"problem" | "question": str, "answer": str | int | float | [..], "id"?: str|int}
          ("problem" wins when both are present; numeric answers become strings).

Rows that are not valid JSON objects or miss/mistype a required field are
skipped and counted (the first few reasons are kept); a load never fails on a
bad row. It raises only for a missing file or an unknown `kind`.

Output rows (same columns for both kinds):
  id: str       given id, else "<file stem>-<line number>"
  problem: str  text for the user turn (hotpot: question + exact-match note +
                paragraphs, see prompts.hotpot_problem; math: the problem)
  question: str the bare question
  answer: str   first gold answer
  answers: [str] all accepted gold answers (aliases)
  source: str   "hotpot" | "math"
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from train.rlcr.prompts import hotpot_problem

__all__ = ["KINDS", "LoadResult", "load_jsonl", "normalize_row"]

KINDS = ("hotpot", "math")
_MAX_REASONS = 20
log = logging.getLogger(__name__)


class LoadResult(NamedTuple):
  dataset: Any                        # datasets.Dataset with the output columns above
  n_read: int                         # non-blank lines read
  n_skipped: int                      # malformed rows skipped
  reasons: list[tuple[str, int, str]]  # (file, line, why) for the first skipped rows


class _Bad(Exception):
  pass


def _text(v: Any, field: str) -> str:
  if not isinstance(v, str) or not v.strip():
    raise _Bad(f"{field!r} must be a non-empty string")
  return v


def _answers(v: Any, kind: str) -> list[str]:
  vals = v if isinstance(v, list) else [v]
  out = []
  for a in vals:
    if isinstance(a, bool):
      raise _Bad("'answer' must not be a boolean")
    if kind == "math" and isinstance(a, (int, float)):
      if isinstance(a, float) and not math.isfinite(a):
        raise _Bad("'answer' must be finite")
      a = str(a)
    if not isinstance(a, str) or not a.strip():
      raise _Bad("'answer' must be a non-empty string (or a list of them)")
    out.append(a.strip())
  if not out:
    raise _Bad("'answer' list is empty")
  return out


def _paragraphs(ctx: Any) -> list[str]:
  if ctx is None:
    return []
  if isinstance(ctx, str):
    return [ctx]
  if isinstance(ctx, dict):
    titles, sents = ctx.get("title"), ctx.get("sentences")
    if not isinstance(titles, list) or not isinstance(sents, list) or len(titles) != len(sents):
      raise _Bad("'context' dict needs equal-length 'title' and 'sentences' lists")
    ctx = [[t, s] for t, s in zip(titles, sents)]
  if isinstance(ctx, (list, tuple)):
    out = []
    for p in ctx:
      if isinstance(p, str):
        out.append(p)
      elif (isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str)
            and isinstance(p[1], list) and all(isinstance(s, str) for s in p[1])):
        out.append(f"{p[0]}\n" + "\n".join(p[1]))
      else:
        raise _Bad("'context' paragraphs must be strings or [title, [sentences]] pairs")
    return out
  raise _Bad("'context' must be a string, a list of paragraphs or a HotpotQA context")


def normalize_row(row: Any, kind: str, default_id: str) -> dict[str, Any]:
  """One input object -> one output row; raises ValueError (with the reason) if malformed."""
  if kind not in KINDS:
    raise ValueError(f"kind: unknown kind {kind!r} (known: {', '.join(KINDS)})")
  try:
    if not isinstance(row, dict):
      raise _Bad(f"expected a JSON object, got {type(row).__name__}")
    if "answer" not in row:
      raise _Bad("missing 'answer'")
    answers = _answers(row["answer"], kind)
    rid = row.get("id", default_id)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
      raise _Bad("'id' must be a string or an int")
    if kind == "hotpot":
      question = _text(row.get("question"), "question")
      problem = hotpot_problem(question, _paragraphs(row.get("context")))
    else:
      field = "problem" if "problem" in row else "question"
      question = _text(row.get(field), field)
      problem = question
  except _Bad as e:
    raise ValueError(str(e)) from None
  return {"id": str(rid), "problem": problem, "question": question, "answer": answers[0],
          "answers": answers, "source": kind}


def load_jsonl(paths: str | os.PathLike | Sequence[str | os.PathLike], kind: str) -> LoadResult:
  """Load one or more local JSONL files of `kind` ("hotpot" | "math"); see module docstring."""
  import datasets

  if kind not in KINDS:
    raise ValueError(f"kind: unknown kind {kind!r} (known: {', '.join(KINDS)})")
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = [Path(p) for p in paths]
  for p in paths:
    if not p.is_file():
      raise FileNotFoundError(f"paths: no such file {str(p)!r}")
  rows, reasons, n_read, n_bad = [], [], 0, 0
  for p in paths:
    with open(p, encoding="utf-8", errors="replace") as f:
      for lineno, line in enumerate(f, start=1):
        if not line.strip():
          continue
        n_read += 1
        try:
          rows.append(normalize_row(json.loads(line), kind, f"{p.stem}-{lineno}"))
        except (ValueError, RecursionError) as e:   # JSONDecodeError is a ValueError
          n_bad += 1
          if len(reasons) < _MAX_REASONS:
            reasons.append((str(p), lineno, str(e)[:200]))
  if n_bad:
    log.warning("load_jsonl(%s): skipped %d of %d malformed rows (first: %s)", kind, n_bad,
                n_read, reasons[0])
  features = datasets.Features({
      "id": datasets.Value("string"), "problem": datasets.Value("string"),
      "question": datasets.Value("string"), "answer": datasets.Value("string"),
      "answers": getattr(datasets, "List", datasets.Sequence)(datasets.Value("string")),
      "source": datasets.Value("string"),
  })
  ds = datasets.Dataset.from_list(rows, features=features) if rows else datasets.Dataset.from_dict(
      {k: [] for k in features}, features=features)
  return LoadResult(ds, n_read, n_bad, reasons)
