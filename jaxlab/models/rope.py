"""Rotary position embeddings (HF "rotate_half" layout) with Llama-3 and YaRN scaling.

`rope_frequencies` mirrors the frequency rules of HF transformers' rope
initializers so that imported checkpoints give the same logits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.models.config import RopeScaling


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None,
                     max_seq_len: int | None = None) -> tuple[np.ndarray, float]:
  """Inverse frequencies [head_dim // 2] (float64 numpy) and the cos/sin multiplier."""
  exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float64) / head_dim
  # HF computes in float32 then casts; match that rounding.
  inv_freq = (1.0 / (np.float32(theta) ** exps.astype(np.float32))).astype(np.float32).astype(np.float64)
  if scaling is None:
    return inv_freq, 1.0
  f = scaling.factor
  if scaling.kind == "linear":
    return inv_freq / f, 1.0
  if scaling.kind == "llama3":
    orig = scaling.original_max_position
    low_wl = orig / scaling.low_freq_factor
    high_wl = orig / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    out = np.where(wavelen > low_wl, inv_freq / f, inv_freq)
    smooth = (orig / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * out / f + smooth * out
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, smoothed, out), 1.0
  if scaling.kind == "yarn":
    orig = scaling.original_max_position

    def get_mscale(scale, m=1.0):
      return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = scaling.attention_factor
    if attn is None:
      if scaling.mscale and scaling.mscale_all_dim:
        attn = get_mscale(f, scaling.mscale) / get_mscale(f, scaling.mscale_all_dim)
      else:
        attn = get_mscale(f)

    def corr_dim(rot):
      return (head_dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = corr_dim(scaling.beta_fast), corr_dim(scaling.beta_slow)
    if scaling.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrap = 1 - ramp
    pos_freqs = 1.0 / inv_freq
    inv = (1.0 / (f * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
    return inv, float(attn)
  raise ValueError(f"unknown RoPE scaling kind {scaling.kind!r}")


def rope_cos_sin(positions_BT: jax.Array, inv_freq: np.ndarray, attn_factor: float = 1.0):
  """cos, sin [B, T, head_dim] for integer positions (fp32)."""
  freqs = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb) * attn_factor, jnp.sin(emb) * attn_factor


def apply_rope(x_BTHD: jax.Array, cos_BTD: jax.Array, sin_BTD: jax.Array) -> jax.Array:
  """Rotate x [B, T, H, D] by the "rotate_half" convention, in fp32."""
  x = x_BTHD.astype(jnp.float32)
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_BTD[:, :, None, :] + rot * sin_BTD[:, :, None, :]
  return out.astype(x_BTHD.dtype)
