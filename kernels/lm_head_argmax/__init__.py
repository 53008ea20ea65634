"""Final RMSNorm + LM head + greedy token for one position.

`w_t_VD` is [vocab, d_model]: the tied embedding table as stored, or the
transposed untied head.
"""

from __future__ import annotations

import jax

from kernels import _common as C
from kernels.lm_head_argmax import reference
from kernels.quant import check_scale
from kernels import unfinished


def lm_head_argmax(x_D: jax.Array, scale_D: jax.Array, w_t_VD: jax.Array, *, eps: float,
                   impl: str, interpret: bool | str | None = None,
                   w_scale_V: jax.Array | None = None, **block) -> tuple[jax.Array, jax.Array]:
  """x [D], scale [D], E [V, D] -> (logits f32 [V], argmax int32 scalar).

  int8 E (kernels.quant.quantize_int8(E, axis=1)) takes its fp32 row scale w_scale_V.
  x_D may be a kernels.unfinished.Unfinished vector (the GEMV finishes it as it
  streams)."""
  C.check_impl(impl, "lm_head_argmax")
  if x_D.ndim != 1 or scale_D.shape != x_D.shape:
    raise ValueError(f"lm_head_argmax: x_D {x_D.shape} and scale_D {scale_D.shape} must be "
                     "equal 1-D")
  if w_t_VD.ndim != 2 or w_t_VD.shape[1] != x_D.shape[0]:
    raise ValueError(f"lm_head_argmax: w_t_VD {w_t_VD.shape} must be [V, {x_D.shape[0]}]")
  check_scale("lm_head_argmax", "w_t_VD", w_t_VD, "w_scale_V", w_scale_V, w_t_VD.shape[0])
  unfinished.check("lm_head_argmax", x_D)
  if impl == "xla":
    return reference.lm_head_argmax(unfinished.finish(x_D), scale_D, w_t_VD, eps=eps, w_scale_V=w_scale_V)
  from kernels.lm_head_argmax import pallas
  mode = C.resolve_interpret(interpret)
  return C.inference_only(
      "lm_head_argmax", pallas.lm_head_argmax, x_D, scale_D, w_t_VD, w_scale_V, eps=eps,
      mode=mode, **block)
