"""LoRA adapters on the LM's projections, PEFT-compatible on disk.

`apply_lora(model, LoRAConfig(...), rngs=...)` replaces chosen `Linear`s
(attention q/k/v/o, MLP gate/up/down) in place by `LoRALinear`s that hold the
base layer, so the model code is untouched:

    y = base(x) + scale * (dropout(x) @ A) @ B,   A [in, r], B [r, out], scale = alpha / r

A starts Kaiming-uniform (bound 1/sqrt(in), PEFT's default) and B at zero, so the
adapted model starts equal to the base. Only `LoRAParam`s are trainable: pass
`wrt=LoRAParam` to nnx.Optimizer or `nnx.DiffState(0, LoRAParam)` to nnx.grad.

Batched adapters (DIT, papers.md section 6): give A and B a leading adapter axis K
(`set_adapters(model, stack_adapters([...]))`); then a batch of K*M rows uses
adapter k for rows [k*M, (k+1)*M), computed factored as
einsum('bsi,bir->bsr') then einsum('bsr,bro->bso') without ever forming a dense
delta. `batched_logits` is the same thing expressed as jax.vmap over adapters.

On disk (`save_adapters` / `load_adapters`): adapter_model.safetensors with PEFT
names (base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight [r, in],
...lora_B.weight [out, r]) and adapter_config.json, which `peft.PeftModel`
loads onto the transformers model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.config import require
from jaxlab.models._hf_config import CheckpointError
from jaxlab.models._hf_io import hf_name
from jaxlab.models.layers import Linear

# target name -> (block attribute, projection attribute)
TARGETS = {
    "q_proj": ("mixer", "q_proj"),
    "k_proj": ("mixer", "k_proj"),
    "v_proj": ("mixer", "v_proj"),
    "o_proj": ("mixer", "o_proj"),
    "gate_proj": ("mlp", "gate_proj"),
    "up_proj": ("mlp", "up_proj"),
    "down_proj": ("mlp", "down_proj"),
}
_PEFT_PREFIX = "base_model.model."


class LoRAParam(nnx.Param):
  """An adapter parameter (A or B); the trainable subset of a LoRA model."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
  """Which projections get adapters (`targets`), in which layers (`layers`, None =
  all), with rank, alpha (scale alpha/rank, or alpha/sqrt(rank) with use_rslora)
  and dropout on the adapter input."""
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("q_proj", "v_proj")
  layers: tuple[int, ...] | None = None
  use_rslora: bool = False

  def __post_init__(self):
    c = "LoRAConfig"
    object.__setattr__(self, "targets", tuple(self.targets))
    if self.layers is not None:
      object.__setattr__(self, "layers", tuple(sorted(set(int(i) for i in self.layers))))
    require(isinstance(self.rank, int) and self.rank > 0, c, "rank",
            f"must be a positive integer, got {self.rank!r}")
    require(self.alpha > 0, c, "alpha", f"must be > 0, got {self.alpha}")
    require(0.0 <= self.dropout < 1.0, c, "dropout", f"must be in [0, 1), got {self.dropout}")
    require(len(self.targets) > 0, c, "targets", "must not be empty")
    bad = [t for t in self.targets if t not in TARGETS]
    require(not bad, c, "targets", f"unknown target {bad[0] if bad else ''!r} "
            f"(known: {', '.join(TARGETS)})")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


# ----------------------------------------------------------------------------- math

def lora_delta_reference(x, a, b, scale: float):
  """Materialized reference: x @ (scale * A @ B) in fp32. a [in, r] or [K, in, r];
  with K adapters, x [K*M, ..., in] and rows [k*M, (k+1)*M) use adapter k."""
  a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  x32 = jnp.asarray(x, jnp.float32)
  if a32.ndim == 2:
    return jnp.einsum("...i,io->...o", x32, scale * (a32 @ b32))
  K = a32.shape[0]
  dw = scale * jnp.einsum("kir,kro->kio", a32, b32)
  xk = x32.reshape(K, x32.shape[0] // K, *x32.shape[1:])
  y = jnp.einsum("km...i,kio->km...o", xk, dw)
  return y.reshape(*x32.shape[:-1], dw.shape[-1])


LORA_IMPLS = ("factored", "reference")


def lora_delta(x, a, b, scale: float, *, impl: str = "factored"):
  """The LoRA update of x: scale * (x @ A) @ B.

  impl="factored" (default): two small einsums in x's dtype, never forming A @ B;
  impl="reference": `lora_delta_reference` (materialized, fp32, cast back to x's dtype).
  """
  if impl == "reference":
    return lora_delta_reference(x, a, b, scale).astype(x.dtype)
  if impl != "factored":
    raise ValueError(f"lora_delta: unknown impl {impl!r} (known: {', '.join(LORA_IMPLS)})")
  return _lora_delta_factored(x, a, b, scale)


def _lora_delta_factored(x, a, b, scale: float):
  a = a.astype(x.dtype)
  b = b.astype(x.dtype)
  if a.ndim == 2:
    h = jnp.einsum("...i,ir->...r", x, a)
    return scale * jnp.einsum("...r,ro->...o", h, b)
  K = a.shape[0]
  if x.shape[0] % K:
    raise ValueError(f"batch of {x.shape[0]} rows does not split over {K} adapters "
                     "(need a multiple)")
  xk = x.reshape(K, -1, x.shape[-1])  # adapter-major rows
  h = jnp.einsum("bsi,bir->bsr", xk, a)
  y = jnp.einsum("bsr,bro->bso", h, b)
  return (scale * y).reshape(*x.shape[:-1], b.shape[-1])


# ----------------------------------------------------------------------------- module

class LoRALinear(nnx.Module):
  """A `Linear` plus a low-rank update; `base` keeps the original layer."""

  def __init__(self, base: Linear, cfg: LoRAConfig, *, rngs: nnx.Rngs):
    self.base = base
    self.cfg = cfg
    self.merged = False
    axes = tuple(base.kernel.get_metadata().get("logical_axes") or (None, None))
    dtype = base.kernel.get_value().dtype
    bound = 1.0 / math.sqrt(base.in_features)  # kaiming_uniform(a=sqrt(5)) as in PEFT
    a = jax.random.uniform(rngs.params(), (base.in_features, cfg.rank), jnp.float32, -bound, bound)
    self.lora_a = LoRAParam(a.astype(dtype), logical_axes=(axes[0], "lora_rank"))
    self.lora_b = LoRAParam(jnp.zeros((cfg.rank, base.out_features), dtype),
                            logical_axes=("lora_rank", axes[1]))
    # Dropout is off until `model.train()`; `model.eval()` turns it off again.
    self.dropout = (nnx.Dropout(cfg.dropout, deterministic=True, rngs=rngs)
                    if cfg.dropout > 0 else None)

  @property
  def in_features(self):
    return self.base.in_features

  @property
  def out_features(self):
    return self.base.out_features

  @property
  def scale(self) -> float:
    return self.cfg.scale

  def delta_weight(self) -> jax.Array:
    """The dense update scale * A @ B in fp32 ([in, out], or [K, in, out])."""
    a = self.lora_a[...].astype(jnp.float32)
    b = self.lora_b[...].astype(jnp.float32)
    return self.scale * jnp.einsum("...ir,...ro->...io", a, b)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.base(x)
    if self.merged:
      return y
    h = self.dropout(x) if self.dropout is not None else x
    return y + lora_delta(h, self.lora_a[...], self.lora_b[...], self.scale).astype(y.dtype)


def _iter_lora(model):
  for path, m in nnx.iter_graph(model):
    if isinstance(m, LoRALinear):
      yield path, m


def lora_modules(model) -> list[tuple[tuple, LoRALinear]]:
  """(path, LoRALinear) pairs of `model`."""
  return list(_iter_lora(model))


def apply_lora(model, cfg: LoRAConfig, *, rngs: nnx.Rngs):
  """Wrap `cfg.targets` of `cfg.layers` of an LM in LoRALinear, in place; returns `model`."""
  n = len(model.layers)
  layers = range(n) if cfg.layers is None else cfg.layers
  for i in layers:
    if not 0 <= i < n:
      raise ValueError(f"LoRAConfig.layers: layer {i} out of range (model has {n})")
  todo = []  # check every target before changing anything
  for i in layers:
    block = model.layers[i]
    for t in cfg.targets:
      parent_name, attr = TARGETS[t]
      parent = getattr(block, parent_name, None)
      lin = getattr(parent, attr, None) if parent is not None else None
      if isinstance(lin, LoRALinear):
        raise ValueError(f"layer {i} {t} already has a LoRA adapter")
      if not isinstance(lin, Linear):
        raise ValueError(f"LoRAConfig.targets: layer {i} ({type(parent).__name__}) has no "
                         f"Linear {t}")
      todo.append((parent, attr, lin))
  for parent, attr, lin in todo:
    setattr(parent, attr, LoRALinear(lin, cfg, rngs=rngs))
  return model


def merge(model):
  """Fold every adapter into its base kernel (kernel += scale A B); idempotent."""
  for path, m in _iter_lora(model):
    if m.merged:
      continue
    if m.lora_a[...].ndim != 2:
      raise ValueError(f"{'.'.join(map(str, path))}: cannot merge stacked (batched) adapters")
    k = m.base.kernel[...]
    m.base.kernel[...] = (k.astype(jnp.float32) + m.delta_weight()).astype(k.dtype)
    m.merged = True
  return model


def unmerge(model):
  """Undo `merge` (kernel -= scale A B; exact up to rounding)."""
  for _, m in _iter_lora(model):
    if not m.merged:
      continue
    k = m.base.kernel[...]
    m.base.kernel[...] = (k.astype(jnp.float32) - m.delta_weight()).astype(k.dtype)
    m.merged = False
  return model


def remove_lora(model, *, merge_weights: bool = True):
  """Replace every LoRALinear by its base Linear (merged first if `merge_weights`)."""
  if merge_weights:
    merge(model)
  else:
    unmerge(model)
  for path, m in list(_iter_lora(model)):
    parent = model
    for p in path[:-1]:
      parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    setattr(parent, path[-1], m.base)
  return model


# ----------------------------------------------------------------------------- adapter state

def adapter_state(model) -> nnx.State:
  """The adapter parameters (LoRAParam) of `model`."""
  return nnx.state(model, LoRAParam)


def set_adapters(model, state: nnx.State):
  """Put adapter values (single, or stacked with a leading K axis) into `model`."""
  for _, m in _iter_lora(model):
    if m.merged:
      raise ValueError("set_adapters: unmerge the model first")
  nnx.update(model, state)
  return model


def stack_adapters(states: Sequence[nnx.State]) -> nnx.State:
  """K adapter states -> one state with a leading adapter axis on every array."""
  if not states:
    raise ValueError("stack_adapters: states is empty")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


@functools.partial(jax.jit, static_argnums=(0,))
def _vmapped_logits(graphdef, adapters, rest, tokens_BT):
  def one(ad):
    return nnx.merge(graphdef, ad, rest)(tokens_BT)
  return jax.vmap(one)(adapters)


def batched_logits(model, adapters: nnx.State, tokens_BT) -> jax.Array:
  """Logits [K, B, T, V] of the base model under each of K stacked adapters
  (`stack_adapters`), in one jitted call: jax.vmap over the adapter axis."""
  graphdef, _, rest = nnx.split(model, LoRAParam, ...)
  return _vmapped_logits(graphdef, adapters, rest, jnp.asarray(tokens_BT, jnp.int32))


# ----------------------------------------------------------------------------- PEFT files

def _peft_module_name(path: tuple) -> str:
  name, _ = hf_name(tuple(path) + ("kernel",))
  return _PEFT_PREFIX + name[: -len(".weight")]


def _model_lora_config(model) -> tuple[LoRAConfig, list[tuple[tuple, LoRALinear]]]:
  mods = lora_modules(model)
  if not mods:
    raise ValueError("model has no LoRA adapters")
  cfgs = {dataclasses.replace(m.cfg, targets=("q_proj",), layers=None) for _, m in mods}
  if len(cfgs) > 1:
    raise ValueError("adapters differ in rank/alpha/dropout; PEFT files need one setting")
  targets = sorted({p[-1] for p, _ in mods}, key=list(TARGETS).index)
  layers = sorted({p[1] for p, _ in mods})
  n = len(model.layers)
  cfg = dataclasses.replace(mods[0][1].cfg, targets=tuple(targets),
                            layers=None if layers == list(range(n)) else tuple(layers))
  return cfg, mods


def peft_config_dict(cfg: LoRAConfig, base_model_name_or_path: str | None = None) -> dict:
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "r": cfg.rank,
      "lora_alpha": cfg.alpha,
      "lora_dropout": cfg.dropout,
      "target_modules": list(cfg.targets),
      "layers_to_transform": None if cfg.layers is None else list(cfg.layers),
      "use_rslora": cfg.use_rslora,
      "bias": "none",
      "fan_in_fan_out": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "modules_to_save": None,
      "use_dora": False,
      "base_model_name_or_path": base_model_name_or_path,
  }


def save_adapters(model, path: str, *, base_model_name_or_path: str | None = None) -> None:
  """Write adapter_model.safetensors + adapter_config.json (PEFT layout) to dir `path`."""
  from safetensors.numpy import save_file

  cfg, mods = _model_lora_config(model)
  if any(m.merged for _, m in mods):
    raise ValueError("save_adapters: unmerge the model first")
  tensors = {}
  for p, m in mods:
    a = np.asarray(jax.device_get(m.lora_a[...]))
    b = np.asarray(jax.device_get(m.lora_b[...]))
    if a.ndim != 2:
      raise ValueError("save_adapters: stacked (batched) adapters; save them one at a time")
    name = _peft_module_name(p)
    tensors[name + ".lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[name + ".lora_B.weight"] = np.ascontiguousarray(b.T)
  if base_model_name_or_path is None:
    info = getattr(model, "hf_info", None)
    base_model_name_or_path = info.source if info is not None else None
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "adapter_config.json"), "w") as fh:
    json.dump(peft_config_dict(cfg, base_model_name_or_path), fh, indent=2)


def read_adapter_config(path: str) -> LoRAConfig:
  """LoRAConfig from a PEFT adapter_config.json (plain LoRA on supported targets only)."""
  f = os.path.join(path, "adapter_config.json")
  if not os.path.isfile(f):
    raise CheckpointError(f"{f}: missing")
  try:
    with open(f) as fh:
      d = json.load(fh)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{f}: not valid JSON ({e})") from None
  if d.get("peft_type", "LORA") != "LORA":
    raise CheckpointError(f"{f}: peft_type {d.get('peft_type')!r} is not supported (only LORA)")
  for key, ok in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False)):
    if d.get(key, ok) not in (ok, None):
      raise CheckpointError(f"{f}: {key}={d[key]!r} is not supported")
  for key in ("modules_to_save", "rank_pattern", "alpha_pattern"):
    if d.get(key):
      raise CheckpointError(f"{f}: {key} is not supported")
  tm = d.get("target_modules")
  if tm == "all-linear":
    targets = tuple(TARGETS)
  elif isinstance(tm, (list, tuple)) and tm:
    targets = tuple(tm)
  else:
    raise CheckpointError(f"{f}: target_modules {tm!r} is not supported (a list of names)")
  layers = d.get("layers_to_transform")
  if isinstance(layers, int):
    layers = [layers]
  try:
    return LoRAConfig(rank=int(d["r"]), alpha=float(d.get("lora_alpha", 8)),
                      dropout=float(d.get("lora_dropout", 0.0) or 0.0), targets=targets,
                      layers=None if layers is None else tuple(layers),
                      use_rslora=bool(d.get("use_rslora", False)))
  except KeyError as e:
    raise CheckpointError(f"{f}: missing key {e.args[0]!r}") from None
  except ValueError as e:
    raise CheckpointError(f"{f}: {e}") from None


def _target_layers(model, cfg: LoRAConfig) -> list[tuple[tuple, Any]]:
  """(module path, Linear or LoRALinear) for every target `cfg` names, in apply order."""
  n = len(model.layers)
  out = []
  for i in (range(n) if cfg.layers is None else cfg.layers):
    if not 0 <= i < n:
      raise CheckpointError(f"adapter layer {i} out of range (model has {n})")
    for t in cfg.targets:
      parent_name, attr = TARGETS[t]
      lin = getattr(getattr(model.layers[i], parent_name, None), attr, None)
      out.append((("layers", i, parent_name, attr), lin))
  return out


def load_adapters(model, path: str, *, rngs: nnx.Rngs | None = None):
  """Load PEFT adapters from dir `path` into `model` (adding LoRALinear layers first
  if it has none); returns `model`. Every tensor is checked by name and shape and read
  before the model is changed, so a bad adapter leaves the model as it was."""
  from safetensors import SafetensorError, safe_open

  cfg = read_adapter_config(path)
  has_lora = bool(lora_modules(model))
  if has_lora:
    have, mods = _model_lora_config(model)
    if (have.targets, have.layers, have.rank) != (cfg.targets, cfg.layers, cfg.rank):
      raise CheckpointError(f"{path}: adapters (targets={cfg.targets}, layers={cfg.layers}, "
                            f"r={cfg.rank}) do not match the model's LoRA layers "
                            f"(targets={have.targets}, layers={have.layers}, r={have.rank})")
    if any(m.merged for _, m in mods):
      raise ValueError("load_adapters: unmerge the model first")
  targets = _target_layers(model, cfg)
  f = os.path.join(path, "adapter_model.safetensors")
  if not os.path.isfile(f):
    raise CheckpointError(f"{f}: missing")
  try:
    fh = safe_open(f, framework="numpy")
    names = set(fh.keys())
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
  values = {}  # module path -> (A [in, r], B [r, out])
  for p, lin in targets:
    if not isinstance(lin, (Linear, LoRALinear)):
      raise CheckpointError(f"{f}: model has no Linear {'.'.join(map(str, p))} for the adapter")
    base = _peft_module_name(p)
    pair = []
    for suffix, want in ((".lora_A.weight", (cfg.rank, lin.in_features)),
                         (".lora_B.weight", (lin.out_features, cfg.rank))):
      name = base + suffix
      if name not in names:
        raise CheckpointError(f"{f}: missing tensor {name}")
      got = tuple(fh.get_slice(name).get_shape())
      if got != want:
        raise CheckpointError(f"{f}: tensor {name} has shape {list(got)}, expected {list(want)}")
      try:
        pair.append(fh.get_tensor(name).T)
      except SafetensorError as e:
        raise CheckpointError(f"{f}: cannot read tensor {name} ({e})") from None
    values[p] = pair
  expected = {_peft_module_name(p) + s for p, _ in targets for s in (".lora_A.weight",
                                                                     ".lora_B.weight")}
  extra = sorted(names - expected)
  if extra:
    raise CheckpointError(f"{f}: unexpected tensor {extra[0]}")
  if not has_lora:
    apply_lora(model, cfg, rngs=rngs if rngs is not None else nnx.Rngs(0))
  for p, m in lora_modules(model):
    a, b = values[p]
    m.lora_a[...] = jnp.asarray(a, m.lora_a[...].dtype)
    m.lora_b[...] = jnp.asarray(b, m.lora_b[...].dtype)
  return model
