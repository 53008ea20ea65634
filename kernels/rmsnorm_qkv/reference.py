"""Reference: y = W^T (rmsnorm(x) * g) (+ b): fp32 norm, fp32-accumulated GEMV
(int8 W: times its per-row scale)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels._reference import gemv


def rms_scale(x_D: jax.Array, eps: float) -> jax.Array:
  """1 / RMS(x) in fp32 (a scalar)."""
  x = x_D.astype(jnp.float32)
  return jax.lax.rsqrt(jnp.mean(x * x) + eps)


def rmsnorm_qkv(x_D, scale_D, w_t_ND, bias_N=None, *, eps: float, w_scale_N=None):
  xn = x_D.astype(jnp.float32) * rms_scale(x_D, eps) * scale_D.astype(jnp.float32)
  y = gemv("nd,d->n", w_t_ND, xn, w_scale_N, act_dtype=x_D.dtype)
  if bias_N is not None:
    y = y + bias_N.astype(jnp.float32)
  return y.astype(x_D.dtype)
