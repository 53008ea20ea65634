"""The token-mixer interface and registry.

A token mixer is the sequence-mixing half of a decoder block (softmax attention,
PaTH, Mamba-2, Gated DeltaNet, ...). The LM only talks to this interface, so a
new mixer plugs in by registering a factory; the model code does not change.

Contract (all shapes batch-major):

* ``__call__(x_BTD, *, positions_BT, mask_BT=None) -> y_BTD``
  Full-sequence causal forward (training, scoring).
* ``init_cache(batch_size, max_len, dtype) -> cache``
  An empty decode cache: any pytree of arrays (KV cache, recurrent state,
  conv state, ...). Its structure and shapes never change during decoding, so a
  jitted decode step compiles once.
* ``extend(x_BTD, cache, *, positions_BT, mask_BT=None) -> (y_BTD, cache)``
  Process T new tokens that follow everything already in ``cache``. Prefill is
  ``extend`` on an empty cache; decode is ``extend`` with T = 1. For any split
  of a sequence, chained ``extend`` calls reproduce ``__call__`` on the whole.

``positions_BT`` are absolute token positions (int32); ``mask_BT`` marks real
tokens (False for left padding). Mixers must make padded tokens invisible: they
neither influence other tokens nor change the cache's meaning.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
from flax import nnx

Cache = Any


class TokenMixer(Protocol):

  def __call__(self, x_BTD: jax.Array, *, positions_BT: jax.Array,
               mask_BT: jax.Array | None = None) -> jax.Array:
    ...

  def init_cache(self, batch_size: int, max_len: int, dtype) -> Cache:
    ...

  def extend(self, x_BTD: jax.Array, cache: Cache, *, positions_BT: jax.Array,
             mask_BT: jax.Array | None = None) -> tuple[jax.Array, Cache]:
    ...


# name -> factory(cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs) -> nnx.Module
MixerFactory = Callable[..., nnx.Module]
_REGISTRY: dict[str, MixerFactory] = {}
# name -> module path that registers it on import (lazy, so optional mixers
# do not cost import time and a broken one does not break the others).
_LAZY = {
    "attention": "jaxlab.models.mixers.attention",
    "nope": "jaxlab.models.mixers.attention",
    "path": "jaxlab.models.mixers.path",
    "path_fox": "jaxlab.models.mixers.path",
    "fox": "jaxlab.models.mixers.path",
    "mamba2": "jaxlab.models.mixers.mamba2",
    "log_linear_mamba2": "jaxlab.models.mixers.mamba2",
    "gated_deltanet": "jaxlab.models.mixers.gated_deltanet",
    "log_linear_gated_deltanet": "jaxlab.models.mixers.gated_deltanet",
}


def register_mixer(name: str):
  """Decorator: register a mixer factory under `name`."""

  def deco(factory: MixerFactory) -> MixerFactory:
    _REGISTRY[name] = factory
    return factory

  return deco


def known_mixers() -> list[str]:
  return sorted(set(_REGISTRY) | set(_LAZY))


def get_mixer_factory(name: str) -> MixerFactory:
  if name not in _REGISTRY and name in _LAZY:
    import importlib
    importlib.import_module(_LAZY[name])
  if name not in _REGISTRY:
    raise ValueError(f"unknown mixer: {name!r} (known: {', '.join(known_mixers())})")
  return _REGISTRY[name]
