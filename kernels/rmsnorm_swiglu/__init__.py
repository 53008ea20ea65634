"""Fused RMSNorm + SwiGLU MLP + residual for one token:
y = x + W_down^T (silu(W_gate^T n) * (W_up^T n)),  n = x * g / RMS(x).

Gate/up weights are [F, D] (transposed, one hidden unit per row); the down
weight is the natural [F, D] `kernel` layout, so every CTA reads contiguous rows, or,
passed as `w_down_t_DF`, its transpose [D, F] (the Pallas kernel then reduces each
down block along rows, as its other GEMVs do, instead of across warps; to be timed
against the [F, D] form, `jaxlab bench decode --ops --sweep`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import _common as C
from kernels.quant import check_scale
from kernels.rmsnorm_swiglu import reference


def rmsnorm_swiglu(x_D: jax.Array, scale_D: jax.Array, w_gate_t_FD: jax.Array,
                   w_up_t_FD: jax.Array, w_down_FD: jax.Array | None = None, *, eps: float,
                   impl: str, interpret: bool | str | None = None,
                   w_down_t_DF: jax.Array | None = None, w_gate_scale_F: jax.Array | None = None,
                   w_up_scale_F: jax.Array | None = None, w_down_scale_D: jax.Array | None = None,
                   **block) -> jax.Array:
  """x [D], g [D], W_gate^T [F, D], W_up^T [F, D], and W_down [F, D] or (keyword)
  W_down^T [D, F] -> [D] in x.dtype.

  int8 weights take their fp32 per-output scales (kernels.quant.quantize_int8: axis=1
  for W_gate^T / W_up^T -> [F], axis=0 for W_down -> [D], axis=1 for W_down^T -> [D])."""
  C.check_impl(impl, "rmsnorm_swiglu")
  w_down, down_t = down_weight(w_down_FD, w_down_t_DF)
  scales = check_args(x_D, scale_D, w_gate_t_FD, w_up_t_FD, w_down, w_gate_scale_F,
                      w_up_scale_F, w_down_scale_D, down_t=down_t)
  if impl == "xla":
    return reference.rmsnorm_swiglu(x_D, scale_D, w_gate_t_FD, w_up_t_FD, w_down_FD, eps=eps,
                                    w_down_t_DF=w_down_t_DF, w_gate_scale_F=scales[0],
                                    w_up_scale_F=scales[1], w_down_scale_D=scales[2])
  from kernels.rmsnorm_swiglu import pallas
  mode = C.resolve_interpret(interpret)
  return C.inference_only(
      "rmsnorm_swiglu",
      pallas.rmsnorm_swiglu, x_D, scale_D, w_gate_t_FD, w_up_t_FD, w_down, *scales, eps=eps,
      mode=mode, down_t=down_t, **block)


def down_weight(w_down_FD, w_down_t_DF, op: str = "rmsnorm_swiglu"):
  """(the down weight given, whether it is W_down^T): exactly one of the two."""
  if (w_down_FD is None) == (w_down_t_DF is None):
    raise ValueError(f"{op}: pass the down weight once, as w_down_FD [F, D] or as "
                     "w_down_t_DF [D, F]")
  return (w_down_FD, False) if w_down_FD is not None else (w_down_t_DF, True)


def check_args(x_D, scale_D, w_gate_t_FD, w_up_t_FD, w_down_FD, w_gate_scale_F, w_up_scale_F,
               w_down_scale_D, op: str = "rmsnorm_swiglu", down_t: bool = False):
  """One-line errors for operands that do not fit together; returns the three scales.
  down_t: w_down_FD is W_down^T [D, F] (w_down_t_DF)."""
  D = x_D.shape[0]
  if x_D.ndim != 1 or scale_D.shape != x_D.shape:
    raise ValueError(f"{op}: x_D {x_D.shape} and scale_D {scale_D.shape} must be "
                     "equal 1-D")
  F = w_gate_t_FD.shape[0]
  down_name = "w_down_t_DF" if down_t else "w_down_FD"
  for name, w, shape in (("w_gate_t_FD", w_gate_t_FD, (F, D)), ("w_up_t_FD", w_up_t_FD, (F, D)),
                         (down_name, w_down_FD, (D, F) if down_t else (F, D))):
    if w.shape != shape:
      raise ValueError(f"{op}: {name} {w.shape} must be [{shape[0]}, {shape[1]}]")
  n_int8 = sum(jnp.dtype(w.dtype) == jnp.int8 for w in (w_gate_t_FD, w_up_t_FD, w_down_FD))
  if n_int8 not in (0, 3):
    raise ValueError(f"{op}: quantize all three weights to int8 or none "
                     f"(got {n_int8} int8)")
  scales = (w_gate_scale_F, w_up_scale_F, w_down_scale_D)
  for w_name, w, s_name, s, n in (("w_gate_t_FD", w_gate_t_FD, "w_gate_scale_F", scales[0], F),
                                  ("w_up_t_FD", w_up_t_FD, "w_up_scale_F", scales[1], F),
                                  (down_name, w_down_FD, "w_down_scale_D", scales[2], D)):
    check_scale(op, w_name, w, s_name, s, n)
  return scales
