"""Reference: x + W_down^T (silu(W_gate^T n) * W_up^T n), n = rmsnorm(x) * g; fp32 norm,
fp32-accumulated GEMVs, h in the weights' dtype for the down projection (as the model;
int8 weights: the activations' dtype, and each GEMV times its per-output scale)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels._reference import gemv
from kernels.rmsnorm_qkv.reference import rms_scale


def rmsnorm_swiglu(x_D, scale_D, w_gate_t_FD, w_up_t_FD, w_down_FD=None, *, eps: float,
                   w_down_t_DF=None, w_gate_scale_F=None, w_up_scale_F=None,
                   w_down_scale_D=None):
  y = mlp_delta(x_D, scale_D, w_gate_t_FD, w_up_t_FD, w_down_FD, eps=eps,
                w_down_t_DF=w_down_t_DF, w_gate_scale_F=w_gate_scale_F,
                w_up_scale_F=w_up_scale_F, w_down_scale_D=w_down_scale_D)
  return (x_D.astype(jnp.float32) + y).astype(x_D.dtype)


def mlp_delta(x_D, scale_D, w_gate_t_FD, w_up_t_FD, w_down_FD=None, *, eps: float,
              w_down_t_DF=None, w_gate_scale_F=None, w_up_scale_F=None, w_down_scale_D=None):
  """The MLP's output before the residual add, fp32 [D]."""
  f32 = jnp.float32
  act = x_D.dtype   # the operand dtype of int8 weights
  xn = x_D.astype(f32) * rms_scale(x_D, eps) * scale_D.astype(f32)
  gate = gemv("fd,d->f", w_gate_t_FD, xn, w_gate_scale_F, act_dtype=act)
  up = gemv("fd,d->f", w_up_t_FD, xn, w_up_scale_F, act_dtype=act)
  h = jax.nn.silu(gate) * up
  if w_down_t_DF is not None:    # W_down^T [D, F]
    y = gemv("df,f->d", w_down_t_DF, h, w_down_scale_D, act_dtype=act)
  else:
    y = gemv("fd,f->d", w_down_FD, h, w_down_scale_D, act_dtype=act)
  return y
