"""Sampling: greedy, temperature, top-k, top-p, seeds; generation with left padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.config import ConfigError
from jaxlab.models import LM, ModelConfig
from jaxlab.models.generate import Streamer, generate, left_pad
from jaxlab.models.sampling import SamplingConfig, filter_logits, sample_logits


def test_greedy_is_argmax():
  logits = jax.random.normal(jax.random.key(0), (4, 30))
  np.testing.assert_array_equal(sample_logits(logits, jax.random.key(1), SamplingConfig()),
                                np.argmax(logits, -1))


def test_top_k_support():
  logits = jax.random.normal(jax.random.key(0), (3, 50))
  cfg = SamplingConfig(temperature=1.0, top_k=5)
  keys = jax.random.split(jax.random.key(2), 200)
  draws = jax.vmap(lambda k: sample_logits(logits, k, cfg))(keys)
  top5 = np.argsort(-np.asarray(logits), -1)[:, :5]
  for b in range(3):
    assert set(np.asarray(draws[:, b]).tolist()) <= set(top5[b].tolist())


def test_top_p_keeps_smallest_nucleus():
  probs = np.array([[0.5, 0.3, 0.1, 0.06, 0.04]])
  logits = jnp.log(jnp.asarray(probs))
  kept = np.isfinite(np.asarray(filter_logits(logits, SamplingConfig(temperature=1.0,
                                                                     top_p=0.75))))
  np.testing.assert_array_equal(kept, [[True, True, False, False, False]])
  kept = np.isfinite(np.asarray(filter_logits(logits, SamplingConfig(temperature=1.0,
                                                                     top_p=0.85))))
  np.testing.assert_array_equal(kept, [[True, True, True, False, False]])
  kept = np.isfinite(np.asarray(filter_logits(logits, SamplingConfig(temperature=1.0,
                                                                     top_p=0.4))))
  np.testing.assert_array_equal(kept, [[True, False, False, False, False]])


def test_temperature_sampling_frequencies():
  logits = jnp.log(jnp.asarray([[0.7, 0.2, 0.1]]))
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, SamplingConfig(temperature=1.0)))(keys))
  freq = np.bincount(draws[:, 0], minlength=3) / 4000
  # 4 standard errors of a binomial proportion at n=4000.
  np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=4 * np.sqrt(0.25 / 4000))


def test_bad_sampling_config():
  with pytest.raises(ConfigError, match="top_p"):
    SamplingConfig(top_p=0.0)
  with pytest.raises(ConfigError, match="temperature"):
    SamplingConfig(temperature=-1.0)


def _model():
  return LM(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        init_std=0.3), rngs=nnx.Rngs(0))


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_generate_left_padded_batch_matches_single_prompts_and_streamer():
  m = _model()
  prompts = [[1, 2, 3, 4], [5, 6]]
  toks, mask = left_pad(prompts)
  out = generate(m, toks, mask, max_new_tokens=8)
  s = Streamer(m, max_len=16)
  for i, p in enumerate(prompts):
    single = generate(m, np.asarray([p]), max_new_tokens=8)
    np.testing.assert_array_equal(out["tokens"][i], single["tokens"][0])
    np.testing.assert_array_equal(np.asarray(list(s.stream(p, 8))), single["tokens"][0])


def test_generate_seeded_and_stops_at_eos():
  m = _model()
  toks = np.asarray([[1, 2, 3]])
  cfg = SamplingConfig(temperature=1.5, top_k=20)
  a = generate(m, toks, max_new_tokens=10, sampling=cfg, key=jax.random.key(7))
  b = generate(m, toks, max_new_tokens=10, sampling=cfg, key=jax.random.key(7))
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  eos = int(a["tokens"][0, 3])
  c = generate(m, toks, max_new_tokens=10, sampling=cfg, key=jax.random.key(7), eos_ids=[eos],
               pad_id=0)
  first = int(np.argmax(np.asarray(a["tokens"][0]) == eos))
  np.testing.assert_array_equal(c["tokens"][0, :first + 1], a["tokens"][0, :first + 1])
  assert np.all(np.asarray(c["mask"][0, first + 1:]) == False)  # noqa: E712
  assert np.all(np.asarray(c["tokens"][0, first + 1:]) == 0)
