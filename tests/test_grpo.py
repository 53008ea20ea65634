"""GRPO: advantages, clipped loss (hand case + reference), on-policy gradient, KL, update step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.config import ConfigError
from jaxlab.models import LM, ModelConfig
from jaxlab.models.lora import LoRAConfig, LoRAParam, apply_lora
from jaxlab.testing import assert_close, assert_rel_close, tol
from train.rlcr import rewards as R
from train.rlcr.grpo import (GRPOConfig, GRPOLearner, group_advantages, grpo_loss,
                             grpo_loss_reference, k3_kl, policy_logprobs)

_loss = jax.jit(grpo_loss, static_argnames=("clip_eps", "kl_beta"))

TINY = ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)


# ----------------------------------------------------------------------------- advantages

def test_group_advantages_mean_centred_matches_official_numpy():
  r = np.array([1.0, 0.0, 0.5, -2.0, 0.3, 0.3, 0.3, 0.3, 1.0, -1.0, 0.0, 0.25])
  a = group_advantages(r, 4)
  np.testing.assert_allclose(a, R.group_advantages(r, 4), rtol=tol(jnp.float32), atol=1e-7)
  np.testing.assert_allclose(np.asarray(a).reshape(3, 4).sum(1), 0.0, atol=1e-6)
  # The constant group has zero advantage (no learning signal).
  np.testing.assert_array_equal(np.asarray(a)[4:8], 0.0)


def test_group_advantages_std_scaling():
  r = np.array([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
  a = np.asarray(group_advantages(r, 4, scale_std=True, eps=1e-4))
  g = r[:4]
  want = (g - g.mean()) / (g.std(ddof=1) + 1e-4)
  np.testing.assert_allclose(a[:4], want, rtol=tol(jnp.float32, 4))
  np.testing.assert_array_equal(a[4:], 0.0)  # zero std: 0 / eps


@pytest.mark.parametrize("n,g", [(6, 4), (5, 0), (4, True)])
def test_group_advantages_bad_group_size(n, g):
  with pytest.raises(ValueError, match="group_size"):
    group_advantages(np.zeros(n), g)
  with pytest.raises(ValueError, match="group_size"):
    group_advantages(np.zeros(4), 1, scale_std=True)


# ----------------------------------------------------------------------------- loss

def _hand_case():
  # seq 0: A = +1, ratios 1.0, 1.5, (0.5 masked); seq 1: A = -2, ratios 0.5, 1.1, 2.0.
  old = np.zeros((2, 3), np.float32)
  logp = np.log(np.array([[1.0, 1.5, 0.5], [0.5, 1.1, 2.0]], np.float32))
  adv = np.array([1.0, -2.0], np.float32)
  mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
  return logp, old, adv, mask


def test_clipped_loss_hand_made_case():
  logp, old, adv, mask = _hand_case()
  loss, m = _loss(logp, old, adv, mask, clip_eps=0.2)
  # Token terms: -1, -min(1.5, 1.2) = -1.2 | -min(-1, -1.6) = 1.6, 2.2, -min(-4, -2.4) = 4.
  want = (-1.0 - 1.2 + 1.6 + 2.2 + 4.0) / 5
  np.testing.assert_allclose(float(loss), want, rtol=tol(jnp.float32, 5))
  # Clipped branch active on (0, 1) and (1, 0) only.
  np.testing.assert_allclose(float(m["clip_frac"]), 2 / 5, rtol=1e-6)
  assert grpo_loss_reference(logp, old, adv, mask, clip_eps=0.2) == pytest.approx(want, rel=1e-6)


def test_kl_term_hand_made_case():
  logp, old, adv, mask = _hand_case()
  ref = logp + np.log(2.0).astype(np.float32)  # d = ref - logp = log 2 everywhere
  k3 = 2.0 - np.log(2.0) - 1.0
  loss0, _ = _loss(logp, old, adv, mask, clip_eps=0.2)
  loss, m = _loss(logp, old, adv, mask, clip_eps=0.2, ref_logp_NT=ref, kl_beta=0.5)
  np.testing.assert_allclose(float(m["kl"]), k3, rtol=tol(jnp.float32, 5))
  np.testing.assert_allclose(float(loss), float(loss0) + 0.5 * k3, rtol=tol(jnp.float32, 5))
  # kl_beta = 0: the KL is reported but not in the loss.
  loss_b0, m0 = _loss(logp, old, adv, mask, clip_eps=0.2, ref_logp_NT=ref, kl_beta=0.0)
  assert float(loss_b0) == float(loss0)
  np.testing.assert_allclose(float(m0["kl"]), k3, rtol=tol(jnp.float32, 5))


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (8, 33)])
def test_loss_matches_reference(shape):
  rng = np.random.default_rng(sum(shape))
  logp = -rng.exponential(1.0, shape).astype(np.float32)
  old = logp + rng.normal(0, 0.3, shape).astype(np.float32)
  ref = logp + rng.normal(0, 0.3, shape).astype(np.float32)
  adv = rng.normal(0, 1, shape[0]).astype(np.float32)
  mask = (rng.random(shape) < 0.7).astype(np.float32)
  mask[0, 0] = 1.0
  for beta in (0.0, 0.1):
    loss, _ = _loss(logp, old, adv, mask, clip_eps=0.2, ref_logp_NT=ref, kl_beta=beta)
    want = grpo_loss_reference(logp, old, adv, mask, clip_eps=0.2, ref_logp_NT=ref, kl_beta=beta)
    n = int(mask.sum())
    np.testing.assert_allclose(float(loss), want, rtol=tol(jnp.float32, n), atol=tol(jnp.float32, n))


def test_clipped_tokens_get_no_gradient():
  logp, old, adv, mask = _hand_case()
  g = jax.jit(jax.grad(lambda lp: grpo_loss(lp, old, adv, mask, clip_eps=0.2)[0]))(logp)
  g = np.asarray(g)
  assert g[0, 1] == 0.0 and g[1, 0] == 0.0     # clipped branch active
  assert g[0, 2] == 0.0                         # masked
  # Active unclipped tokens: d/dlogp (-ratio * A) / n = -ratio * A / 5.
  np.testing.assert_allclose(g[0, 0], -1.0 / 5, rtol=1e-6)
  np.testing.assert_allclose(g[1, 2], 2.0 * 2.0 / 5, rtol=1e-6)


def test_k3_is_zero_with_zero_gradient_at_the_reference():
  x = jnp.linspace(-3.0, 0.0, 7)
  np.testing.assert_array_equal(k3_kl(x, x), 0.0)
  np.testing.assert_array_equal(jax.jit(jax.grad(lambda v: k3_kl(v, x).sum()))(x), 0.0)
  assert bool(jnp.all(k3_kl(x, x + 0.3) > 0)) and bool(jnp.all(k3_kl(x, x - 0.3) > 0))


def _seq_batch(seed=0, n=4, s=10, vocab=40):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (n, s)).astype(np.int32)
  attn = np.ones((n, s), bool)
  attn[1, :3] = False               # left padding
  attn[2, -2:] = False              # stopped early
  loss = np.zeros((n, s - 1), np.float32)
  loss[:, 5:] = attn[:, 6:]
  adv = rng.normal(0, 1, n).astype(np.float32)
  return dict(tokens=tokens, attn_mask=attn, loss_mask=loss, advantages=adv)


def test_on_policy_gradient_equals_reinforce():
  """ratio = 1 (old = detached current): grad = -(1/n) sum_t A_i grad log pi(y_t)."""
  model = LM(TINY, rngs=nnx.Rngs(0))
  gd, params = nnx.split(model)
  b = _seq_batch()
  n = b["loss_mask"].sum()

  def clipped(p):
    lp, _ = policy_logprobs(nnx.merge(gd, p), b["tokens"], b["attn_mask"])
    return grpo_loss(lp, jax.lax.stop_gradient(lp), b["advantages"], b["loss_mask"],
                     clip_eps=0.2)[0]

  def reinforce(p):
    lp, _ = policy_logprobs(nnx.merge(gd, p), b["tokens"], b["attn_mask"])
    return -(b["advantages"][:, None] * lp * b["loss_mask"]).sum() / n

  (l1, g1), g2 = jax.jit(lambda p: (jax.value_and_grad(clipped)(p), jax.grad(reinforce)(p)))(
      params)
  assert_rel_close(g1, g2, rtol=tol(jnp.float32, int(n)), name="on-policy gradient")
  # On-policy the loss value is -(1/n) sum_t A_i (ratio = 1), whatever the logprobs.
  assert float(l1) == pytest.approx(-(b["advantages"][:, None] * b["loss_mask"]).sum() / n,
                                    rel=1e-5)


def test_kl_term_vanishes_when_policy_equals_reference():
  """policy == reference: k3 = 0 and its gradient is 0, so beta changes nothing."""
  model = LM(TINY, rngs=nnx.Rngs(0))
  gd, params = nnx.split(model)
  b = _seq_batch()

  def loss(p, beta):
    lp, _ = policy_logprobs(nnx.merge(gd, p), b["tokens"], b["attn_mask"])
    return grpo_loss(lp, jax.lax.stop_gradient(lp), b["advantages"], b["loss_mask"],
                     ref_logp_NT=jax.lax.stop_gradient(lp), kl_beta=beta)

  vg = jax.value_and_grad(loss, has_aux=True)
  ((l0, m0), g0), ((l1, m1), g1) = jax.jit(lambda p: (vg(p, 0.0), vg(p, 0.5)))(params)
  assert float(m1["kl"]) == 0.0 and float(l1) == float(l0)
  assert_close(g1, g0, rtol=0, atol=0, name="gradient")


def test_policy_logprobs_match_reference_loop():
  """Logprob of token t+1 from a forward over the unpadded prefix, one sequence at a time."""
  model = LM(TINY, rngs=nnx.Rngs(1))
  b = _seq_batch(1)
  lp, _ = nnx.jit(policy_logprobs, static_argnums=3)(model, b["tokens"], b["attn_mask"], 0.7)
  fwd = nnx.jit(lambda m, x: jax.nn.log_softmax(m(x)[0] / 0.7, -1))
  for i in range(b["tokens"].shape[0]):
    real = np.flatnonzero(b["attn_mask"][i])
    toks = b["tokens"][i, real]
    want = np.asarray(fwd(model, jnp.asarray(toks[None, :-1])))[np.arange(len(toks) - 1),
                                                                  toks[1:]]
    got = np.asarray(lp[i])[real[:-1]]
    assert_close(got, want, rtol=1e-5, atol=1e-5, name=f"row {i}")


# ----------------------------------------------------------------------------- learner

def _learner(**kw):
  cfg = GRPOConfig(steps=10, learning_rate=1e-2, **kw)
  return GRPOLearner(LM(TINY, rngs=nnx.Rngs(0)), cfg)


@pytest.fixture(scope="module")
def learners():
  """Two learners that differ only in micro-batching (compiled once for the module)."""
  return {mb: _learner(kl_beta=0.5, micro_batches=mb) for mb in (1, 4)}


def _with_ref(lr, b):
  b = dict(b, ref_logp=np.zeros_like(b["loss_mask"]))
  if lr._update is None:
    lr._compile(b)
  b["ref_logp"] = lr.token_logprobs(lr.ref_params, b["tokens"], b["attn_mask"])
  return b


def test_update_compiles_once_and_donates_state(learners):
  lr = learners[1]
  state = lr.init_state()
  old_params = state.params
  state, m = lr.update(state, _with_ref(lr, _seq_batch(n=8)))
  assert jax.tree.leaves(old_params)[0].is_deleted()     # donated
  state, m = lr.update(state, _with_ref(lr, _seq_batch(seed=5, n=8)))
  assert lr.n_traces == 1
  assert int(state.step) == 2
  assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
  # The reference weights survive donation.
  assert not jax.tree.leaves(lr.initial_params)[0].is_deleted()


def test_learner_first_update_reports_zero_kl(learners):
  lr = learners[1]
  b = _with_ref(lr, _seq_batch(n=8))
  state, m = lr.update(lr.init_state(), b)
  # ref logprobs come from another compiled program: equal up to fp32 rounding.
  assert abs(float(m["kl"])) < 1e-6
  state, m = lr.update(state, b)
  assert float(m["kl"]) > 1e-6  # the policy moved away from the reference
  assert lr.n_traces == 1


def test_micro_batches_give_the_same_update(learners):
  b = _with_ref(learners[1], _seq_batch(n=8))
  outs = []
  for mb in (1, 4):
    state, m = learners[mb].update(learners[mb].init_state(), b)
    outs.append((state.params, float(m["loss"]), float(m["grad_norm"])))
  assert outs[0][1] == pytest.approx(outs[1][1], rel=1e-5)
  assert outs[0][2] == pytest.approx(outs[1][2], rel=1e-5)
  assert_rel_close(outs[1][0], outs[0][0], rtol=1e-5, name="params")


def test_lora_mode_trains_adapters_only():
  """LoRA on a bf16 model: fp32 master adapters train, the bf16 base stays put."""
  model = LM(dataclasses.replace(TINY, param_dtype="bfloat16"), rngs=nnx.Rngs(0))
  apply_lora(model, LoRAConfig(rank=2, targets=("q_proj", "v_proj")), rngs=nnx.Rngs(1))
  lr = GRPOLearner(model, GRPOConfig(steps=3, learning_rate=1e-2, compute_dtype="bfloat16"),
                   trainable=LoRAParam)
  leaves = jax.tree_util.tree_flatten_with_path(lr.initial_params)[0]
  assert leaves and all("lora_" in str(p[-1]) for p, _ in leaves)
  assert all(v.dtype == jnp.float32 for _, v in leaves)
  assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(lr.frozen))
  frozen_before = jax.tree.map(np.asarray, lr.frozen)
  state = lr.init_state()
  for s in range(2):
    state, _ = lr.update(state, _seq_batch(seed=s))
  assert_close(lr.frozen, frozen_before, rtol=0, name="frozen base")
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state.params))
  b_after = [np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]
             if "lora_b" in str(p[-1])]
  assert any(np.abs(x).max() > 0 for x in b_after)  # B starts at 0 and moved


def test_iterations_use_old_logprobs_and_clip():
  """iterations=3 on one batch: ratio departs from 1 after the first update."""
  from train.rlcr.rollout import Rollout
  b = _seq_batch(n=4)
  P = 4
  ro = Rollout(b["tokens"][:, :P], b["attn_mask"][:, :P], b["tokens"][:, P:],
               b["attn_mask"][:, P:], np.zeros((4, 6), np.float32), np.zeros(4, bool), [], 2)
  lr = _learner(iterations=3, log_kl=False)
  state, m = lr.train_on_rollout(lr.init_state(), ro, np.array([1.0, 0.0, 0.0, 1.0]))
  assert int(state.step) == 3
  assert "kl" not in m
  assert m["clip_frac"] > 0  # lr 1e-2 moves the tiny policy by more than 20% on some token


@pytest.mark.parametrize("field,value", [("clip_eps", 0.0), ("iterations", 0), ("kl_beta", -1.0),
                                         ("schedule", "step"), ("temperature", 0.0)])
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ConfigError, match=field):
    GRPOConfig(**{field: value})
