"""PaTH / PaTH-FoX / FoX mixers: cached decoding reproduces the full forward, left
padding is invisible, and the parameterization matches the paper (fla layer)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.models.config import ModelConfig
from jaxlab.models.mixers.base import get_mixer_factory
from jaxlab.testing import assert_rel_close, tol

F32 = jnp.float32
B, T, D = 2, 20, 32
PAD = (4, 2)   # left padding per batch row


def make_mixer(name, **options):
  cfg = ModelConfig(d_model=D, n_heads=4, n_kv_heads=2, mixer=name,
                    mixer_options={"path_block_size": 4, **options})
  return get_mixer_factory(name)(cfg, 0, rngs=nnx.Rngs(0))


def jit_module(fn):
  """jit fn(module, *args) over (graphdef, state). Test-only fast compile: no LLVM
  optimization passes (same HLO, IEEE semantics), about half the CPU compile time."""
  @functools.partial(jax.jit, static_argnums=0,
                     compiler_options={"xla_backend_optimization_level": 0})
  def run(graphdef, state, *args):
    return fn(nnx.merge(graphdef, state), *args)
  return lambda m, *args: run(*nnx.split(m), *args)


@jit_module
def full(m, x, mask):
  return m(x, positions_BT=jnp.zeros(mask.shape, jnp.int32), mask_BT=mask)


@jit_module
def extend(m, x, cache, mask):
  return m.extend(x, cache, positions_BT=jnp.zeros(mask.shape, jnp.int32), mask_BT=mask)


def run_cached(m, x, mask):
  """Prefill 8, extend 8 (2 blocks of 4 against the cache), then decode token by token."""
  cache = m.init_cache(B, 24, F32)
  ys = []
  for a, b in [(0, 8), (8, 16)] + [(t, t + 1) for t in range(16, T)]:
    y, cache = extend(m, x[:, a:b], cache, mask[:, a:b])
    ys.append(y)
  return jnp.concatenate(ys, axis=1), cache


@pytest.mark.parametrize("name", ["path", "path_fox", "fox"])
def test_cached_decoding_and_left_padding_reproduce_full_forward(name):
  m = make_mixer(name)
  x = jax.random.normal(jax.random.PRNGKey(1), (B, T, D))
  ones = jnp.ones((B, T), bool)
  ref = full(m, x, ones)
  rtol = tol(F32, T * D)

  y, cache = run_cached(m, x, ones)
  assert_rel_close(y, ref, rtol=rtol, name="prefill+extend+decode")
  assert int(cache["attn"].length) == T

  # Row r: PAD[r] junk tokens (mask False), then the first T - PAD[r] real tokens.
  junk = 3.0 * jax.random.normal(jax.random.PRNGKey(2), (B, T, D))
  xp = jnp.stack([jnp.concatenate([junk[r, :p], x[r, :T - p]]) for r, p in enumerate(PAD)])
  mask = jnp.stack([jnp.arange(T) >= p for p in PAD])
  for label, out in (("full", full(m, xp, mask)), ("cached", run_cached(m, xp, mask)[0])):
    assert np.all(np.isfinite(np.asarray(out))), label
    for r, p in enumerate(PAD):
      assert_rel_close(out[r, p:], ref[r, :T - p], rtol=rtol, name=f"{label} row {r}")


def test_w_beta_g_parameterization():
  m = make_mixer("path_fox")
  x = jax.random.normal(jax.random.PRNGKey(3), (B, 5, D))
  q, k, v, w, beta, g, state = m._inputs(x, None, None)
  assert w.dtype == F32 and w.shape == (B, 5, 2, 8)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(w), axis=-1), 1.0, rtol=1e-6)
  assert beta.shape == (B, 5, 2) and float(beta.min()) > 0 and float(beta.max()) < 2
  assert g.shape == (B, 5, 4) and float(g.max()) < 0
  assert state.shape == (B, 2, 16)                   # conv k=3 keeps 2 inputs of kv_dim
  assert m.w_down.kernel.shape == (D, 32) and m.w_up.kernel.shape == (32, 16)
  assert m.w_conv.shape == (3, 16)
  # Short conv is causal: changing token 3 leaves w at tokens 0..2 unchanged.
  w2 = m._inputs(x.at[:, 3].add(1.0), None, None)[3]
  np.testing.assert_array_equal(np.asarray(w2[:, :3]), np.asarray(w[:, :3]))
  assert not np.allclose(np.asarray(w2[:, 3]), np.asarray(w[:, 3]))

  full_rank = make_mixer("path", path_w_rank=0, path_w_conv=0)
  assert full_rank.w_down is None and full_rank.w_conv is None
  assert full_rank.w_proj.kernel.shape == (D, 16) and full_rank.g_proj is None
  fox = make_mixer("fox")
  assert fox.beta_proj is None and fox.w_conv is None and fox.g_proj is not None
  with pytest.raises(ValueError, match="PathOptions.w_rank"):
    make_mixer("path", path_w_rank=-1)


def test_lm_with_path_mixer_decodes_like_full_forward():
  from jaxlab.models.transformer import LM

  cfg = ModelConfig(vocab_size=64, d_model=D, n_heads=2, n_layers=2, mixer="path",
                    mixer_options={"path_block_size": 8})
  lm = LM(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.PRNGKey(4), (B, 12), 0, 64)
  ref = jit_module(lambda m, t: m(t))(lm, tokens)
  step = jit_module(lambda m, t, c: m.extend(t, c))
  cache = lm.init_cache(B, 16)
  out, cache = step(lm, tokens[:, :8], cache)
  outs = [out]
  for t in range(8, 12):
    out, cache = step(lm, tokens[:, t:t + 1], cache)
    outs.append(out)
  assert_rel_close(jnp.concatenate(outs, axis=1), ref, rtol=tol(F32, 12 * D), name="logits")
