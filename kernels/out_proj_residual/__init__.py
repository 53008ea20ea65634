"""Attention output projection + residual for one token: y = resid + W_o^T o.

`w_t_DM` is the [d_model, heads*head_dim] (transposed) weight.
"""

from __future__ import annotations

import jax

from kernels import _common as C
from kernels.out_proj_residual import reference
from kernels.quant import check_scale


def out_proj_residual(o_M: jax.Array, w_t_DM: jax.Array, resid_D: jax.Array, *, impl: str,
                      interpret: bool | str | None = None, w_scale_D: jax.Array | None = None,
                      **block) -> jax.Array:
  """o [M], W_o^T [D, M], resid [D] -> resid + W_o^T o [D] in resid.dtype.

  int8 W_o^T (kernels.quant.quantize_int8(w, axis=1)) takes its fp32 row scale w_scale_D."""
  C.check_impl(impl, "out_proj_residual")
  check_args(o_M, w_t_DM, resid_D, w_scale_D)
  if impl == "xla":
    return reference.out_proj_residual(o_M, w_t_DM, resid_D, w_scale_D)
  from kernels.out_proj_residual import pallas
  mode = C.resolve_interpret(interpret)
  return C.inference_only(
      "out_proj_residual", pallas.out_proj_residual, o_M, w_t_DM, resid_D, w_scale_D,
      mode=mode, **block)


def check_args(o_M, w_t_DM, resid_D, w_scale_D, op: str = "out_proj_residual",
               w_name: str = "w_t_DM", scale_name: str = "w_scale_D"):
  """One-line errors for operands that do not fit together (named as `op` calls them)."""
  if o_M.ndim != 1 or w_t_DM.ndim != 2 or w_t_DM.shape[1] != o_M.shape[0]:
    raise ValueError(f"{op}: {w_name} {w_t_DM.shape} must be [D, {o_M.shape[0]}] "
                     f"for o_M {o_M.shape}")
  if resid_D.shape != (w_t_DM.shape[0],):
    raise ValueError(f"{op}: resid_D {resid_D.shape} must be [{w_t_DM.shape[0]}]")
  check_scale(op, w_name, w_t_DM, scale_name, w_scale_D, w_t_DM.shape[0])
