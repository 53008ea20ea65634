"""Fused RMSNorm + QKV GEMV + RoPE + KV-cache append for one token: rmsnorm_qkv then
rope_append, as two Pallas kernels with nothing between them (see pallas.py)."""

from __future__ import annotations

import jax

from kernels import _common as C
from kernels.qkv_rope_append import reference
from kernels.quant import check_scale
from kernels.rope_append import check_position
from kernels import unfinished


def qkv_rope_append(x_D: jax.Array, scale_D: jax.Array, w_t_ND: jax.Array,
                    bias_N: jax.Array | None, cos_D: jax.Array, sin_D: jax.Array,
                    k_cache_KSD: jax.Array, v_cache_KSD: jax.Array, pos, *, eps: float,
                    n_heads: int, n_kv_heads: int, impl: str,
                    interpret: bool | str | None = None, w_scale_N: jax.Array | None = None,
                    **block):
  """x [D], scale [D], W^T [N, D] with N = (Hq + 2 Hkv) Dh, bias [N] or None, cos / sin
  [Dh], caches [Hkv, S, Dh] -> (q roped [Hq, Dh] in x.dtype, k_cache, v_cache with slot
  pos written; a traced pos outside [0, S) writes nothing).

  = rope_append(rmsnorm_qkv(x, ...), ...). block: the QKV GEMV's options (block_n,
  block_k, split_k, stages). The caches must be in x's dtype. x_D may be a
  kernels.unfinished.Unfinished vector (the GEMV finishes it as it streams)."""
  C.check_impl(impl, "qkv_rope_append")
  Hkv, S, Dh = k_cache_KSD.shape
  N = (n_heads + 2 * n_kv_heads) * Dh
  if x_D.ndim != 1 or scale_D.shape != x_D.shape:
    raise ValueError(f"qkv_rope_append: x_D {x_D.shape} and scale_D {scale_D.shape} must be "
                     "equal 1-D")
  if Hkv != n_kv_heads or v_cache_KSD.shape != k_cache_KSD.shape or Dh % 2:
    raise ValueError(f"qkv_rope_append: k_cache_KSD {k_cache_KSD.shape} / v_cache_KSD "
                     f"{v_cache_KSD.shape} must both be [{n_kv_heads}, S, Dh], Dh even")
  if w_t_ND.shape != (N, x_D.shape[0]):
    raise ValueError(f"qkv_rope_append: w_t_ND {w_t_ND.shape} must be [{N}, {x_D.shape[0]}]")
  if bias_N is not None and bias_N.shape != (N,):
    raise ValueError(f"qkv_rope_append: bias_N {bias_N.shape} must be [{N}]")
  if cos_D.shape != (Dh,) or sin_D.shape != (Dh,):
    raise ValueError(f"qkv_rope_append: cos_D {cos_D.shape} / sin_D {sin_D.shape} must be [{Dh}]")
  if not k_cache_KSD.dtype == v_cache_KSD.dtype == x_D.dtype:
    raise ValueError(f"qkv_rope_append: the caches ({k_cache_KSD.dtype} / {v_cache_KSD.dtype}) "
                     f"must be in x_D's dtype ({x_D.dtype})")
  check_scale("qkv_rope_append", "w_t_ND", w_t_ND, "w_scale_N", w_scale_N, N)
  check_position(pos, S)
  unfinished.check("qkv_rope_append", x_D)
  kw = dict(eps=eps, n_heads=n_heads, n_kv_heads=n_kv_heads)
  if impl == "xla":
    return reference.qkv_rope_append(unfinished.finish(x_D), scale_D, w_t_ND, bias_N, cos_D, sin_D, k_cache_KSD,
                                     v_cache_KSD, pos, w_scale_N=w_scale_N, **kw)
  from kernels.qkv_rope_append import pallas
  mode = C.resolve_interpret(interpret)
  return C.inference_only(
      "qkv_rope_append", pallas.qkv_rope_append, x_D, scale_D, w_t_ND, bias_N, cos_D, sin_D,
      k_cache_KSD, v_cache_KSD, pos, w_scale_N, mode=mode, **kw, **block)
