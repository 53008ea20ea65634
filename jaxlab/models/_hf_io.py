"""Safetensors access for HF checkpoints: the tensor-name map and slice reads.

A jaxlab parameter path such as ('layers', 3, 'mixer', 'q_proj', 'kernel') maps to
the HF tensor 'model.layers.3.self_attn.q_proj.weight'; HF stores Linear weights
as [out, in] and jaxlab as [in, out], so those are read (and written) transposed.
Reads go through `read_slice`, which reads only the requested index range.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
from safetensors import SafetensorError, safe_open

from jaxlab.models._hf_config import CheckpointError

_MODULE = {"mixer": "self_attn", "mlp": "mlp", "input_norm": "input_layernorm",
           "post_norm": "post_attention_layernorm"}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}
# Present in some old checkpoints; derived from the config, never needed.
IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)


def hf_name(path: Sequence[Any]) -> tuple[str, bool]:
  """(HF tensor name, stored transposed?) for a jaxlab LM parameter path."""
  p = tuple(path)
  if p == ("embed", "embedding"):
    return "model.embed_tokens.weight", False
  if p == ("final_norm", "scale"):
    return "model.norm.weight", False
  if p == ("lm_head", "kernel"):
    return "lm_head.weight", True
  if len(p) in (4, 5) and p[0] == "layers" and isinstance(p[1], int) and p[2] in _MODULE:
    parts = ["model", "layers", str(p[1]), _MODULE[p[2]]]
    rest = p[3:]
    if len(rest) == 2 and rest[1] in _LEAF:
      parts += [rest[0], _LEAF[rest[1]]]
      return ".".join(parts), rest[1] == "kernel"
    if len(rest) == 1 and rest[0] == "scale":
      return ".".join(parts + ["weight"]), False
  raise CheckpointError(f"parameter {'.'.join(map(str, p))} has no Hugging Face equivalent")


class SafetensorsFiles:
  """The tensors of a checkpoint dir (single file or sharded with an index), opened lazily."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    self.name_to_file: dict[str, str] = {}
    if os.path.isfile(index):
      try:
        with open(index) as fh:
          wm = json.load(fh)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
      for name, fname in wm.items():
        self.name_to_file[name] = os.path.join(path, fname)
      for f in sorted(set(self.name_to_file.values())):
        if not os.path.isfile(f):
          raise CheckpointError(f"{f}: missing (listed in {os.path.basename(index)})")
    elif os.path.isfile(single):
      pass
    else:
      raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    self._handles: dict[str, Any] = {}
    if not self.name_to_file:
      for name in self._open(single).keys():
        self.name_to_file[name] = single
    else:
      # Validate every shard's header now, so that a damaged file fails before any read.
      for f in sorted(set(self.name_to_file.values())):
        keys = set(self._open(f).keys())
        for name, ff in self.name_to_file.items():
          if ff == f and name not in keys:
            raise CheckpointError(f"{f}: tensor {name} listed in the index is not in the file")

  def _open(self, f: str):
    h = self._handles.get(f)
    if h is None:
      try:
        h = safe_open(f, framework="numpy")
      except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
      self._handles[f] = h
    return h

  def names(self) -> list[str]:
    return list(self.name_to_file)

  def file_of(self, name: str) -> str:
    try:
      return self.name_to_file[name]
    except KeyError:
      raise CheckpointError(f"{self.path}: missing tensor {name}") from None

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._open(self.file_of(name)).get_slice(name).get_shape())

  def dtype_code(self, name: str) -> str:
    """The stored dtype, as safetensors names it (F32, BF16, ...)."""
    return self._open(self.file_of(name)).get_slice(name).get_dtype()

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """Tensor `name`, or only `index` (a tuple of slices in its stored layout)."""
    f = self.file_of(name)
    try:
      sl = self._open(f).get_slice(name)
      return np.asarray(sl[index] if index is not None else sl[:])
    except SafetensorError as e:
      raise CheckpointError(f"{f}: cannot read tensor {name} ({e})") from None

  def close(self):
    self._handles.clear()


def read_slice(files: SafetensorsFiles, name: str, index: tuple[slice, ...],
               transposed: bool) -> np.ndarray:
  """The block `index` (in jaxlab layout) of tensor `name`; the one place weights are read."""
  if transposed:
    return files.read(name, (index[1], index[0])).T
  return files.read(name, tuple(index))
