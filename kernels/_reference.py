"""Shared pieces of the XLA references."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gemv(spec: str, w, x):
  """einsum(spec, w, x) with x in w's dtype and fp32 accumulation.

  fp32 weights: plain fp32 math (the oracle the tests use on CPU). bf16
  weights: bf16 operands with fp32 accumulation, as the model's own layers
  compute; no fp32 copy of the weights is made, so impl="xla" is also a fair
  plain-XLA decode baseline.
  """
  return jnp.einsum(spec, w, x.astype(w.dtype), precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)
