"""A checkpoint's tokenizer and chat template (transformers tokenizers, local files only).

`load_tokenizer(path)` wraps whatever tokenizer files the directory holds
(tokenizer.json alone, or with tokenizer_config.json / chat_template.jinja /
generation_config.json) in a small interface the CLI and pipelines share:
encode / decode / eos_ids / apply_chat_template / stream_decoder.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

from jaxlab.models._hf_config import CheckpointError

_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _as_id_list(v) -> list[int]:
  if v is None:
    return []
  if isinstance(v, int) and not isinstance(v, bool):
    return [v]
  if isinstance(v, (list, tuple)):
    return [int(x) for x in v if isinstance(x, int) and not isinstance(x, bool)]
  return []


def _read_json(f: str) -> dict:
  try:
    with open(f) as fh:
      d = json.load(fh)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{f}: not valid JSON ({e})") from None
  return d if isinstance(d, dict) else {}


class Tokenizer:
  """A loaded tokenizer plus the checkpoint's end-of-sequence ids and chat template."""

  def __init__(self, hf_tokenizer, *, eos_ids: Sequence[int] = (), path: str | None = None):
    self.hf = hf_tokenizer
    self.path = path
    ids = list(eos_ids)
    if hf_tokenizer.eos_token_id is not None:
      ids.append(int(hf_tokenizer.eos_token_id))
    self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(ids))  # de-duplicated, in order

  @property
  def bos_id(self) -> int | None:
    return self.hf.bos_token_id

  @property
  def pad_id(self) -> int | None:
    return self.hf.pad_token_id

  @property
  def vocab_size(self) -> int:
    return len(self.hf)

  @property
  def chat_template(self) -> str | None:
    t = getattr(self.hf, "chat_template", None)
    return t if t else None

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                          add_generation_prompt: bool = True, tokenize: bool = True, **kwargs):
    """Render `messages` ([{"role", "content"}, ...]) with the checkpoint's template:
    token ids if `tokenize` else the text. Extra kwargs reach the template."""
    if self.chat_template is None:
      raise CheckpointError(f"{self.path or 'tokenizer'}: no chat template (looked in "
                            "tokenizer_config.json, chat_template.jinja, chat_template.json)")
    text = self.hf.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                       tokenize=False, **kwargs)
    if not tokenize:
      return text
    # The template writes any BOS text itself; do not add special tokens again.
    return self.encode(text, add_special_tokens=False)

  def stream_decoder(self) -> "StreamDecoder":
    return StreamDecoder(self)


class StreamDecoder:
  """Turns generated ids into text pieces as they arrive. Decodes the whole
  sequence each time and emits the new suffix, holding back an incomplete UTF-8
  character (U+FFFD at the end) until the next token completes it."""

  def __init__(self, tok: Tokenizer):
    self.tok = tok
    self.ids: list[int] = []
    self.emitted = ""

  def push(self, token_id: int) -> str:
    self.ids.append(int(token_id))
    text = self.tok.decode(self.ids)
    if text.endswith("\ufffd"):
      return ""
    return self._emit(text)

  def flush(self) -> str:
    return self._emit(self.tok.decode(self.ids))

  def _emit(self, text: str) -> str:
    if text.startswith(self.emitted):
      new = text[len(self.emitted):]
    else:  # decoding changed earlier text (rare); emit past what was already shown
      new = text[len(self.emitted):] if len(text) > len(self.emitted) else ""
    self.emitted = text if len(text) >= len(self.emitted) else self.emitted
    return new


# tokenizer_config.json classes that are the generic tokenizers-backed class: loading them
# directly is what AutoTokenizer would do, minus importing torch (seconds of CLI start-up).
_GENERIC_CLASSES = (None, "PreTrainedTokenizerFast", "TokenizersBackend")


def _tokenizer_class(path: str):
  tc = os.path.join(path, "tokenizer_config.json")
  cls_name = _read_json(tc).get("tokenizer_class") if os.path.isfile(tc) else None
  if cls_name in _GENERIC_CLASSES and os.path.isfile(os.path.join(path, "tokenizer.json")):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast
  from transformers import AutoTokenizer
  return AutoTokenizer


def has_tokenizer(path: str) -> bool:
  return any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_MARKERS)


def load_tokenizer(path: str) -> Tokenizer:
  """The tokenizer of checkpoint dir `path` (never downloads anything).

  EOS ids: generation_config.json's eos_token_id (else config.json's) plus the
  tokenizer's eos token.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory")
  if not has_tokenizer(path):
    raise CheckpointError(f"{path}: no tokenizer files (expected one of "
                          f"{', '.join(_TOKENIZER_MARKERS)})")
  try:
    hf_tok = _tokenizer_class(path).from_pretrained(path, local_files_only=True)
  except (OSError, ValueError, TypeError, KeyError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CheckpointError(f"{path}: cannot load tokenizer ({msg})") from None
  eos: list[int] = []
  gen = os.path.join(path, "generation_config.json")
  cfg = os.path.join(path, "config.json")
  if os.path.isfile(gen):
    eos = _as_id_list(_read_json(gen).get("eos_token_id"))
  elif os.path.isfile(cfg):
    eos = _as_id_list(_read_json(cfg).get("eos_token_id"))
  return Tokenizer(hf_tok, eos_ids=eos, path=path)
