"""Reference: x + W_down^T (silu(W_gate^T n) * W_up^T n), n = rmsnorm(x) * g, in fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.rmsnorm_qkv.reference import rms_scale

HI = jax.lax.Precision.HIGHEST


def rmsnorm_swiglu(x_D, scale_D, w_gate_t_FD, w_up_t_FD, w_down_FD, *, eps: float):
  f32 = jnp.float32
  xn = x_D.astype(f32) * rms_scale(x_D, eps) * scale_D.astype(f32)
  gate = jnp.einsum("fd,d->f", w_gate_t_FD.astype(f32), xn, precision=HI)
  up = jnp.einsum("fd,d->f", w_up_t_FD.astype(f32), xn, precision=HI)
  h = jax.nn.silu(gate) * up
  y = jnp.einsum("fd,f->d", w_down_FD.astype(f32), h, precision=HI)
  return (x_D.astype(f32) + y).astype(x_D.dtype)
