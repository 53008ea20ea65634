"""Mosaic-GPU kernel: output-projection GEMV with the residual add in the epilogue
(see kernels/_gemv.py): one CTA per BN rows of W_o^T, residual slice added before
the single store."""

from __future__ import annotations

from kernels import _gemv


def out_proj_residual(o_M, w_t_DM, resid_D, w_scale_D=None, *, mode: str, **block):
  return _gemv.gemv(o_M, w_t_DM, w_scale_N=w_scale_D, resid_N=resid_D, out_dtype=resid_D.dtype,
                    mode=mode, name="out_proj_residual", **block)
