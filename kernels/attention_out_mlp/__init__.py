"""Fused decode attention + output projection + residual + RMSNorm + SwiGLU MLP +
residual for one token: out_proj_mlp(decode_attention(q, K, V, length), ...), with the
attention's split-K merge inside the output projection (see pallas.py)."""

from __future__ import annotations

from typing import Any, Mapping

import jax

from kernels import _common as C
from kernels.attention_out_mlp import reference
from kernels.decode_attention import check_bias, check_shapes
from kernels.out_proj_residual import check_args as check_out_proj
from kernels.rmsnorm_swiglu import check_args as check_mlp
from kernels.rmsnorm_swiglu import down_weight


def attention_out_mlp(q_HD: jax.Array, k_cache_KSD: jax.Array, v_cache_KSD: jax.Array, length,
                      w_o_t_DM: jax.Array, resid_D: jax.Array, scale_D: jax.Array,
                      w_gate_t_FD: jax.Array, w_up_t_FD: jax.Array,
                      w_down_FD: jax.Array | None = None, *,
                      scale: float, eps: float, impl: str, bias_HS: jax.Array | None = None,
                      interpret: bool | str | None = None, w_o_scale_D: jax.Array | None = None,
                      w_gate_scale_F: jax.Array | None = None,
                      w_up_scale_F: jax.Array | None = None,
                      w_down_scale_D: jax.Array | None = None,
                      w_down_t_DF: jax.Array | None = None,
                      attn_block: Mapping[str, Any] | None = None,
                      o_block: Mapping[str, Any] | None = None, **block) -> jax.Array:
  """q [Hq, Dh], caches [Hkv, S, Dh], length (1..S), then as out_proj_mlp: W_o^T
  [D, Hq Dh], resid [D], the MLP's norm scale and weights -> [D] in resid.dtype.

  attn_block: decode_attention's options (num_splits, block_s, stages); o_block: the
  O-projection GEMV's (block_n, block_k, split_k, stages); block: the MLP's. The down
  weight as w_down_FD [F, D] or w_down_t_DF [D, F]."""
  C.check_impl(impl, "attention_out_mlp")
  _, S, _ = check_shapes("attention_out_mlp", q_HD, k_cache_KSD, v_cache_KSD, length)
  check_bias("attention_out_mlp", bias_HS, q_HD.shape[0], S)
  o_M = jax.ShapeDtypeStruct((q_HD.shape[0] * q_HD.shape[1],), q_HD.dtype)
  check_out_proj(o_M, w_o_t_DM, resid_D, w_o_scale_D, op="attention_out_mlp", w_name="w_o_t_DM",
                 scale_name="w_o_scale_D")
  w_down, down_t = down_weight(w_down_FD, w_down_t_DF, op="attention_out_mlp")
  scales = check_mlp(resid_D, scale_D, w_gate_t_FD, w_up_t_FD, w_down, w_gate_scale_F,
                     w_up_scale_F, w_down_scale_D, op="attention_out_mlp", down_t=down_t)
  sc = dict(w_o_scale_D=w_o_scale_D, w_gate_scale_F=scales[0], w_up_scale_F=scales[1],
            w_down_scale_D=scales[2])
  if impl == "xla":
    return reference.attention_out_mlp(q_HD, k_cache_KSD, v_cache_KSD, length, w_o_t_DM, resid_D,
                                       scale_D, w_gate_t_FD, w_up_t_FD, w_down_FD,
                                       w_down_t_DF=w_down_t_DF, scale=scale,
                                       eps=eps, bias_HS=bias_HS, **sc)
  from kernels.attention_out_mlp import pallas
  mode = C.resolve_interpret(interpret)
  return C.inference_only(
      "attention_out_mlp",
      pallas.attention_out_mlp, q_HD, k_cache_KSD, v_cache_KSD, length, w_o_t_DM, resid_D,
      scale_D, w_gate_t_FD, w_up_t_FD, w_down, bias_HS, *sc.values(), scale=scale, eps=eps,
      mode=mode, down_t=down_t, attn_block=attn_block, o_block=o_block, **block)
