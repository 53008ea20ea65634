"""Reference: PaTH decode key-cache update K <- K - beta (K w) w^T per KV head, fp32
accumulate, cast back (papers.md 2.3: the cache holds H_t ... H_{i+1} k_i)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

HI = jax.lax.Precision.HIGHEST


def path_key_update(k_cache_KSD, w_KD, beta_K):
  k = k_cache_KSD.astype(jnp.float32)
  w = w_KD.astype(jnp.float32)
  kw = jnp.einsum("ksd,kd->ks", k, w, precision=HI)
  k = k - beta_K.astype(jnp.float32)[:, None, None] * kw[..., None] * w[:, None, :]
  return k.astype(k_cache_KSD.dtype)
