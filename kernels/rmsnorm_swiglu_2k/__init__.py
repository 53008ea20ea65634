"""RMSNorm + SwiGLU MLP + residual for one token as two GEMV kernels (see pallas.py):
y = x + W_down^T (silu(W_gate^T n) * (W_up^T n)),  n = x * g / RMS(x), with the gate and
up weights stacked, [W_gate^T; W_up^T] [2F, D], and the down weight transposed, W_down^T
[D, F]. Same result as kernels.rmsnorm_swiglu; an experiment in how the MLP's work is
spread over the GPU (jaxlab bench decode variant pallas-mlp2k)."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from kernels import _common as C
from kernels import unfinished
from kernels.rmsnorm_swiglu_2k import reference


def rmsnorm_swiglu_2k(x_D: jax.Array, scale_D: jax.Array, w_gate_up_t_2FD: jax.Array,
                      w_down_t_DF: jax.Array, *, eps: float, impl: str,
                      interpret: bool | str | None = None, pdl: str | None = None,
                      gate_up_block: Mapping[str, Any] | None = None,
                      down_block: Mapping[str, Any] | None = None,
                      finish: bool = True) -> jax.Array | unfinished.Unfinished:
  """x [D], g [D], [W_gate^T; W_up^T] [2F, D], W_down^T [D, F] -> [D] in x.dtype.

  x_D may be a kernels.unfinished.Unfinished vector (the gate / up GEMV finishes it as
  it streams). finish=False returns the result unfinished: Unfinished(x finished, (the
  down GEMV's partial rows,)), for the next kernel to add up (no XLA kernel after the
  MLP). Float weights only (int8: use kernels.rmsnorm_swiglu)."""
  C.check_impl(impl, "rmsnorm_swiglu_2k")
  unfinished.check("rmsnorm_swiglu_2k", x_D)
  D = x_D.shape[0]
  if x_D.ndim != 1 or scale_D.shape != x_D.shape:
    raise ValueError(f"rmsnorm_swiglu_2k: x_D {x_D.shape} and scale_D {scale_D.shape} must "
                     "be equal 1-D")
  F = w_down_t_DF.shape[1] if w_down_t_DF.ndim == 2 else -1
  if w_down_t_DF.ndim != 2 or w_down_t_DF.shape[0] != D:
    raise ValueError(f"rmsnorm_swiglu_2k: w_down_t_DF {w_down_t_DF.shape} must be [{D}, F]")
  if w_gate_up_t_2FD.shape != (2 * F, D):
    raise ValueError(f"rmsnorm_swiglu_2k: w_gate_up_t_2FD {w_gate_up_t_2FD.shape} must be "
                     f"[{2 * F}, {D}] (W_gate^T stacked on W_up^T)")
  if jnp.int8 in (jnp.dtype(w_gate_up_t_2FD.dtype), jnp.dtype(w_down_t_DF.dtype)):
    raise ValueError("rmsnorm_swiglu_2k: int8 weights are not supported (use "
                     "kernels.rmsnorm_swiglu)")
  if impl == "xla":
    return reference.rmsnorm_swiglu_2k(x_D, scale_D, w_gate_up_t_2FD, w_down_t_DF, eps=eps,
                                       finish=finish)
  from kernels.rmsnorm_swiglu_2k import pallas
  mode = C.resolve_interpret(interpret)
  return C.inference_only(
      "rmsnorm_swiglu_2k",
      pallas.rmsnorm_swiglu_2k, x_D, scale_D, w_gate_up_t_2FD, w_down_t_DF, eps=eps, mode=mode,
      pdl=pdl, gate_up_block=gate_up_block, down_block=down_block, finish=finish)
