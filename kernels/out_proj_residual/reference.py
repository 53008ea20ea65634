"""Reference: y = resid + W_o^T o, fp32-accumulated."""

from __future__ import annotations

import jax.numpy as jnp

from kernels._reference import gemv


def out_proj_residual(o_M, w_t_DM, resid_D, w_scale_D=None):
  y = gemv("dm,m->d", w_t_DM, o_M, w_scale_D, act_dtype=o_M.dtype)
  return (resid_D.astype(jnp.float32) + y).astype(resid_D.dtype)
