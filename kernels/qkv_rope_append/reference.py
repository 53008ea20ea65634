"""Reference: rmsnorm_qkv, then rope_append (the two ops' own references, composed)."""

from __future__ import annotations

from kernels.rmsnorm_qkv.reference import rmsnorm_qkv
from kernels.rope_append.reference import rope_append


def qkv_rope_append(x_D, scale_D, w_t_ND, bias_N, cos_D, sin_D, k_cache_KSD, v_cache_KSD, pos,
                    *, eps: float, n_heads: int, n_kv_heads: int, w_scale_N=None):
  qkv = rmsnorm_qkv(x_D, scale_D, w_t_ND, bias_N, eps=eps, w_scale_N=w_scale_N)
  return rope_append(qkv, cos_D, sin_D, k_cache_KSD, v_cache_KSD, pos, n_heads=n_heads,
                     n_kv_heads=n_kv_heads)
