"""Reference: one query token against the first `length` cache slots, fp32 softmax,
materialized, with an optional additive score bias [Hq, S] (after scaling). Slots >=
length are excluded, and their values zeroed, so garbage (even NaN) there cannot reach
the output."""

from __future__ import annotations

import jax
import jax.numpy as jnp

HI = jax.lax.Precision.HIGHEST


def gate_update(gate_HS, g_H, length, commit=True):
  """A forget gate's row for the token at slot length - 1: older slots G_{t-1} - G_j + g_t,
  the new slot 0 (as PathCache.gate); slots past it unchanged. commit False: the row
  unchanged."""
  slot = jnp.arange(gate_HS.shape[1])
  gate = gate_HS.astype(jnp.float32)
  new = jnp.where(slot < length - 1, gate + g_H.astype(jnp.float32)[:, None], gate)
  return jnp.where(commit, jnp.where(slot == length - 1, 0.0, new), gate)


def decode_attention(q_HD, k_cache_KSD, v_cache_KSD, length, *, scale: float, bias_HS=None,
                     gate_HS=None, g_H=None, commit=True):
  """o [Hq, Dh]; with gate_HS and g_H, (o, the updated gate) and scale * that gate as the
  bias (commit False: the gate returned unchanged, and used as it is)."""
  if gate_HS is not None:
    gate = gate_update(gate_HS, g_H, length, commit)
    return decode_attention(q_HD, k_cache_KSD, v_cache_KSD, length, scale=scale,
                            bias_HS=scale * gate), gate
  Hq, Dh = q_HD.shape
  Hkv, S, _ = k_cache_KSD.shape
  q = q_HD.astype(jnp.float32).reshape(Hkv, Hq // Hkv, Dh)
  valid = jnp.arange(S) < length                                       # [S]
  k = jnp.where(valid[None, :, None], k_cache_KSD.astype(jnp.float32), 0.0)
  v = jnp.where(valid[None, :, None], v_cache_KSD.astype(jnp.float32), 0.0)
  s = jnp.einsum("kgd,ksd->kgs", q, k, precision=HI) * scale
  if bias_HS is not None:
    s = s + bias_HS.astype(jnp.float32).reshape(Hkv, Hq // Hkv, S)
  s = jnp.where(valid, s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("kgs,ksd->kgd", p, v, precision=HI)
  return o.reshape(Hq, Dh).astype(q_HD.dtype)


def merge_splits(o_PKGD, m_PKG, l_PKG):
  """Combine split-K partials (split axis first): m = max_p m_p, l = sum_p e^{m_p - m} l_p,
  o = sum_p e^{m_p - m} o_p / l. Empty splits carry m_p = -inf, l_p = 0, o_p = 0."""
  m = jnp.max(m_PKG, axis=0, keepdims=True)                             # [1, K, G]
  w = jnp.where(jnp.isneginf(m_PKG), 0.0, jnp.exp(m_PKG - m))          # [P, K, G]
  l = jnp.sum(w * l_PKG, axis=0)                                        # [K, G]
  o = jnp.sum(w[..., None] * o_PKGD, axis=0)                            # [K, G, D]
  return o / l[..., None]
