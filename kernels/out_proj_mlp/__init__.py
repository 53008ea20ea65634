"""Fused output projection + residual + RMSNorm + SwiGLU MLP + residual for one token:
rmsnorm_swiglu(out_proj_residual(o, W_o^T, resid)), as two Pallas kernels with nothing
between them (see pallas.py)."""

from __future__ import annotations

from typing import Any, Mapping

import jax

from kernels import _common as C
from kernels.out_proj_mlp import reference
from kernels.out_proj_residual import check_args as check_out_proj
from kernels.rmsnorm_swiglu import check_args as check_mlp
from kernels.rmsnorm_swiglu import down_weight


def out_proj_mlp(o_M: jax.Array, w_o_t_DM: jax.Array, resid_D: jax.Array, scale_D: jax.Array,
                 w_gate_t_FD: jax.Array, w_up_t_FD: jax.Array,
                 w_down_FD: jax.Array | None = None, *,
                 eps: float, impl: str, interpret: bool | str | None = None,
                 w_o_scale_D: jax.Array | None = None, w_gate_scale_F: jax.Array | None = None,
                 w_up_scale_F: jax.Array | None = None, w_down_scale_D: jax.Array | None = None,
                 w_down_t_DF: jax.Array | None = None,
                 o_block: Mapping[str, Any] | None = None, **block) -> jax.Array:
  """o [M], W_o^T [D, M], resid [D], the MLP's norm scale [D] and weights (as
  rmsnorm_swiglu; the down weight as w_down_FD [F, D] or w_down_t_DF [D, F]) -> [D] in
  resid.dtype.

  o_block: the O-projection GEMV's options (block_n, block_k, split_k, stages); block:
  the MLP's (block_f, block_k, block_d, stages, store_once)."""
  C.check_impl(impl, "out_proj_mlp")
  check_out_proj(o_M, w_o_t_DM, resid_D, w_o_scale_D, op="out_proj_mlp", w_name="w_o_t_DM",
                 scale_name="w_o_scale_D")
  w_down, down_t = down_weight(w_down_FD, w_down_t_DF, op="out_proj_mlp")
  scales = check_mlp(resid_D, scale_D, w_gate_t_FD, w_up_t_FD, w_down, w_gate_scale_F,
                     w_up_scale_F, w_down_scale_D, op="out_proj_mlp", down_t=down_t)
  if impl == "xla":
    return reference.out_proj_mlp(o_M, w_o_t_DM, resid_D, scale_D, w_gate_t_FD, w_up_t_FD,
                                  w_down_FD, eps=eps, w_down_t_DF=w_down_t_DF,
                                  w_o_scale_D=w_o_scale_D,
                                  w_gate_scale_F=scales[0], w_up_scale_F=scales[1],
                                  w_down_scale_D=scales[2])
  from kernels.out_proj_mlp import pallas
  mode = C.resolve_interpret(interpret)
  return C.inference_only(
      "out_proj_mlp",
      pallas.out_proj_mlp, o_M, w_o_t_DM, resid_D, scale_D, w_gate_t_FD, w_up_t_FD, w_down,
      w_o_scale_D, *scales, eps=eps, mode=mode, o_block=o_block, down_t=down_t, **block)
