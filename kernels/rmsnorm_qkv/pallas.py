"""Mosaic-GPU kernel: fused RMSNorm + QKV GEMV (see kernels/_gemv.py).

One CTA per BN output rows streams its slab of W^T with x and the norm scale,
accumulating W^T (x * g) and sum(x^2); the scalar 1/RMS(x) and the bias are
applied in the epilogue.
"""

from __future__ import annotations

from kernels import _gemv


def rmsnorm_qkv(x_D, scale_D, w_t_ND, bias_N=None, w_scale_N=None, *, eps: float, mode: str,
                **block):
  return _gemv.gemv(x_D, w_t_ND, scale_K=scale_D, w_scale_N=w_scale_N, bias_N=bias_N, eps=eps,
                    mode=mode, name="rmsnorm_qkv", **block)
