"""The LM substrate: decode == full forward, prefill + decode, padding, configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.config import ConfigError, from_dict
from jaxlab.models import LM, ModelConfig, RopeScaling
from jaxlab.models.generate import left_pad
from jaxlab.testing import assert_close, tol

CONFIGS = {
    "mha_tied": dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4),
    "gqa_untied": dict(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2,
                       tie_embeddings=False),
    "qwen2_bias": dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1,
                       attn_bias=True),
    "qwen3_qknorm": dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=16, qk_norm=True),
    "llama3_rope": dict(vocab_size=97, d_model=32, n_layers=1, n_heads=2,
                        rope_scaling=RopeScaling(kind="llama3", factor=8.0,
                                                 original_max_position=16)),
    "yarn_rope": dict(vocab_size=97, d_model=32, n_layers=1, n_heads=2,
                      rope_scaling=RopeScaling(kind="yarn", factor=4.0, original_max_position=16)),
}


def _model(name, seed=0):
  cfg = ModelConfig(**CONFIGS[name], init_std=0.2)
  return LM(cfg, rngs=nnx.Rngs(seed))


# Jitted forward / extend: one compile per shape instead of one per op executed eagerly
# (the same model code; ~2-3x faster on the 2-core CI machine).
@nnx.jit
def _fwd(m, toks, mask_BT=None):
  return m(toks, mask_BT=mask_BT)


@nnx.jit
def _ext(m, toks, cache, mask_BT=None):
  return m.extend(toks, cache, mask_BT=mask_BT)


def _tokens(B, T, V, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


# gqa_untied: ~9 s, slow (CI runs it)
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "gqa_untied"
                                  else n for n in sorted(CONFIGS)])
def test_token_by_token_decode_matches_full_forward(name):
  m = _model(name)
  toks = _tokens(2, 13, 97)
  full = _fwd(m, toks)
  cache = m.init_cache(2, 16)
  outs = []
  for t in range(13):
    lg, cache = _ext(m, toks[:, t:t + 1], cache)
    outs.append(lg)
  inc = jnp.concatenate(outs, axis=1)
  # fp32, reductions over d_model and <= 16 keys.
  assert_close(inc, full, rtol=tol(jnp.float32, 64), atol=tol(jnp.float32, 64), name="logits")


# split 1: ~13 s, slow (CI runs it; 5 and 12 stay in the default run)
@pytest.mark.parametrize("split", [pytest.param(1, marks=pytest.mark.slow), 5, 12])
def test_prefill_then_decode_matches_full_forward_on_concatenation(split):
  m = _model("gqa_untied")
  toks = _tokens(3, 13, 97, seed=2)
  full = _fwd(m, toks)
  cache = m.init_cache(3, 20)
  lg1, cache = _ext(m, toks[:, :split], cache)
  lg2, cache = _ext(m, toks[:, split:], cache)
  assert_close(jnp.concatenate([lg1, lg2], 1), full, rtol=1e-5, atol=1e-5, name="logits")
  assert int(cache["layers"][0]["index"]) == 13


def test_left_padding_is_invisible():
  m = _model("qwen3_qknorm")
  a, b = [5, 6, 7, 8, 9, 10], [11, 12, 13]
  toks, mask = left_pad([a, b])
  batched = _fwd(m, jnp.asarray(toks), mask_BT=jnp.asarray(mask))
  alone = _fwd(m, jnp.asarray([b]))
  assert_close(batched[1, -3:], alone[0], rtol=1e-5, atol=1e-5, name="padded row")
  # and through the cache
  cache = m.init_cache(2, 10)
  lg, cache = _ext(m, jnp.asarray(toks), cache, mask_BT=jnp.asarray(mask))
  lg2, _ = _ext(m, jnp.asarray([[3], [3]]), cache)
  ref = _fwd(m, jnp.asarray([b + [3]]))
  assert_close(lg2[1, 0], ref[0, -1], rtol=1e-5, atol=1e-5, name="decode after padding")


def test_nan_in_unused_cache_slots_does_not_leak():
  m = _model("mha_tied")
  toks = _tokens(1, 6, 97)
  cache = m.init_cache(1, 12)
  poisoned = jax.tree.map(lambda x: x, cache)
  layers = []
  for c in poisoned["layers"]:
    c = dict(c)
    c["k"] = jnp.full_like(c["k"], jnp.nan)
    c["v"] = jnp.full_like(c["v"], jnp.nan)
    layers.append(c)
  poisoned["layers"] = tuple(layers)
  lg_clean, _ = _ext(m, toks, cache)
  lg_nan, _ = _ext(m, toks, poisoned)
  np.testing.assert_array_equal(np.asarray(lg_nan), np.asarray(lg_clean))


def test_gqa_equals_mha_with_repeated_kv_heads():
  cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, init_std=0.2)
  m = LM(cfg, rngs=nnx.Rngs(0))
  cfg2 = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, init_std=0.2)
  m2 = LM(cfg2, rngs=nnx.Rngs(0))
  _, s1 = nnx.split(m)
  g2, s2 = nnx.split(m2)
  p1, p2 = nnx.to_pure_dict(s1), nnx.to_pure_dict(s2)
  p2 = jax.tree.map(lambda x: x, p1)
  att = p2["layers"][0]["mixer"]
  hd = 8
  for name in ("k_proj", "v_proj"):
    w = att[name]["kernel"].reshape(32, 2, hd)
    att[name]["kernel"] = jnp.repeat(w, 2, axis=1).reshape(32, 4 * hd)
  m2 = nnx.merge(g2, p2)
  toks = _tokens(2, 7, 50)
  assert_close(_fwd(m2, toks), _fwd(m, toks), rtol=1e-5, atol=1e-6, name="gqa vs mha")


def test_causality():
  m = _model("mha_tied")
  toks = _tokens(1, 10, 97)
  toks2 = toks.at[0, 7].set((toks[0, 7] + 1) % 97)
  a, b = _fwd(m, toks), _fwd(m, toks2)
  np.testing.assert_array_equal(np.asarray(a[0, :7]), np.asarray(b[0, :7]))
  assert not np.allclose(np.asarray(a[0, 7:]), np.asarray(b[0, 7:]))


def test_rope_scaling_changes_long_positions_only_for_llama3_low_freqs():
  from jaxlab.models.rope import rope_frequencies
  base, _ = rope_frequencies(16, 10000.0, None)
  l3, _ = rope_frequencies(16, 10000.0, RopeScaling(kind="llama3", factor=8.0,
                                                    original_max_position=64))
  assert np.isclose(l3[0], base[0])           # highest frequency untouched
  assert np.isclose(l3[-1], base[-1] / 8.0)   # lowest frequency divided by factor
  lin, a = rope_frequencies(16, 10000.0, RopeScaling(kind="linear", factor=2.0))
  np.testing.assert_allclose(lin, base / 2)
  _, attn = rope_frequencies(16, 10000.0, RopeScaling(kind="yarn", factor=4.0))
  assert attn == pytest.approx(0.1 * np.log(4.0) + 1.0)


@pytest.mark.parametrize("bad, field", [
    (dict(d_model=0), "d_model"),
    (dict(n_heads=-2), "n_heads"),
    (dict(d_model=30, n_heads=4), "n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(vocab_size=True), "vocab_size"),
])
def test_bad_config_names_the_field(bad, field):
  with pytest.raises(ConfigError, match=field):
    from_dict(ModelConfig, bad)


def test_unknown_config_field_and_mixer():
  with pytest.raises(ConfigError, match="'d_modle'"):
    from_dict(ModelConfig, {"d_modle": 3})
  with pytest.raises(ValueError, match="unknown mixer"):
    LM(ModelConfig(mixer="nonsense"), rngs=nnx.Rngs(0))


def test_mixer_pattern_per_layer():
  cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=4,
                    mixer_pattern=("attention", "nope"))
  m = LM(cfg, rngs=nnx.Rngs(0))
  assert [l.mixer_name for l in m.layers] == ["attention", "nope", "attention"]
  toks = _tokens(1, 9, 50)
  cache = m.init_cache(1, 9)
  lg, _ = _ext(m, toks, cache)
  assert_close(lg, _fwd(m, toks), rtol=1e-5, atol=1e-6, name="mixed layers")
