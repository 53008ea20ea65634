"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), seeded."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlab.config import require


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
  """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    require(self.temperature >= 0, "SamplingConfig", "temperature",
            f"must be >= 0, got {self.temperature}")
    require(self.top_k >= 0, "SamplingConfig", "top_k", f"must be >= 0, got {self.top_k}")
    require(0 < self.top_p <= 1, "SamplingConfig", "top_p", f"must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def filter_logits(logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Temperature-scaled logits with top-k / top-p exclusions set to -inf."""
  x = logits_BV.astype(jnp.float32) / cfg.temperature
  neg = jnp.array(-jnp.inf, x.dtype)
  if cfg.top_k and cfg.top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, cfg.top_k)[0][..., -1:]
    x = jnp.where(x < kth, neg, x)
  if cfg.top_p < 1.0:
    order = jnp.argsort(-x, axis=-1)
    sorted_x = jnp.take_along_axis(x, order, axis=-1)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    # Keep a token if the mass strictly before it is < top_p (the top token always stays).
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = before < cfg.top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
    x = jnp.where(keep, x, neg)
  return x


def sample_logits(logits_BV: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """One token id per row (int32 [B])."""
  if cfg.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits_BV, cfg), axis=-1).astype(jnp.int32)


def token_logprobs(logits_BV: jax.Array, tokens_B: jax.Array, cfg: SamplingConfig | None = None):
  """log p(token) under the (unfiltered, temperature-1) model distribution."""
  lp = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(lp, tokens_B[:, None], axis=-1)[:, 0]
