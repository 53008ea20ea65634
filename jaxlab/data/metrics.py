"""Exact-match metrics over scored positions (numpy; accepts jax arrays).

An example counts as an exact match only if every scored position is right;
examples with no scored position take no part in the example-level figure.
"""

from __future__ import annotations

import numpy as np


def _check(pred_BT, targets_BT, loss_mask_BT):
  pred = np.asarray(pred_BT)
  tgt = np.asarray(targets_BT)
  mask = np.asarray(loss_mask_BT)
  for name, a in (("pred_BT", pred), ("targets_BT", tgt), ("loss_mask_BT", mask)):
    if a.ndim != 2:
      raise ValueError(f"{name}: expected a 2-D [batch, time] array, got shape {a.shape}")
  if pred.shape != tgt.shape or mask.shape != tgt.shape:
    raise ValueError(f"pred_BT, targets_BT, loss_mask_BT: shapes differ "
                     f"({pred.shape}, {tgt.shape}, {mask.shape})")
  if np.issubdtype(pred.dtype, np.floating):
    raise ValueError(f"pred_BT: expected token ids (integers), got dtype {pred.dtype}; "
                     f"take argmax of the logits first")
  return pred, tgt, mask != 0


def exact_match_counts(pred_BT, targets_BT, loss_mask_BT) -> dict[str, int]:
  """Summable counts: examples (with >= 1 scored position), exact examples, tokens, right tokens."""
  pred, tgt, scored = _check(pred_BT, targets_BT, loss_mask_BT)
  right = (pred == tgt) & scored
  has_scored = scored.any(axis=1)
  exact = has_scored & (right.sum(axis=1) == scored.sum(axis=1))
  return {
      "examples": int(has_scored.sum()),
      "exact_examples": int(exact.sum()),
      "tokens": int(scored.sum()),
      "right_tokens": int(right.sum()),
  }


def exact_match_from_counts(counts: dict[str, int]) -> dict[str, float]:
  """exact_match / token_accuracy from (possibly summed) `exact_match_counts`."""
  if counts["tokens"] == 0:
    raise ValueError("loss_mask_BT: no scored positions, exact match is undefined")
  return {
      "exact_match": counts["exact_examples"] / counts["examples"],
      "token_accuracy": counts["right_tokens"] / counts["tokens"],
  }


def exact_match(pred_BT, targets_BT, loss_mask_BT) -> dict[str, float]:
  """{'exact_match': share of examples right at every scored position,
  'token_accuracy': share of scored positions right}."""
  return exact_match_from_counts(exact_match_counts(pred_BT, targets_BT, loss_mask_BT))
