"""Reference: decode_attention, then out_proj_mlp (the ops' own references)."""

from __future__ import annotations

from kernels.decode_attention.reference import decode_attention
from kernels.out_proj_mlp.reference import out_proj_mlp


def attention_out_mlp(q_HD, k_cache_KSD, v_cache_KSD, length, w_o_t_DM, resid_D, scale_D,
                      w_gate_t_FD, w_up_t_FD, w_down_FD=None, *, scale: float, eps: float,
                      bias_HS=None, **kw):
  o = decode_attention(q_HD, k_cache_KSD, v_cache_KSD, length, scale=scale, bias_HS=bias_HS)
  return out_proj_mlp(o.reshape(-1), w_o_t_DM, resid_D, scale_D, w_gate_t_FD, w_up_t_FD,
                      w_down_FD, eps=eps, **kw)
