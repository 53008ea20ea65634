"""Shared pieces of the XLA references."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gemv(spec: str, w, x, w_scale=None, *, act_dtype=None):
  """einsum(spec, w, x) with x in w's dtype and fp32 accumulation (* w_scale, per output).

  fp32 weights: plain fp32 math (the oracle the tests use on CPU). bf16
  weights: bf16 operands with fp32 accumulation, as the model's own layers
  compute; no fp32 copy of the weights is made, so impl="xla" is also a fair
  plain-XLA decode baseline. int8 weights (kernels.quant): q is converted to
  `act_dtype` (the activations' dtype; exact, |q| <= 127 fits bf16) and the fp32
  per-output scale multiplies the result.
  """
  if jnp.dtype(w.dtype) == jnp.int8:
    if act_dtype is None or w_scale is None:
      raise ValueError("gemv: int8 weights need act_dtype and w_scale")
    w = w.astype(act_dtype)
  y = jnp.einsum(spec, w, x.astype(w.dtype), precision=jax.lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)
  return y if w_scale is None else y * w_scale.astype(jnp.float32)
