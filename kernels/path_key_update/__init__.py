"""PaTH decode step, key side: every cached key is carried through the new
token's Householder-like transition, K <- K - beta (K w) w^T (per KV head).

w [Hkv, Dh] is the token's unit vector, beta [Hkv] in (0, 2). Only slots
< length matter: the Pallas kernel touches only those (rows past the live
blocks are left unwritten, i.e. unspecified), the reference updates all.
"""

from __future__ import annotations

import jax

from kernels import _common as C
from kernels.path_key_update import reference


def path_key_update(k_cache_KSD: jax.Array, w_KD: jax.Array, beta_K: jax.Array, length, *,
                    impl: str, interpret: bool | str | None = None, **kw) -> jax.Array:
  """k_cache [Hkv, S, Dh] -> updated cache (slots < length; fp32 math, cache dtype)."""
  C.check_impl(impl, "path_key_update")
  if k_cache_KSD.ndim != 3:
    raise ValueError(f"path_key_update: k_cache_KSD {k_cache_KSD.shape} must be [Hkv, S, Dh]")
  Hkv, S, Dh = k_cache_KSD.shape
  if w_KD.shape != (Hkv, Dh) or beta_K.shape != (Hkv,):
    raise ValueError(f"path_key_update: w_KD {w_KD.shape} / beta_K {beta_K.shape} must be "
                     f"[{Hkv}, {Dh}] / [{Hkv}]")
  C.check_length("path_key_update", length, 0, S)
  if impl == "xla":
    return reference.path_key_update(k_cache_KSD, w_KD, beta_K)
  from kernels.path_key_update import pallas
  mode = C.resolve_interpret(interpret)
  return C.inference_only(
      "path_key_update", pallas.path_key_update, k_cache_KSD, w_KD, beta_K, length, mode=mode,
      **kw)
