"""Mosaic-GPU kernel: final RMSNorm + LM-head GEMV + argmax (see kernels/_gemv.py).

Each CTA writes its BN logits (fp32) and its block (max, first argmax); the
cross-block argmax over N/BN candidates is one tiny XLA op. Ties resolve to the
lowest index, as jnp.argmax does.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels import _gemv


def lm_head_argmax(x_D, scale_D, w_t_VD, w_scale_V=None, *, eps: float, mode: str, **block):
  logits, bmax, barg = _gemv.gemv(x_D, w_t_VD, scale_K=scale_D, w_scale_N=w_scale_V, eps=eps,
                                  argmax=True, out_dtype=jnp.float32, mode=mode,
                                  name="lm_head_argmax", **block)
  return logits, barg[jnp.argmax(bmax)]
