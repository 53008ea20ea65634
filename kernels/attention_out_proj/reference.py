"""Reference: decode_attention, then the output projection's fp32 product as one group of
rows of an Unfinished resid (= out_proj_residual once finished)."""

from __future__ import annotations

from kernels import unfinished
from kernels._reference import gemv
from kernels.decode_attention.reference import decode_attention


def attention_out_proj(q_HD, k_cache_KSD, v_cache_KSD, length, w_o_t_DM, resid_D, *,
                       scale: float):
  o = decode_attention(q_HD, k_cache_KSD, v_cache_KSD, length, scale=scale).reshape(-1)
  y = gemv("dm,m->d", w_o_t_DM, o, act_dtype=o.dtype)
  return unfinished.as_unfinished(resid_D).plus(y[None])
