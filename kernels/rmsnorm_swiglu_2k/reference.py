"""Reference: rmsnorm_swiglu with the gate and up weights stacked, [W_gate^T; W_up^T]
[2F, D], and the down weight as W_down^T [D, F] (kernels/rmsnorm_swiglu/reference.py)."""

from __future__ import annotations

from kernels import unfinished
from kernels.rmsnorm_swiglu import reference


def rmsnorm_swiglu_2k(x_D, scale_D, w_gate_up_t_2FD, w_down_t_DF, *, eps: float,
                      finish: bool = True):
  F = w_down_t_DF.shape[1]
  x = unfinished.finish(x_D)
  y = reference.mlp_delta(x, scale_D, w_gate_up_t_2FD[:F], w_gate_up_t_2FD[F:], eps=eps,
                          w_down_t_DF=w_down_t_DF)
  out = unfinished.Unfinished(x, (y[None],))
  return unfinished.finish(out) if finish else out
