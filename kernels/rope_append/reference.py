"""Reference: RoPE on q and k of one token, then write k and v into cache slot `pos`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotate(x_HD, cos_D, sin_D):
  """HF "rotate_half" RoPE in fp32."""
  x = x_HD.astype(jnp.float32)
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[:, half:], x[:, :half]], axis=-1)
  return (x * cos_D + rot * sin_D).astype(x_HD.dtype)


def split_qkv(qkv_N, n_heads: int, n_kv_heads: int):
  D = qkv_N.shape[0] // (n_heads + 2 * n_kv_heads)
  q = qkv_N[:n_heads * D].reshape(n_heads, D)
  k = qkv_N[n_heads * D:(n_heads + n_kv_heads) * D].reshape(n_kv_heads, D)
  v = qkv_N[(n_heads + n_kv_heads) * D:].reshape(n_kv_heads, D)
  return q, k, v


WRITES = ("select", "scatter")


def write_slot(cache_KSD, row_KD, pos, *, write: str = "select"):
  """cache[:, pos] = row when 0 <= pos < S; an out-of-range pos leaves the cache as is
  (the decode step turns that case into NaN logits; see jaxlab/models/decode.py).

  write="select": read the old row, select, dynamic-update-slice (in place);
  write="scatter": one scatter whose out-of-range index is dropped. Same result; which
  compiles to fewer GPU kernels is what the decode benchmark can measure."""
  S = cache_KSD.shape[1]
  pos = jnp.asarray(pos, jnp.int32)
  ok = (pos >= 0) & (pos < S)
  row = row_KD.astype(cache_KSD.dtype)
  if write == "scatter":
    return cache_KSD.at[:, jnp.where(ok, pos, S)].set(row, mode="drop")
  if write != "select":
    raise ValueError(f"write_slot: unknown write {write!r} (known: {', '.join(WRITES)})")
  at = jnp.clip(pos, 0, S - 1)
  old = jax.lax.dynamic_slice_in_dim(cache_KSD, at, 1, axis=1)[:, 0]
  row = jnp.where(ok, row, old)
  return jax.lax.dynamic_update_slice_in_dim(cache_KSD, row[:, None], at, axis=1)


def rope_append(qkv_N, cos_D, sin_D, k_cache_KSD, v_cache_KSD, pos, *, n_heads, n_kv_heads,
                write: str = "select"):
  q, k, v = split_qkv(qkv_N, n_heads, n_kv_heads)
  q, k = rotate(q, cos_D, sin_D), rotate(k, cos_D, sin_D)
  return (q, write_slot(k_cache_KSD, k, pos, write=write),
          write_slot(v_cache_KSD, v, pos, write=write))
