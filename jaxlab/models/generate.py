"""Autoregressive generation with the model's cache: one jitted prefill + scanned decode.

Prompts of different lengths are left-padded; `prompt_mask` marks real tokens.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.models.sampling import SamplingConfig, sample_logits, token_logprobs


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None):
  """List of token lists -> (tokens int32 [B, T], mask bool [B, T]) left-padded."""
  T = max(len(s) for s in seqs) if length is None else length
  if any(len(s) > T for s in seqs):
    raise ValueError(f"prompt longer than {T} tokens")
  toks = np.full((len(seqs), T), pad_id, np.int32)
  mask = np.zeros((len(seqs), T), bool)
  for i, s in enumerate(seqs):
    if len(s):
      toks[i, T - len(s):] = s
      mask[i, T - len(s):] = True
  return toks, mask


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "eos_ids",
                                             "cache_len", "pad_id"))
def _generate(graphdef, state, prompt_BT, mask_BT, key, *, max_new_tokens: int,
              sampling: SamplingConfig, eos_ids: tuple[int, ...], cache_len: int, pad_id: int):
  model = nnx.merge(graphdef, state)
  B = prompt_BT.shape[0]
  cache = model.init_cache(B, cache_len)
  logits, cache = model.extend(prompt_BT, cache, mask_BT=mask_BT)
  last = logits[:, -1]
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

  def step(carry, _):
    last, cache, key, done = carry
    key, sub = jax.random.split(key)
    tok = sample_logits(last, sub, sampling)
    lp = token_logprobs(last, tok)
    tok = jnp.where(done, pad_id, tok)
    emitted = ~done
    done = done | jnp.any(tok[:, None] == eos[None, :], axis=-1)
    logits, cache = model.extend(tok[:, None], cache, mask_BT=emitted[:, None])
    return (logits[:, 0], cache, key, done), (tok, lp, emitted)

  done0 = jnp.zeros((B,), bool)
  _, (toks, lps, emitted) = jax.lax.scan(step, (last, cache, key, done0), None,
                                         length=max_new_tokens)
  return toks.T, lps.T, emitted.T


def generate(model: nnx.Module, prompt_BT, prompt_mask_BT=None, *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), key: jax.Array | None = None,
             eos_ids: Sequence[int] = (), pad_id: int = 0) -> dict:
  """Sample `max_new_tokens` per row (rows stop after an EOS id; later slots hold pad_id).

  Returns dict(tokens int32 [B, N], logprobs f32 [B, N], mask bool [B, N]) where
  mask marks generated tokens (EOS included).
  """
  prompt_BT = jnp.asarray(prompt_BT, jnp.int32)
  if prompt_mask_BT is None:
    prompt_mask_BT = jnp.ones(prompt_BT.shape, bool)
  if key is None:
    key = jax.random.key(0)
  cache_len = prompt_BT.shape[1] + max_new_tokens
  graphdef, state = nnx.split(model)
  toks, lps, mask = _generate(graphdef, state, prompt_BT, jnp.asarray(prompt_mask_BT, bool), key,
                              max_new_tokens=max_new_tokens, sampling=sampling,
                              eos_ids=tuple(int(e) for e in eos_ids), cache_len=cache_len,
                              pad_id=pad_id)
  return dict(tokens=toks, logprobs=lps, mask=mask)


class Streamer:
  """Token-by-token decoding for interactive use (CLI streaming): jitted prefill and step."""

  def __init__(self, model: nnx.Module, *, max_len: int, sampling: SamplingConfig = SamplingConfig(),
               seed: int = 0):
    self.graphdef, self.state = nnx.split(model)
    self.max_len = max_len
    self.sampling = sampling
    self.key = jax.random.key(seed)
    gd = self.graphdef

    @jax.jit
    def prefill(state, tokens_BT):
      m = nnx.merge(gd, state)
      cache = m.init_cache(tokens_BT.shape[0], max_len)
      logits, cache = m.extend(tokens_BT, cache)
      return logits[:, -1], cache

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(state, cache, tok_B):
      m = nnx.merge(gd, state)
      logits, cache = m.extend(tok_B[:, None], cache)
      return logits[:, 0], cache

    self._prefill, self._step = prefill, step

  def stream(self, prompt: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = ()):
    """Yield generated token ids one at a time."""
    if len(prompt) == 0:
      raise ValueError("empty prompt")
    if len(prompt) + max_new_tokens > self.max_len:
      raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds "
                       f"max_len={self.max_len}")
    last, cache = self._prefill(self.state, jnp.asarray([list(prompt)], jnp.int32))
    for _ in range(max_new_tokens):
      self.key, sub = jax.random.split(self.key)
      tok = sample_logits(last, sub, self.sampling)
      t = int(tok[0])
      yield t
      if t in eos_ids:
        return
      last, cache = self._step(self.state, cache, tok)
