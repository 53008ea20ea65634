"""Int8 weight-only quantization for the decode GEMVs: w ~= q * scale, per output channel.

Batch-1 decode reads every weight once per token, so halving the weight bytes is the
largest lever left once the kernels stream near the bandwidth limit. The scale is
symmetric absmax over the reduction axis (one fp32 per output channel); it factors out
of each dot product, so the kernels multiply once per output, after the reduction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

QMAX = 127


def quantize_int8(w: jax.Array, *, axis: int) -> tuple[jax.Array, jax.Array]:
  """Per-channel symmetric int8: returns (q int8 like w, scale fp32 = w's shape without
  `axis`, the reduction axis). |w - q * scale| <= scale / 2 elementwise. An all-zero
  channel gets scale 1 (q = 0)."""
  w32 = jnp.asarray(w).astype(jnp.float32)
  amax = jnp.max(jnp.abs(w32), axis=axis)
  scale = jnp.where(amax > 0, amax / QMAX, 1.0)
  q = jnp.round(w32 / jnp.expand_dims(scale, axis))
  return jnp.clip(q, -QMAX, QMAX).astype(jnp.int8), scale


def dequantize_int8(q: jax.Array, scale: jax.Array, *, axis: int,
                    dtype=jnp.float32) -> jax.Array:
  """q * scale broadcast along `axis` (the inverse of quantize_int8, up to rounding)."""
  return (q.astype(jnp.float32) * jnp.expand_dims(scale, axis)).astype(dtype)


def check_scale(op: str, w_name: str, w: jax.Array, scale_name: str, scale, n_out: int):
  """An int8 weight needs its per-output scale [n_out]; a float weight takes none."""
  if jnp.dtype(w.dtype) == jnp.int8:
    if scale is None:
      raise ValueError(f"{op}: {w_name} is int8, so {scale_name} (its per-output fp32 scale "
                       f"[{n_out}], see kernels.quant.quantize_int8) is required")
    if scale.shape != (n_out,):
      raise ValueError(f"{op}: {scale_name} {scale.shape} must be [{n_out}]")
  elif scale is not None:
    raise ValueError(f"{op}: {scale_name} is only for int8 weights ({w_name} is {w.dtype})")
