"""Batched rollouts: G sampled completions per prompt from the jaxlab decoder and its cache.

One jitted call per batch (`_sample`): the left-padded prompts are repeated G
times (group-major: rows [i*G, (i+1)*G) belong to prompt i), laid out over the
mesh's batch axes, and decoded by `jaxlab.models.generate.generate` (a prefill
plus a scanned decode over the KV cache) with temperature / top-k / top-p and
stop token ids. Everything static (shapes, sampling settings, stop ids) is a
jit static argument, so a run compiles this once per shape.

Stop *strings* (multi-token stops of HF tokenizers, e.g. "</confidence>") are
applied on the host after decoding: the completion is cut after the first token
whose prefix text contains a stop string, and later tokens leave the mask.

`Rollout.training_batch()` lays out prompt + completion as one sequence for the
learner: tokens [N, P+L], attention mask, and a loss mask over the completion
tokens (aligned with next-token targets, so shape [N, P+L-1]).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab import sharding as shd
from jaxlab.config import require
from jaxlab.models.generate import generate, left_pad
from jaxlab.models.sampling import SamplingConfig
from train.trainer import to_host

__all__ = ["RolloutConfig", "Rollout", "Sampler", "apply_stop_strings", "pad_prompts"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
  """How completions are sampled. temperature 0 = greedy; top_k 0 / top_p 1 disable filters."""
  group_size: int = 8
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  stop_token_ids: tuple[int, ...] = ()   # e.g. EOS; the stop token is kept in the completion
  stop_strings: tuple[str, ...] = ()     # host-side, needs a `decode` function

  def __post_init__(self):
    c = "RolloutConfig"
    object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
    object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
    require(isinstance(self.group_size, int) and self.group_size >= 1, c, "group_size",
            f"must be a positive integer, got {self.group_size!r}")
    require(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, c,
            "max_new_tokens", f"must be a positive integer, got {self.max_new_tokens!r}")
    require(all(isinstance(s, str) and s for s in self.stop_strings), c, "stop_strings",
            f"must be non-empty strings, got {self.stop_strings!r}")
    self.sampling  # validates temperature / top_k / top_p

  @property
  def sampling(self) -> SamplingConfig:
    return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


class Rollout(NamedTuple):
  """N = prompts * G completions, group-major (rows i*G..i*G+G-1 share prompt i)."""
  prompt_tokens: np.ndarray   # int32 [N, P], left-padded
  prompt_mask: np.ndarray     # bool [N, P]
  tokens: np.ndarray          # int32 [N, L]; pad_id after the stop
  mask: np.ndarray            # bool [N, L]; kept completion tokens (stop token included)
  logprobs: np.ndarray        # f32 [N, L]; sampling-time log p (temperature 1, unfiltered)
  truncated: np.ndarray       # bool [N]; no stop within max_new_tokens
  texts: list[str]            # decoded completions ([] without a decode function)
  group_size: int

  @property
  def lengths(self) -> np.ndarray:
    return self.mask.sum(axis=1)

  def training_batch(self, *, mask_truncated: bool = False) -> dict[str, np.ndarray]:
    """tokens [N, S], attn_mask [N, S], loss_mask [N, S-1] (target = tokens[:, 1:]).

    mask_truncated drops truncated completions from the loss (the paper's math runs).
    """
    tokens = np.concatenate([self.prompt_tokens, self.tokens], axis=1).astype(np.int32)
    attn = np.concatenate([self.prompt_mask, self.mask], axis=1)
    P = self.prompt_tokens.shape[1]
    loss = np.zeros(tokens.shape, np.float32)
    loss[:, P:] = self.mask
    if mask_truncated:
      loss[self.truncated] = 0.0
    return dict(tokens=tokens, attn_mask=attn, loss_mask=loss[:, 1:])


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
  """Left-pad token lists to `length` (ValueError naming `prompts` if one is longer)."""
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"prompts: prompt {i} is empty")
    if len(p) > length:
      raise ValueError(f"prompts: prompt {i} has {len(p)} tokens > max_prompt_len={length}")
  return left_pad([list(map(int, p)) for p in prompts], pad_id=pad_id, length=length)


def apply_stop_strings(tokens_NL: np.ndarray, mask_NL: np.ndarray,
                       decode: Callable[[Sequence[int]], str],
                       stop_strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Cut each row after the first token at which the decoded prefix contains a stop string.

  Returns (mask, stopped_N). Finds the shortest such prefix by bisection: whether a
  prefix's text contains a stop string is monotone in the prefix length.
  """
  mask = mask_NL.copy()
  stopped = np.zeros(mask.shape[0], bool)
  if not stop_strings:
    return mask, stopped
  for r in range(mask.shape[0]):
    n = int(mask[r].sum())
    ids = tokens_NL[r, :n].tolist()

    def hit(k):
      text = decode(ids[:k])
      return any(s in text for s in stop_strings)

    if n == 0 or not hit(n):
      continue
    lo, hi = 1, n  # hit(hi) is True
    while lo < hi:
      mid = (lo + hi) // 2
      if hit(mid):
        hi = mid
      else:
        lo = mid + 1
    mask[r, lo:] = False
    stopped[r] = True
  return mask, stopped


@functools.partial(jax.jit, static_argnames=("graphdef", "group_size", "max_new_tokens",
                                             "sampling", "eos_ids", "pad_id", "row_sharding"))
def _sample(graphdef, states, prompt_BP, mask_BP, key, *, group_size: int, max_new_tokens: int,
            sampling: SamplingConfig, eos_ids: tuple[int, ...], pad_id: int, row_sharding):
  """Repeat each prompt G times, lay rows over the batch axes, decode with the cache."""
  model = nnx.merge(graphdef, *states)
  prompt = jnp.repeat(prompt_BP, group_size, axis=0)
  mask = jnp.repeat(mask_BP, group_size, axis=0)
  if row_sharding is not None:
    prompt = jax.lax.with_sharding_constraint(prompt, row_sharding)
    mask = jax.lax.with_sharding_constraint(mask, row_sharding)
  out = generate(model, prompt, mask, max_new_tokens=max_new_tokens, sampling=sampling, key=key,
                 eos_ids=eos_ids, pad_id=pad_id)
  return prompt, mask, out["tokens"], out["logprobs"], out["mask"]


class Sampler:
  """Samples rollouts from a model given as (graphdef, states) with `nnx.merge(graphdef, *states)`.

  `states` are (pure dicts or nnx.State) already placed on `mesh` (see
  `GRPOLearner.sampling_states`); prompt rows are laid over the mesh's
  (data, fsdp) axes. Prompts are left-padded to `max_prompt_len` so shapes, and
  hence the compiled function, stay fixed for a run.
  """

  def __init__(self, graphdef, cfg: RolloutConfig, *, max_prompt_len: int, pad_id: int = 0,
               mesh: jax.sharding.Mesh | None = None,
               decode: Callable[[Sequence[int]], str] | None = None):
    if cfg.stop_strings and decode is None:
      raise ValueError("decode: stop_strings need a decode function")
    if not (isinstance(max_prompt_len, int) and max_prompt_len >= 1):
      raise ValueError(f"max_prompt_len: must be a positive integer, got {max_prompt_len!r}")
    self.graphdef, self.cfg = graphdef, cfg
    self.max_prompt_len, self.pad_id = max_prompt_len, int(pad_id)
    self.mesh, self.decode = mesh, decode
    self.batch_shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]

  def sample(self, states, prompts: Sequence[Sequence[int]], key: jax.Array, *,
             group_size: int | None = None, sampling: SamplingConfig | None = None,
             max_new_tokens: int | None = None) -> Rollout:
    """G completions for each prompt (token id lists). Overrides: e.g. greedy eval with
    group_size=1, sampling=SamplingConfig()."""
    G = self.cfg.group_size if group_size is None else group_size
    sampling = self.cfg.sampling if sampling is None else sampling
    L = self.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
    n = len(prompts)
    if n == 0:
      raise ValueError("prompts: empty batch")
    # Rows must split evenly over the batch shards: pad with copies of the last prompt.
    step = self.batch_shards // math.gcd(self.batch_shards, G)
    n_pad = -n % step
    prompts = list(prompts) + [prompts[-1]] * n_pad
    ptoks, pmask = pad_prompts(prompts, self.max_prompt_len, self.pad_id)
    if self.mesh is None:
      row_sh, rep = None, None
    else:
      row_sh = shd.batch_sharding(self.mesh, 2)
      rep = shd.replicated(self.mesh)
    dev = (lambda x: jnp.asarray(x)) if rep is None else (lambda x: shd.global_array(x, rep))
    outs = _sample(self.graphdef, tuple(states), dev(ptoks), dev(pmask), key, group_size=G,
                   max_new_tokens=L, sampling=sampling, eos_ids=self.cfg.stop_token_ids,
                   pad_id=self.pad_id, row_sharding=row_sh)
    p, pm, toks, lps, mask = (to_host(o) for o in outs)
    keep = n * G
    p, pm, toks, lps, mask = p[:keep], pm[:keep], toks[:keep], lps[:keep], mask[:keep]
    stop_ids = np.asarray(self.cfg.stop_token_ids or (-1,), np.int32)
    lengths = mask.sum(axis=1)
    last = toks[np.arange(keep), np.maximum(lengths - 1, 0)]
    stopped = (lengths > 0) & np.isin(last, stop_ids)
    if self.cfg.stop_strings:
      mask, by_string = apply_stop_strings(toks, mask, self.decode, self.cfg.stop_strings)
      stopped = stopped | by_string
    toks = np.where(mask, toks, self.pad_id).astype(np.int32)
    lps = np.where(mask, lps, 0.0).astype(np.float32)
    texts = [] if self.decode is None else [self.decode(t[m].tolist()) for t, m in zip(toks, mask)]
    return Rollout(p.astype(np.int32), pm.astype(bool), toks, mask.astype(bool), lps, ~stopped,
                   texts, G)
