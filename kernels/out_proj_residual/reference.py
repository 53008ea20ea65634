"""Reference: y = resid + W_o^T o, materialized in fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def out_proj_residual(o_M, w_t_DM, resid_D):
  y = jnp.einsum("dm,m->d", w_t_DM.astype(jnp.float32), o_M.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  return (resid_D.astype(jnp.float32) + y).astype(resid_D.dtype)
