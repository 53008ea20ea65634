"""Softmax attention mixer: grouped-query attention with RoPE and a KV cache.

The reference token mixer; others imitate its interface (see base.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab.models.config import ModelConfig
from jaxlab.models.layers import Linear, RMSNorm
from jaxlab.models.mixers.base import register_mixer
from jaxlab.models.rope import apply_rope, rope_cos_sin, rope_frequencies

# Finite "minus infinity": a fully masked row (left padding) stays finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def gqa_attention(q_BTHD, k_BSKD, v_BSKD, mask_BTS, scale: float):
  """softmax(scale * q k^T + mask) v with H query heads sharing K kv heads; fp32 softmax.

  Values at masked key slots are zeroed so that garbage (even NaN) in unused
  cache slots can never reach the output.
  """
  B, T, H, D = q_BTHD.shape
  K = k_BSKD.shape[2]
  q = q_BTHD.reshape(B, T, K, H // K, D)
  s = jnp.einsum("btkgd,bskd->bkgts", q, k_BSKD, preferred_element_type=jnp.float32) * scale
  m = mask_BTS[:, None, None, :, :]
  s = jnp.where(m, s, MASK_VALUE)
  p = jax.nn.softmax(s, axis=-1)
  p = jnp.where(m, p, 0.0)
  key_used = jnp.any(mask_BTS, axis=1)  # [B, S]
  v = jnp.where(key_used[:, :, None, None], v_BSKD, jnp.zeros((), v_BSKD.dtype))
  o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o.reshape(B, T, H, -1).astype(q_BTHD.dtype)


class Attention(nnx.Module):
  """GQA + RoPE (Llama/Qwen2/Qwen3 conventions: optional qkv bias, optional q/k RMSNorm)."""

  def __init__(self, cfg: ModelConfig, layer_idx: int = 0, *, rngs: nnx.Rngs,
               use_rope: bool = True):
    self.n_heads = cfg.n_heads
    self.n_kv = cfg.kv_heads
    self.head_dim = cfg.dim_per_head
    self.use_rope = use_rope
    kw = dict(init_std=cfg.init_std, param_dtype=cfg.param_dtype, rngs=rngs)
    d, hd = cfg.d_model, self.head_dim
    self.q_proj = Linear(d, self.n_heads * hd, use_bias=cfg.attn_bias, axes=("embed", "heads"), **kw)
    self.k_proj = Linear(d, self.n_kv * hd, use_bias=cfg.attn_bias, axes=("embed", "kv_heads"), **kw)
    self.v_proj = Linear(d, self.n_kv * hd, use_bias=cfg.attn_bias, axes=("embed", "kv_heads"), **kw)
    self.o_proj = Linear(self.n_heads * hd, d, axes=("heads", "embed"), **kw)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(hd, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
      self.k_norm = RMSNorm(hd, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    else:
      self.q_norm = self.k_norm = None
    inv_freq, attn_factor = rope_frequencies(hd, cfg.rope_theta, cfg.rope_scaling)
    self._inv_freq = tuple(float(f) for f in inv_freq)  # static, not a parameter
    self._attn_factor = attn_factor
    self.scale = hd ** -0.5

  def _qkv(self, x_BTD, positions_BT):
    B, T, _ = x_BTD.shape
    q = self.q_proj(x_BTD).reshape(B, T, self.n_heads, self.head_dim)
    k = self.k_proj(x_BTD).reshape(B, T, self.n_kv, self.head_dim)
    v = self.v_proj(x_BTD).reshape(B, T, self.n_kv, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.use_rope:
      cos, sin = rope_cos_sin(positions_BT, self._inv_freq, self._attn_factor)
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k, v

  def __call__(self, x_BTD, *, positions_BT, mask_BT=None):
    B, T, _ = x_BTD.shape
    q, k, v = self._qkv(x_BTD, positions_BT)
    mask = jnp.tril(jnp.ones((T, T), bool))[None]
    if mask_BT is not None:
      mask = mask & mask_BT[:, None, :]
    mask = jnp.broadcast_to(mask, (B, T, T))
    o = gqa_attention(q, k, v, mask, self.scale)
    return self.o_proj(o.reshape(B, T, -1))

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
    shape = (batch_size, max_len, self.n_kv, self.head_dim)
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                valid=jnp.zeros((batch_size, max_len), bool), index=jnp.zeros((), jnp.int32))

  def extend(self, x_BTD, cache, *, positions_BT, mask_BT=None):
    B, T, _ = x_BTD.shape
    S = cache["k"].shape[1]
    q, k, v = self._qkv(x_BTD, positions_BT)
    idx = cache["index"]
    kc = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, idx, 0, 0))
    vc = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, idx, 0, 0))
    new_valid = jnp.ones((B, T), bool) if mask_BT is None else mask_BT.astype(bool)
    valid = jax.lax.dynamic_update_slice(cache["valid"], new_valid, (0, idx))
    slots = jnp.arange(S)
    causal = slots[None, :] <= (idx + jnp.arange(T))[:, None]  # [T, S]
    mask = causal[None] & valid[:, None, :]
    o = gqa_attention(q, kc.astype(q.dtype), vc.astype(q.dtype), mask, self.scale)
    y = self.o_proj(o.reshape(B, T, -1))
    return y, dict(k=kc, v=vc, valid=valid, index=idx + T)


@register_mixer("attention")
def _make_attention(cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
  return Attention(cfg, layer_idx, rngs=rngs)


@register_mixer("nope")
def _make_nope(cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
  return Attention(cfg, layer_idx, rngs=rngs, use_rope=False)
