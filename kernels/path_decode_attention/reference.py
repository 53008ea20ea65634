"""Reference: the PaTH decode step's key side and attention in one op, fp32.

The new token's key and value are already in slot length - 1. Every older key
(slots < length - 1) goes through the token's transition, K <- K - beta (K w) w^T;
then the query attends over the first `length` slots of the updated cache."""

from __future__ import annotations

import jax.numpy as jnp

from kernels.decode_attention.reference import decode_attention, gate_update
from kernels.path_key_update.reference import path_key_update


def path_decode_attention(q_HD, k_cache_KSD, v_cache_KSD, w_KD, beta_K, length, *, scale: float,
                          bias_HS=None, gate_HS=None, g_H=None, commit=True):
  """(o, K); with gate_HS and g_H, (o, K, the updated gate) as decode_attention. commit
  False: K and the gate returned unchanged (and attended as they are)."""
  S = k_cache_KSD.shape[1]
  older = ((jnp.arange(S) < jnp.asarray(length) - 1) & commit)[None, :, None]
  k = jnp.where(older, path_key_update(k_cache_KSD, w_KD, beta_K), k_cache_KSD)
  if gate_HS is not None:
    gate = gate_update(gate_HS, g_H, length, commit)
    return decode_attention(q_HD, k, v_cache_KSD, length, scale=scale,
                            bias_HS=scale * gate), k, gate
  return decode_attention(q_HD, k, v_cache_KSD, length, scale=scale, bias_HS=bias_HS), k
