"""Sharding rules, kept in one place.

Parameters carry logical axis names (`logical_axes` metadata, e.g. ("embed", "mlp"));
`RULES` maps each logical name to mesh axes of the one mesh (data, fsdp, tensor).
A dimension whose size the mesh axes do not divide is replicated instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlab import _compat
from jaxlab.config import require

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes); names not listed are replicated.
RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "lora_rank": None,
    "norm": None,
    "length": None,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
  """Device mesh shape; -1 on one axis means "all remaining devices"."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    for f in ("data", "fsdp", "tensor"):
      v = getattr(self, f)
      require(v == -1 or v >= 1, "MeshConfig", f, f"must be >= 1 or -1, got {v}")
    require(sum(getattr(self, f) == -1 for f in ("data", "fsdp", "tensor")) <= 1,
            "MeshConfig", "data", "at most one axis may be -1")

  def shape(self, n_devices: int) -> tuple[int, int, int]:
    dims = [self.data, self.fsdp, self.tensor]
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
      require(n_devices % known == 0, "MeshConfig", "data",
              f"{n_devices} devices not divisible by fsdp*tensor={known}")
      dims[dims.index(-1)] = n_devices // known
    require(math.prod(dims) == n_devices, "MeshConfig", "data",
            f"mesh {tuple(dims)} needs {math.prod(dims)} devices, have {n_devices}")
    return tuple(dims)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  return _compat.auto_mesh(cfg.shape(len(devices)), MESH_AXES, devices=devices)


def logical_to_spec(logical_axes, shape=None, mesh=None) -> P:
  """PartitionSpec for logical axis names (dims the mesh cannot divide are replicated)."""
  if logical_axes is None:
    return P()
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical_axes):
    axes = RULES.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if shape is not None:
        size = math.prod(mesh.shape[a] for a in axes)
        if size == 0 or shape[i] % size != 0:
          axes = ()
    used.update(axes)
    spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
  return P(*spec)


def logical_to_sharding(logical_axes, mesh, shape=None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def variable_sharding(var: nnx.Variable, mesh) -> NamedSharding:
  axes = var.get_metadata().get("logical_axes") if hasattr(var, "get_metadata") else None
  value = var.get_value() if hasattr(var, "get_value") else var[...]
  return logical_to_sharding(axes, mesh, np.shape(value))


def state_shardings(state: nnx.State, mesh) -> nnx.State:
  """Tree of NamedSharding for an nnx.State (Variables replaced by their sharding)."""
  return jax.tree.map(lambda v: variable_sharding(v, mesh), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dim over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(x: jax.Array, logical_axes, mesh=None) -> jax.Array:
  """Activation sharding hint by logical names (no-op without a mesh)."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_sharding(logical_axes, mesh, x.shape))


def global_array(np_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global jax.Array from a host copy of the whole array (works multi-process)."""
  return jax.make_array_from_callback(np_array.shape, sharding, lambda idx: np_array[idx])
