"""Decode attention + output projection for one token, the result left unfinished:
resid + W_o^T attention(q, K, V) as a kernels.unfinished.Unfinished vector whose last
group is the O-projection's split-K partial rows, for the next GEMV (the two-kernel
MLP) to add up as it streams x. Two Pallas kernels and no XLA kernel (see pallas.py)."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from kernels import _common as C
from kernels import unfinished
from kernels.attention_out_proj import reference
from kernels.decode_attention import check_shapes


def attention_out_proj(q_HD: jax.Array, k_cache_KSD: jax.Array, v_cache_KSD: jax.Array, length,
                       w_o_t_DM: jax.Array, resid_D, *, scale: float, impl: str,
                       interpret: bool | str | None = None, pdl: str | None = None,
                       attn_block: Mapping[str, Any] | None = None,
                       o_block: Mapping[str, Any] | None = None) -> unfinished.Unfinished:
  """q [Hq, Dh], caches [Hkv, S, Dh], length (1..S), W_o^T [D, Hq Dh], resid [D] (an array
  or Unfinished) -> Unfinished: finished, out_proj_residual(decode_attention(q, K, V,
  length).reshape(-1), W_o^T, resid).

  attn_block: decode_attention's options (num_splits, block_s, stages); o_block: the
  O-projection GEMV's (block_n, block_k, split_k, stages, prefetch_tiles). Float weights
  only; on GPU each K slice of the GEMV must hold >= 4 whole heads (kernels._gemv.merge_ok)."""
  C.check_impl(impl, "attention_out_proj")
  Hkv, S, Dh = check_shapes("attention_out_proj", q_HD, k_cache_KSD, v_cache_KSD, length)
  unfinished.check("attention_out_proj", resid_D)
  M = q_HD.shape[0] * Dh
  if resid_D.ndim != 1 or w_o_t_DM.shape != (resid_D.shape[0], M):
    raise ValueError(f"attention_out_proj: w_o_t_DM {w_o_t_DM.shape} must be "
                     f"[{resid_D.shape[0] if resid_D.ndim == 1 else 'D'}, {M}] for q_HD "
                     f"{q_HD.shape} and resid_D {resid_D.shape}")
  if jnp.dtype(w_o_t_DM.dtype) == jnp.int8:
    raise ValueError("attention_out_proj: int8 weights are not supported (use "
                     "kernels.attention_out_mlp)")
  if impl == "xla":
    return reference.attention_out_proj(q_HD, k_cache_KSD, v_cache_KSD, length, w_o_t_DM,
                                        resid_D, scale=scale)
  from kernels.attention_out_proj import pallas
  mode = C.resolve_interpret(interpret)
  return C.inference_only(
      "attention_out_proj",
      pallas.attention_out_proj, q_HD, k_cache_KSD, v_cache_KSD, length, w_o_t_DM, resid_D,
      scale=scale, mode=mode, pdl=pdl, attn_block=attn_block, o_block=o_block)
