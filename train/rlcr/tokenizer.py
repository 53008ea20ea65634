"""Byte tokenizer with one reserved id per RLCR tag (for tiny CPU models).

Ids 0..255 are UTF-8 bytes, 256/257/258 are <bos>/<eos>/<pad> (as in
`jaxlab.data.tokenizer.ByteTokenizer`), and 259..266 are the eight tags of
`rewards.TAGS` in order. A synthetic completion is then 8 tag tokens plus a
few content bytes instead of ~90 bytes. `decode` maps tag ids back to the tag
text, so the reward parser sees ordinary strings.
"""

from __future__ import annotations

import re

import numpy as np

from jaxlab.data.tokenizer import ByteTokenizer
from train.rlcr.rewards import TAGS

__all__ = ["RLCRByteTokenizer"]

_TAG_RE = re.compile("(" + "|".join(re.escape(t) for t in TAGS) + ")")


class RLCRByteTokenizer(ByteTokenizer):
  """Bytes + <bos>/<eos>/<pad> + one id per RLCR tag (vocab 267)."""

  name = "byte+rlcr-tags"
  tag_ids = {t: 259 + i for i, t in enumerate(TAGS)}
  vocab_size = 259 + len(TAGS)
  _SPECIAL = {**ByteTokenizer._SPECIAL, **tag_ids}
  _ID_TO_TAG = {i: t for t, i in tag_ids.items()}

  def encode(self, text: str) -> np.ndarray:
    """Tags become their reserved id (longest tag text wins; tags never overlap)."""
    out: list[int] = []
    for piece in _TAG_RE.split(text):
      if not piece:
        continue
      tid = self.tag_ids.get(piece)
      if tid is not None:
        out.append(tid)
      else:
        out.extend(piece.encode("utf-8"))
    return np.asarray(out, np.int32)

  def decode(self, ids) -> str:
    """Bytes and tags back to text; <bos>/<eos>/<pad> are dropped, bad UTF-8 is replaced."""
    ids = np.asarray(ids).reshape(-1)
    parts: list[str] = []
    buf = bytearray()
    for i in ids.tolist():
      if 0 <= i < 256:
        buf.append(i)
      elif i in self._ID_TO_TAG:
        parts.append(buf.decode("utf-8", errors="replace"))
        buf = bytearray()
        parts.append(self._ID_TO_TAG[i])
    parts.append(buf.decode("utf-8", errors="replace"))
    return "".join(parts)

  def __repr__(self) -> str:
    return "RLCRByteTokenizer()"
