"""Decode attention + output projection + residual + RMSNorm + SwiGLU MLP + residual as
three Mosaic-GPU kernels and one XLA reduction at the end:

  1. split-K attention (kernels/decode_attention/pallas.partials): (o_p, m_p, l_p),
     split axis first;
  2. the O-projection GEMV merges those partials block by block as it streams the
     columns of o (kernels/_gemv.gemv_partials_merged) and leaves its own split-K
     partial rows unfinished;
  3. the MLP kernel finishes x = resid + O-projection as it streams x
     (kernels/out_proj_mlp), and XLA sums its partial rows with x.

Unfused, the attention merge and the O-projection epilogue were XLA kernels between
the Mosaic ones. Each O-projection CTA reads the P partial columns of its K slice
(P * M / S * 4 bytes, 32 KB at llama-1b-bench: P = 16, S = 4) where it read o alone.
"""

from __future__ import annotations

from kernels import _gemv
from kernels.decode_attention import pallas as attn
from kernels.rmsnorm_swiglu.pallas import rmsnorm_swiglu_from_parts


def attention_out_mlp(q_HD, k_cache_KSD, v_cache_KSD, length, w_o_t_DM, resid_D, scale_D,
                      w_gate_t_FD, w_up_t_FD, w_down, bias_HS=None, w_o_scale_D=None,
                      w_gate_scale_F=None, w_up_scale_F=None, w_down_scale_D=None, *,
                      scale: float, eps: float, mode: str, attn_block=None, o_block=None,
                      pdl=None, **block):
  """pdl applies to all three kernels."""
  Hq, Dh = q_HD.shape
  o, m, l = attn.partials(q_HD, k_cache_KSD, v_cache_KSD, length, scale=scale, mode=mode,
                          bias_HS=bias_HS, pdl=pdl, **dict(attn_block or {}))
  P = o.shape[0]
  part = _gemv.gemv_partials_merged(o.reshape(P, Hq, Dh), m.reshape(P, Hq), l.reshape(P, Hq),
                                    w_o_t_DM, dtype=q_HD.dtype, mode=mode,
                                    name="out_proj_residual", pdl=pdl, **dict(o_block or {}))
  return rmsnorm_swiglu_from_parts(resid_D, part, w_o_scale_D, scale_D, w_gate_t_FD, w_up_t_FD,
                                   w_down, w_gate_scale_F, w_up_scale_F, w_down_scale_D,
                                   eps=eps, mode=mode, pdl=pdl, **block)
