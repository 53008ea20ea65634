"""Decoder-only LM (Llama / Qwen style) with a pluggable token mixer per layer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab.models.config import ModelConfig, validate_mixers
from jaxlab.models.layers import Embed, Linear, RMSNorm, SwiGLU
from jaxlab.models.mixers.base import get_mixer_factory


class Block(nnx.Module):
  """Pre-norm residual block: x + mixer(norm(x)); x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
    self.mixer_name = cfg.layer_mixer(layer_idx)
    self.input_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    self.mixer = get_mixer_factory(self.mixer_name)(cfg, layer_idx, rngs=rngs)
    self.post_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    self.mlp = SwiGLU(cfg.d_model, cfg.hidden_dim, use_bias=cfg.mlp_bias, init_std=cfg.init_std,
                      param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, x, *, positions_BT, mask_BT=None):
    x = x + self.mixer(self.input_norm(x), positions_BT=positions_BT, mask_BT=mask_BT)
    return x + self.mlp(self.post_norm(x))

  def extend(self, x, cache, *, positions_BT, mask_BT=None):
    h, cache = self.mixer.extend(self.input_norm(x), cache, positions_BT=positions_BT,
                                 mask_BT=mask_BT)
    x = x + h
    return x + self.mlp(self.post_norm(x)), cache


def positions_from_mask(mask_BT: jax.Array, offset_B: jax.Array | None = None) -> jax.Array:
  """Absolute positions of real tokens (left padding does not count)."""
  pos = jnp.cumsum(mask_BT.astype(jnp.int32), axis=1) - 1
  pos = jnp.maximum(pos, 0)
  if offset_B is not None:
    pos = pos + offset_B[:, None]
  return pos


class LM(nnx.Module):
  """Token ids [B, T] -> logits [B, T, vocab] (fp32).

  Full forward: `model(tokens)`. Incremental decoding: `cache = model.init_cache(B, S)`,
  then `logits, cache = model.extend(tokens, cache)` for a prompt and again for
  each new token.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    validate_mixers(cfg)
    self.cfg = cfg
    self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std,
                       param_dtype=cfg.param_dtype, rngs=rngs)
    self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    if cfg.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = Linear(cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"),
                            init_std=cfg.init_std, param_dtype=cfg.param_dtype, rngs=rngs)

  def _dtype(self):
    return self.embed.embedding[...].dtype

  def _logits(self, x):
    x = self.final_norm(x)
    logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
    return logits.astype(jnp.float32)

  def hidden(self, tokens_BT, *, positions_BT=None, mask_BT=None):
    """Final hidden states before the output norm."""
    if positions_BT is None:
      if mask_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
      else:
        positions_BT = positions_from_mask(mask_BT)
    x = self.embed(tokens_BT, dtype=self._dtype())
    for layer in self.layers:
      x = layer(x, positions_BT=positions_BT, mask_BT=mask_BT)
    return x

  def __call__(self, tokens_BT, *, positions_BT=None, mask_BT=None):
    return self._logits(self.hidden(tokens_BT, positions_BT=positions_BT, mask_BT=mask_BT))

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> dict[str, Any]:
    dtype = self._dtype() if dtype is None else dtype
    return dict(
        layers=tuple(l.mixer.init_cache(batch_size, max_len, dtype) for l in self.layers),
        next_pos=jnp.zeros((batch_size,), jnp.int32),
    )

  def extend(self, tokens_BT, cache, *, mask_BT=None):
    """Run T new tokens after the cache's contents; returns (logits [B,T,V], cache)."""
    B, T = tokens_BT.shape
    m = jnp.ones((B, T), bool) if mask_BT is None else mask_BT.astype(bool)
    positions = positions_from_mask(m, cache["next_pos"])
    # Positions of padded tokens are irrelevant; keep them in range.
    x = self.embed(tokens_BT, dtype=self._dtype())
    new_layers = []
    for layer, c in zip(self.layers, cache["layers"]):
      x, c = layer.extend(x, c, positions_BT=positions, mask_BT=mask_BT)
      new_layers.append(c)
    next_pos = cache["next_pos"] + jnp.sum(m, axis=1, dtype=jnp.int32)
    return self._logits(x), dict(layers=tuple(new_layers), next_pos=next_pos)


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
