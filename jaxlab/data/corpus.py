"""Text / JSONL corpora from local files, tokenized and packed into fixed windows.

Files are read with `datasets.load_dataset("text" | "json", data_files=...)`, one
file at a time so that an error names the file. Each document (a line, paragraph
or whole file for text; one record for JSON lines) goes wholly to one split, by a
hash of its text (the default: duplicates always land together) or by position
(the last `test_fraction` of documents). A split's documents are tokenized, each
followed by <eos> (and preceded by <bos> if asked), concatenated, and cut into
W = (N - 1) // seq_len windows of seq_len + 1 tokens: inputs = window[:-1],
targets = window[1:], every position scored.

Example j of a split is window j % W of epoch j // W; "train" visits the
windows in a fresh permutation each epoch (seeded by (seed, epoch)), the test
split in order.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from typing import Any, Mapping

import numpy as np

from jaxlab.config import require
from jaxlab.data.base import DataError, Task, check_seed, example_rng, hash_unit, make_batch
from jaxlab.data.tokenizer import ByteTokenizer, load_tokenizer, _first_line

_FORMATS = ("auto", "text", "json")
_JSON_EXT = (".json", ".jsonl", ".ndjson")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CorpusConfig:
  """Options of a corpus task (see the module docstring and docs/data.md)."""
  data_files: tuple[str, ...] = ()
  format: str = "auto"              # auto (by extension: .json/.jsonl/.ndjson -> json) | text | json
  text_field: str = "text"          # json: the record field holding the text
  sample_by: str = "line"           # text: line | paragraph | document (one per file)
  tokenizer: str = "byte"           # "byte" or the path of a tokenizer.json
  add_bos: bool = False
  add_eos: bool = True
  bos_token: str = "<bos>"          # file tokenizers: names of the special tokens
  eos_token: str = "<eos>"
  seq_len: int = 256
  split_by: str = "hash"            # hash | fraction
  test_fraction: float = 0.1
  cache_dir: str | None = None      # datasets cache (default: HF_DATASETS_CACHE)

  @staticmethod
  def normalize(options: Mapping[str, Any]) -> dict[str, Any]:
    """Accept a single path (str or PathLike) for data_files and PathLike tokenizer/cache_dir."""
    out = dict(options)
    files = out.get("data_files")
    if isinstance(files, (str, os.PathLike)):
      out["data_files"] = (os.fspath(files),)
    elif isinstance(files, (list, tuple)):
      out["data_files"] = tuple(os.fspath(f) if isinstance(f, os.PathLike) else f for f in files)
    for k in ("tokenizer", "cache_dir"):
      if isinstance(out.get(k), os.PathLike):
        out[k] = os.fspath(out[k])
    return out

  def __post_init__(self):
    c = "CorpusConfig"
    require(len(self.data_files) > 0, c, "data_files", "give at least one file")
    require(self.format in _FORMATS, c, "format",
            f"unknown format {self.format!r} (known: {', '.join(_FORMATS)})")
    require(self.sample_by in ("line", "paragraph", "document"), c, "sample_by",
            f"unknown sample_by {self.sample_by!r} (known: line, paragraph, document)")
    require(self.split_by in ("hash", "fraction"), c, "split_by",
            f"unknown split_by {self.split_by!r} (known: hash, fraction)")
    require(0.0 <= self.test_fraction < 1.0, c, "test_fraction",
            f"must be in [0, 1), got {self.test_fraction}")
    require(self.seq_len > 0, c, "seq_len", f"must be > 0, got {self.seq_len}")
    require(bool(self.text_field), c, "text_field", "must be a non-empty string")


def _expand_files(patterns: tuple[str, ...]) -> list[str]:
  """Literal paths must exist; glob patterns must match something."""
  files: list[str] = []
  for p in patterns:
    if any(ch in p for ch in "*?["):
      hits = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
      if not hits:
        raise DataError(f"{p}: no file matches this pattern")
      files.extend(hits)
    elif not os.path.exists(p):
      raise DataError(f"{p}: data file not found")
    elif not os.path.isfile(p):
      raise DataError(f"{p}: not a regular file")
    else:
      files.append(p)
  return files


def _file_format(path: str, fmt: str) -> str:
  if fmt != "auto":
    return fmt
  return "json" if path.lower().endswith(_JSON_EXT) else "text"


def read_documents(path: str, *, fmt: str, text_field: str = "text", sample_by: str = "line",
                   cache_dir: str | None = None) -> list[str]:
  """The non-empty documents of one file, read through `datasets.load_dataset`."""
  import datasets  # deferred: heavy import, only corpora need it

  kwargs: dict[str, Any] = {"data_files": path, "split": "train", "cache_dir": cache_dir}
  if fmt == "text":
    kwargs["sample_by"] = sample_by
  try:
    ds = datasets.load_dataset(fmt, **kwargs)
  except Exception as e:  # datasets / pyarrow raise many types from deep inside
    what = "JSON lines" if fmt == "json" else "text"
    reason = _first_line(e) if str(e).strip() else f"{type(e).__name__}: empty or unreadable"
    raise DataError(f"{path}: cannot read as {what} ({reason})") from None
  if fmt == "text":
    docs = ds["text"] if "text" in ds.column_names else []
  else:
    if text_field not in ds.column_names:
      raise DataError(f"{path}: no field {text_field!r} in the records "
                      f"(fields: {', '.join(ds.column_names) or 'none'}); set text_field=")
    docs = ds[text_field]
    for i, d in enumerate(docs):
      if not isinstance(d, str):
        raise DataError(f"{path}: record {i} has {text_field!r} = {d!r}, expected a string")
  return [d for d in docs if d]


class CorpusTask(Task):
  """Local text / JSONL files as a packed language-modelling task."""

  def __init__(self, config: CorpusConfig, *, seed: int = 0):
    self.name = "corpus"
    self.config = config
    self.seed = check_seed(seed)
    self.seq_len = config.seq_len
    self.tokenizer = load_tokenizer(config.tokenizer)
    self.vocab_size = self.tokenizer.vocab_size
    self.splits = ("train", "test") if config.test_fraction > 0 else ("train",)
    self.files = _expand_files(config.data_files)

    bos = self._special("bos") if config.add_bos else None
    eos = self._special("eos") if config.add_eos else None
    docs: list[str] = []
    for f in self.files:
      docs.extend(read_documents(f, fmt=_file_format(f, config.format),
                                 text_field=config.text_field, sample_by=config.sample_by,
                                 cache_dir=config.cache_dir))
    if not docs:
      raise DataError(f"{', '.join(self.files)}: no non-empty documents")
    in_test = self._assign(docs)
    self.num_documents = {"train": int((~in_test).sum()), "test": int(in_test.sum())}

    ids = self.tokenizer.encode_batch(docs)
    self._stream: dict[str, np.ndarray] = {}
    self._windows: dict[str, int] = {}
    for split in self.splits:
      pick = in_test if split == "test" else ~in_test
      parts = []
      for d, keep in zip(ids, pick):
        if keep:
          if bos is not None:
            parts.append(np.array([bos], np.int32))
          parts.append(d)
          if eos is not None:
            parts.append(np.array([eos], np.int32))
      stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
      n_win = (len(stream) - 1) // self.seq_len if len(stream) > 0 else 0
      if n_win < 1:
        raise DataError(
            f"{', '.join(self.files)}: split {split!r} has {len(stream)} tokens from "
            f"{self.num_documents[split]} documents, fewer than seq_len + 1 = {self.seq_len + 1}; "
            f"add data or lower seq_len / change test_fraction")
      self._stream[split] = stream
      self._windows[split] = n_win
    self._perm_cache: dict[int, np.ndarray] = {}

  def _special(self, which: str) -> int:
    if isinstance(self.tokenizer, ByteTokenizer):
      return self.tokenizer.bos_id if which == "bos" else self.tokenizer.eos_id
    name = self.config.bos_token if which == "bos" else self.config.eos_token
    try:
      return self.tokenizer.token_id(name)
    except DataError as e:
      raise DataError(f"{e}; set {which}_token= or add_{which}=False") from None

  def _assign(self, docs: list[str]) -> np.ndarray:
    """bool[num_docs]: True where the document belongs to the test split."""
    frac = self.config.test_fraction
    if frac == 0:
      return np.zeros(len(docs), bool)
    if self.config.split_by == "hash":
      return np.array([hash_unit(d.encode("utf-8")) < frac for d in docs], bool)
    n_test = min(len(docs), max(1, math.ceil(frac * len(docs))))
    out = np.zeros(len(docs), bool)
    out[len(docs) - n_test:] = True
    return out

  def num_examples(self, split: str) -> int:
    """Windows in `split`; batches past them wrap around (train reshuffled per epoch)."""
    self._check_split(split)
    return self._windows[split]

  def num_tokens(self, split: str) -> int:
    self._check_split(split)
    return int(len(self._stream[split]))

  def _epoch_perm(self, epoch: int) -> np.ndarray:
    perm = self._perm_cache.get(epoch)
    if perm is None:
      rng = example_rng(self.seed, self.name, "train/epoch", epoch)
      perm = rng.permutation(self._windows["train"])
      if len(self._perm_cache) > 4:
        self._perm_cache.clear()
      self._perm_cache[epoch] = perm
    return perm

  def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
    self._check_batch_args(split, index, batch_size)
    n_win = self._windows[split]
    ex = int(index) * int(batch_size) + np.arange(int(batch_size))
    epoch, k = np.divmod(ex, n_win)
    if split == "train":
      win = np.array([self._epoch_perm(int(e))[int(i)] for e, i in zip(epoch, k)], np.int64)
    else:
      win = k
    rows = win[:, None] * self.seq_len + np.arange(self.seq_len + 1)[None, :]
    tokens = self._stream[split][rows]
    return make_batch(tokens[:, :-1], tokens[:, 1:], np.ones((len(ex), self.seq_len), np.float32))
