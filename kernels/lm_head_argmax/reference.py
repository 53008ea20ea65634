"""Reference: logits = E (rmsnorm(x) * g) in fp32, token = argmax(logits)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.rmsnorm_qkv.reference import rms_scale


def lm_head_argmax(x_D, scale_D, w_t_VD, *, eps: float):
  xn = x_D.astype(jnp.float32) * rms_scale(x_D, eps) * scale_D.astype(jnp.float32)
  logits = jnp.einsum("vd,d->v", w_t_VD.astype(jnp.float32), xn,
                      precision=jax.lax.Precision.HIGHEST)
  return logits, jnp.argmax(logits).astype(jnp.int32)
