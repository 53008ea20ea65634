"""Fused RMSNorm + QKV projection for one token: y = W^T (x * g / RMS(x)) (+ b).

`w_t_ND` is the [out, in] (transposed) weight, so each output row is one
contiguous row of memory: the GEMV streams rows.
"""

from __future__ import annotations

import jax

from kernels import _common as C
from kernels.quant import check_scale
from kernels.rmsnorm_qkv import reference


def rmsnorm_qkv(x_D: jax.Array, scale_D: jax.Array, w_t_ND: jax.Array,
                bias_N: jax.Array | None = None, *, eps: float, impl: str,
                interpret: bool | str | None = None, w_scale_N: jax.Array | None = None,
                **block) -> jax.Array:
  """x [D], scale [D], W^T [N, D], bias [N] or None -> y [N] in x.dtype.

  int8 W^T (kernels.quant.quantize_int8(w, axis=1)) takes its fp32 row scale w_scale_N."""
  C.check_impl(impl, "rmsnorm_qkv")
  if x_D.ndim != 1 or scale_D.shape != x_D.shape:
    raise ValueError(f"rmsnorm_qkv: x_D {x_D.shape} and scale_D {scale_D.shape} must be equal 1-D")
  if w_t_ND.ndim != 2 or w_t_ND.shape[1] != x_D.shape[0]:
    raise ValueError(f"rmsnorm_qkv: w_t_ND {w_t_ND.shape} must be [N, {x_D.shape[0]}]")
  if bias_N is not None and bias_N.shape != (w_t_ND.shape[0],):
    raise ValueError(f"rmsnorm_qkv: bias_N {bias_N.shape} must be [{w_t_ND.shape[0]}]")
  check_scale("rmsnorm_qkv", "w_t_ND", w_t_ND, "w_scale_N", w_scale_N, w_t_ND.shape[0])
  if impl == "xla":
    return reference.rmsnorm_qkv(x_D, scale_D, w_t_ND, bias_N, eps=eps, w_scale_N=w_scale_N)
  from kernels.rmsnorm_qkv import pallas
  mode = C.resolve_interpret(interpret)
  return C.inference_only(
      "rmsnorm_qkv", pallas.rmsnorm_qkv, x_D, scale_D, w_t_ND, bias_N, w_scale_N, eps=eps,
      mode=mode, **block)
