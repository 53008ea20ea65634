"""Tokenizers for corpora: a byte-level one needing no file, and HF tokenizer.json files.

Both expose vocab_size, encode(text) -> int32 ids (no special tokens added),
decode(ids) -> str, and token_id(name) for the special tokens a corpus needs.
"""

from __future__ import annotations

import os

import numpy as np

from jaxlab.data.base import DataError


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then <bos>=256, <eos>=257, <pad>=258."""

  name = "byte"
  bos_id = 256
  eos_id = 257
  pad_id = 258
  vocab_size = 259
  _SPECIAL = {"<bos>": 256, "<eos>": 257, "<pad>": 258}

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    """Bytes back to text; special ids are dropped, invalid UTF-8 is replaced."""
    ids = np.asarray(ids).reshape(-1)
    return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

  def token_id(self, token: str) -> int:
    if token not in self._SPECIAL:
      raise DataError(f"byte tokenizer: no special token {token!r} "
                      f"(known: {', '.join(self._SPECIAL)})")
    return self._SPECIAL[token]

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class FileTokenizer:
  """A Hugging Face `tokenizers` tokenizer.json (tokenizers.Tokenizer.from_file)."""

  def __init__(self, path: str | os.PathLike):
    import tokenizers  # deferred: only corpora need it

    self.path = os.fspath(path)
    self.name = self.path
    if not os.path.isfile(self.path):
      raise DataError(f"{self.path}: tokenizer file not found")
    try:
      self._tok = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # the Rust side raises a bare Exception
      raise DataError(f"{self.path}: not a valid tokenizer.json ({_first_line(e)})") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    encs = self._tok.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encs]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=False)

  def token_id(self, token: str) -> int:
    i = self._tok.token_to_id(token)
    if i is None:
      raise DataError(f"{self.path}: tokenizer has no token {token!r}")
    return int(i)

  def __repr__(self) -> str:
    return f"FileTokenizer({self.path!r})"


def load_tokenizer(spec: str | os.PathLike) -> ByteTokenizer | FileTokenizer:
  """"byte" -> ByteTokenizer(); anything else is the path of a tokenizer.json."""
  if isinstance(spec, str) and spec == "byte":
    return ByteTokenizer()
  return FileTokenizer(spec)


def _first_line(e: BaseException) -> str:
  text = str(e).strip() or type(e).__name__
  return text.splitlines()[0][:200]
