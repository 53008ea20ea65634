"""Decode attention + output projection as two Mosaic-GPU kernels, the result left
unfinished:

  1. split-K attention (kernels/decode_attention/pallas.partials): (o_p, m_p, l_p);
  2. the O-projection GEMV merges those partials block by block as it streams the
     columns of o (kernels/_gemv.gemv_partials_merged) and leaves its split-K partial
     rows for the next kernel, which adds them to the residual as it streams x.

attention_out_mlp runs the same two kernels, then the one-kernel MLP; this form ends
where the two-kernel MLP (kernels/rmsnorm_swiglu_2k) takes over.
"""

from __future__ import annotations

from kernels import _gemv, unfinished
from kernels.decode_attention import pallas as attn


def attention_out_proj(q_HD, k_cache_KSD, v_cache_KSD, length, w_o_t_DM, resid_D, *,
                       scale: float, mode: str, pdl=None, attn_block=None, o_block=None):
  """pdl applies to both kernels."""
  Hq, Dh = q_HD.shape
  o, m, l = attn.partials(q_HD, k_cache_KSD, v_cache_KSD, length, scale=scale, mode=mode,
                          pdl=pdl, **dict(attn_block or {}))
  P = o.shape[0]
  part = _gemv.gemv_partials_merged(o.reshape(P, Hq, Dh), m.reshape(P, Hq), l.reshape(P, Hq),
                                    w_o_t_DM, dtype=q_HD.dtype, mode=mode,
                                    name="out_proj_residual", pdl=pdl, **dict(o_block or {}))
  return unfinished.as_unfinished(resid_D).plus(part)
