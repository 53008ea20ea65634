"""Mamba-2 / Gated DeltaNet mixers (plain and log-linear): decode = full forward, padding.

Prefill + chained extends (T > 1 on a non-empty cache, then token-by-token decode
through the recurrent state) must reproduce the full forward in fp32 (norm-relative
1e-5); a left-padded or holed row must equal its unpadded twin; an LM built with a
log-linear mixer decodes its full-forward logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.models.config import ModelConfig
from jaxlab.models.mixers.base import get_mixer_factory, known_mixers
from jaxlab.testing import assert_rel_close

MIXERS = ("mamba2", "log_linear_mamba2", "gated_deltanet", "log_linear_gated_deltanet")
RTOL = 1e-5
OPTS = dict(state_size=8, head_k_dim=8, expand_v=2, conv_width=4)


def cfg_for(name, **kw):
  base = dict(d_model=32, n_heads=2, max_seq_len=128, mixer=name, mixer_options=OPTS)
  base.update(kw)
  return ModelConfig(**base)


@functools.lru_cache(maxsize=None)
def mixer(name, **opts):
  cfg = cfg_for(name, mixer_options=dict(OPTS, **opts))
  return get_mixer_factory(name)(cfg, 0, rngs=nnx.Rngs(0))


@functools.lru_cache(maxsize=None)
def jitted(name):
  """Jitted __call__ and extend of one mixer (graphdef closed over, params as inputs)."""
  graph, params = nnx.split(mixer(name))

  @jax.jit
  def call(params, x, mask):
    return nnx.merge(graph, params)(x, mask_BT=mask)

  @jax.jit
  def extend(params, x, cache, mask):
    return nnx.merge(graph, params).extend(x, cache, mask_BT=mask)
  return params, call, extend


def test_registered():
  for name in MIXERS:
    assert name in known_mixers()
    assert callable(get_mixer_factory(name))


# All calls use B=2, T=70 and the same chunking (29 + 29 + 1-token steps), with a mask
# array, so each mixer compiles one __call__ and two extends.
B, T = 2, 70
SPLITS = [(0, 29), (29, 58)] + [(t, t + 1) for t in range(58, 70)]


@functools.lru_cache(maxsize=None)
def full_forward(name):
  params, call, _ = jitted(name)
  x = jax.random.normal(jax.random.PRNGKey(1), (B, T, 32))
  return x, call(params, x, jnp.ones((B, T), bool))


def decode(name, x, mask, upto=T):
  params, _, extend = jitted(name)
  cache = mixer(name).init_cache(B, 128)
  outs = []
  for a, b in SPLITS:
    if a >= upto:
      break
    y, cache = extend(params, x[:, a:b], cache, mask[:, a:b])
    outs.append(y)
  return jnp.concatenate(outs, 1), cache


# ~11 s each; the plain mixers' are slow (CI runs them), the log-linear ones stay
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if not n.startswith("log_linear") else n for n in MIXERS])
def test_extend_reproduces_full_forward(name):
  """Prefill 29, extend 29 (T > 1 on a cache, unaligned), decode 12 tokens one by one."""
  x, full = full_forward(name)
  y, cache = decode(name, x, jnp.ones((B, T), bool))
  assert_rel_close(y, full, rtol=RTOL, name=f"{name} extend vs call")
  assert cache["state"].count.tolist() == [T, T]


@pytest.mark.parametrize("name", MIXERS)
def test_padding_is_invisible(name):
  """Row 0: 6 pads (NaN inputs) then 64 tokens; row 1: 20 tokens, a hole of 6 pads, 44
  tokens. Real tokens match the unpadded forward, padded outputs are 0, and the cache
  continues as if padding never happened."""
  params, call, _ = jitted(name)
  x, full = full_forward(name)
  pad = jnp.full((6, 32), jnp.nan)
  rows = jnp.stack([jnp.concatenate([pad, x[0, :64]]),
                    jnp.concatenate([x[1, :20], pad, x[1, 20:64]])])
  mask = jnp.ones((B, T), bool).at[0, :6].set(False).at[1, 20:26].set(False)
  y = call(params, rows, mask)
  assert np.isfinite(np.asarray(y)).all()
  assert_rel_close(y[0, 6:], full[0, :64], rtol=RTOL, name="left padded")
  assert_rel_close(jnp.concatenate([y[1, :20], y[1, 26:]]), full[1, :64], rtol=RTOL,
                   name="holed")
  assert float(jnp.abs(y[0, :6]).max()) == 0.0 and float(jnp.abs(y[1, 20:26]).max()) == 0.0
  # Through the cache: 29 + 29 padded tokens hold 52 real ones per row; then 1 step.
  y, cache = decode(name, rows, mask, upto=59)
  assert cache["state"].count.tolist() == [53, 53]
  assert_rel_close(y[:, -1], full[:, 52], rtol=RTOL, name="decode after padding")


def test_cache_and_option_errors():
  with pytest.raises(ValueError, match="max_len"):
    mixer("log_linear_mamba2").init_cache(1, 4096)   # 8 levels hold 128 tokens
  with pytest.raises(ValueError, match="num_levels"):
    mixer("log_linear_mamba2", num_levels=0)
  with pytest.raises(ValueError, match="impl"):
    mixer("gated_deltanet", impl="fast")
  with pytest.raises(ValueError, match="qk_heads"):
    mixer("gated_deltanet", qk_heads=3)
  with pytest.raises(ValueError, match="level_scales"):
    mixer("log_linear_mamba2", num_levels=3)(jnp.zeros((1, 9, 32)))


def test_level_scale_gets_gradients():
  graph, params = nnx.split(mixer("log_linear_gated_deltanet"))
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 20, 32))
  grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graph, p)(x) ** 2)))(params)
  g = np.asarray(grads["level_scale"][...])
  assert g.shape == (2 * 8,) and np.isfinite(g).all() and np.abs(g).max() > 0


def test_lm_decode_reproduces_full_logits():
  from jaxlab.models.transformer import LM
  name = "log_linear_mamba2"
  cfg = cfg_for(name, n_layers=1, vocab_size=64)
  lm = LM(cfg, rngs=nnx.Rngs(0))
  graph, params = nnx.split(lm)
  toks = jax.random.randint(jax.random.PRNGKey(4), (2, 24), 0, 64)
  full = jax.jit(lambda p, t: nnx.merge(graph, p)(t))(params, toks)
  ext = jax.jit(lambda p, t, c: nnx.merge(graph, p).extend(t, c))
  logits, cache = ext(params, toks[:, :16], lm.init_cache(2, 64))
  outs = [logits]
  for t in range(16, 24):
    logits, cache = ext(params, toks[:, t:t + 1], cache)
    outs.append(logits)
  assert_rel_close(jnp.concatenate(outs, 1), full, rtol=RTOL, name=f"LM {name} decode")


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_mqar_report_and_accuracy_by_query(tmp_path):
  """The experiment's report helpers read real `jaxlab train lm` run directories."""
  from jaxlab.bench.log_linear import mqar_accuracy_by_query, mqar_report
  from train.lm import build_job, run_job
  job = build_job(task="mqar", task_options=dict(num_kv_pairs=4, seq_len=16, vocab_size=32),
                  model_overrides=dict(mixer="log_linear_mamba2", d_model=16, n_layers=1,
                                       n_heads=2, max_seq_len=16),
                  train_overrides=dict(steps=2, batch_size=4, eval_every=2, checkpoint_every=2,
                                       warmup_steps=1))
  run_job(job, tmp_path / "log_linear_mamba2", progress=False, plot=False, log=lambda *_: None)
  table = mqar_report(tmp_path, png=str(tmp_path / "p.png"), title="t")
  assert table.splitlines()[2].startswith("| log_linear_mamba2 | 2 |")
  assert (tmp_path / "p.png").stat().st_size > 0
  acc = mqar_accuracy_by_query(tmp_path / "log_linear_mamba2", examples=16, bucket=4)
  assert min(acc) >= 8 and all(0.0 <= v <= 1.0 for v in acc.values())  # queries follow the pairs
