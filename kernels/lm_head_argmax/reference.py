"""Reference: logits = E (rmsnorm(x) * g) (fp32 accumulation), token = argmax(logits)."""

from __future__ import annotations

import jax.numpy as jnp

from kernels._reference import gemv
from kernels.rmsnorm_qkv.reference import rms_scale


def lm_head_argmax(x_D, scale_D, w_t_VD, *, eps: float, w_scale_V=None):
  xn = x_D.astype(jnp.float32) * rms_scale(x_D, eps) * scale_D.astype(jnp.float32)
  logits = gemv("vd,d->v", w_t_VD, xn, w_scale_V, act_dtype=x_D.dtype)
  return logits, jnp.argmax(logits).astype(jnp.int32)
