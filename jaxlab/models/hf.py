"""Hugging Face checkpoints <-> jaxlab LM (Llama, Qwen2, Qwen3 families).

`load(path, dtype=None, mesh=None)` reads a local HF directory (config.json plus
model.safetensors or a sharded model.safetensors.index.json) into an `LM`.
Parameters are created already placed: the model is built abstractly with
`nnx.eval_shape`, each parameter's sharding comes from its `logical_axes`, and
`jax.make_array_from_callback` reads only the block each device holds, so no
device ever holds a full copy of a sharded weight.

`save(model, path)` writes config.json + model.safetensors that `transformers`
loads, carrying over tokenizer and generation files from the source directory.

Bad checkpoints raise `CheckpointError` (a ValueError) naming the file, tensor or key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.models._hf_config import (FAMILIES, CheckpointError, config_from_hf, config_to_hf,
                                      dtype_from_hf, family_of, model_type_of, read_config_json,
                                      rope_from_hf)
from jaxlab.models._hf_io import IGNORABLE_SUFFIXES, SafetensorsFiles, hf_name, read_slice
from jaxlab.models.transformer import LM

__all__ = ["CheckpointError", "HFInfo", "load", "save", "load_config", "config_from_hf",
           "config_to_hf", "SUPPORTED_FAMILIES", "TOKENIZER_FILES", "rope_from_hf",
           "model_type_of", "family_of"]

SUPPORTED_FAMILIES = tuple(FAMILIES)
# Files copied from the source checkpoint by `save` (those that exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_FLOAT_CODES = ("F64", "F32", "BF16", "F16")

# (logical_axes, mesh, shape) -> the parameter's sharding.
ShardingFn = Callable[[tuple, jax.sharding.Mesh, tuple], jax.sharding.Sharding]


@dataclasses.dataclass(frozen=True)
class HFInfo:
  """Where a loaded model came from (kept on the model as `model.hf_info`; hashable,
  so it can live in the static graph)."""
  source: str | None
  model_type: str
  config_json: str  # the source config.json, canonical JSON

  @property
  def config(self) -> dict[str, Any]:
    return json.loads(self.config_json)


def _dtype_name(dtype) -> str:
  if isinstance(dtype, str) and dtype in _DTYPES:
    return dtype
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in _DTYPES:
    raise ValueError(f"dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
  return name


def load_config(path: str, dtype=None):
  """(ModelConfig, raw HF config dict) of checkpoint dir `path` without reading weights."""
  hf = read_config_json(path)
  where = os.path.join(path, "config.json")
  name = _dtype_name(dtype) if dtype is not None else (dtype_from_hf(hf) or "float32")
  return config_from_hf(hf, param_dtype=name, where=where), hf


def _default_sharding_fn() -> ShardingFn:
  from jaxlab.sharding import logical_to_sharding  # the project's one logical->mesh table
  return logical_to_sharding


def load(path: str, dtype=None, mesh: jax.sharding.Mesh | None = None, *,
         sharding_fn: ShardingFn | None = None) -> LM:
  """An LM with the weights of HF checkpoint dir `path`.

  dtype: parameter dtype ('float32', 'bfloat16', 'float16' or a jnp dtype);
    None keeps the checkpoint's declared dtype (float32 if it declares none).
  mesh: place each parameter with `sharding_fn(param.logical_axes, mesh, shape)`
    (default `jaxlab.sharding.logical_to_sharding`, the project's one rules table);
    None puts everything on the default device.
  """
  path = os.fspath(path)
  cfg, hf = load_config(path, dtype)
  files = SafetensorsFiles(path)
  target = _DTYPES[cfg.param_dtype]
  abstract = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = list(nnx.to_flat_state(state))

  if mesh is not None:
    fn = sharding_fn or _default_sharding_fn()

    def shard_of(var, shape):
      return fn(var.get_metadata().get("logical_axes"), mesh, shape)
  else:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def shard_of(var, shape):
      return dev

  # Check names, shapes and dtypes of every tensor before reading any.
  plan = []
  used = set()
  for p, var in flat:
    if type(var) is not nnx.Param:
      raise CheckpointError(f"unexpected non-parameter state {p} in the jaxlab model")
    name, transposed = hf_name(p)
    shape = tuple(var.get_value().shape)
    want = shape[::-1] if transposed else shape
    if name not in files.name_to_file:
      raise CheckpointError(f"{path}: missing tensor {name} (expected shape {list(want)})")
    got = files.shape(name)
    if got != want:
      raise CheckpointError(f"{files.file_of(name)}: tensor {name} has shape {list(got)}, "
                            f"expected {list(want)} from config.json")
    code = files.dtype_code(name)
    if code not in _FLOAT_CODES:
      raise CheckpointError(f"{files.file_of(name)}: tensor {name} has dtype {code}, "
                            "expected a float type")
    used.add(name)
    plan.append((p, var, name, transposed, shape))
  for name in files.names():
    if name in used or name.endswith(IGNORABLE_SUFFIXES):
      continue
    if name == "lm_head.weight" and cfg.tie_embeddings:
      continue  # a redundant copy of the tied embedding
    raise CheckpointError(f"{files.file_of(name)}: unexpected tensor {name} (not in a "
                          f"{model_type_of(hf)} model with this config.json)")

  new_flat = []
  for p, var, name, transposed, shape in plan:
    def cb(index, name=name, transposed=transposed):
      return np.asarray(read_slice(files, name, index, transposed), dtype=target)
    arr = jax.make_array_from_callback(shape, shard_of(var, shape), cb)
    new_flat.append((p, var.replace(arr)))
  files.close()
  model = nnx.merge(graphdef, nnx.from_flat_state(new_flat))
  model.hf_info = HFInfo(source=os.path.abspath(path), model_type=model_type_of(hf),
                         config_json=json.dumps(hf, sort_keys=True))
  return model


def _hf_tensors(model: LM) -> dict[str, np.ndarray]:
  flat = list(nnx.to_flat_state(nnx.state(model)))
  for p, var in flat:  # refuse adapters and other non-Param state before mapping names
    if type(var) is not nnx.Param:
      kind = type(var).__name__
      hint = (" (LoRA adapters: merge them with jaxlab.models.lora.remove_lora(model) or "
              "save them with lora.save_adapters)") if "LoRA" in kind else ""
      raise CheckpointError(f"cannot save {kind} {'.'.join(map(str, p))} in a Hugging Face "
                            f"model{hint}")
  out = {}
  for p, var in flat:
    name, transposed = hf_name(p)
    a = np.asarray(jax.device_get(var.get_value()))
    out[name] = np.ascontiguousarray(a.T if transposed else a)
  return out


def save(model: LM, path: str) -> None:
  """Write `model` as a HF checkpoint dir (config.json + model.safetensors) that
  transformers' AutoModelForCausalLM loads; tokenizer files of the source dir are copied."""
  from safetensors.numpy import save_file

  path = os.fspath(path)
  cfg = model.cfg
  family_of(cfg)  # fails early for unsavable configs
  info: HFInfo | None = getattr(model, "hf_info", None)
  base = info.config if info is not None else {}
  hf_cfg = config_to_hf(cfg, base)
  tensors = _hf_tensors(model)
  os.makedirs(path, exist_ok=True)
  for stale in ("model.safetensors.index.json",):
    sp = os.path.join(path, stale)
    if os.path.exists(sp):
      os.remove(sp)
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(hf_cfg, fh, indent=2, sort_keys=True)
  if info is not None and info.source and os.path.isdir(info.source):
    src = info.source
    if os.path.abspath(src) != os.path.abspath(path):
      for f in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, f)):
          shutil.copyfile(os.path.join(src, f), os.path.join(path, f))
