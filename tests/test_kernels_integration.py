"""The PaTH and log-linear decode kernels against the library ops in jaxlab/ops
(written independently): a PaTH decode step composed from path_key_update +
cache append + decode_attention equals jaxlab.ops.path.path_decode_step, and the
log-linear level-state recurrence equals jaxlab.ops.log_linear's materialized
("naive") form, outputs and final states. Skipped if those ops are absent."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.ops import log_linear as ll
from jaxlab.ops import path
from jaxlab.testing import assert_rel_close, tol
from kernels.decode_attention import decode_attention
from kernels.log_linear_state import log_linear_state_update
from kernels.path_key_update import path_key_update
from kernels.rope_append.reference import write_slot

F32 = jnp.float32


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def test_path_decode_step_matches_jaxlab_ops():
  T, S, HQ, H, K = 37, 64, 4, 2, 64
  ks = jax.random.split(jax.random.key(0), 10)
  q, k, v = (jax.random.normal(ks[i], (1, T, n, K)) for i, n in ((0, HQ), (1, H), (2, H)))
  w = _unit(jax.random.normal(ks[3], (1, T, H, K)))
  beta = jax.random.uniform(ks[4], (1, T, H), minval=0.5, maxval=1.9)
  _, cache = jax.jit(functools.partial(path.path_prefill, max_len=S, impl="naive"))(
      q, k, v, w, beta)
  q_t, k_t, v_t = (jax.random.normal(ks[5 + i], (1, n, K)) for i, n in enumerate((HQ, H, H)))
  w_t = _unit(jax.random.normal(ks[8], (1, H, K)))
  beta_t = jnp.array([[1.2, 1.8]])
  o_ref, new = jax.jit(path.path_decode_step)(cache, q_t, k_t, v_t, w_t, beta_t)
  new_k = np.transpose(np.asarray(new.k[0]), (1, 0, 2))[:, :T + 1]

  @functools.partial(jax.jit, static_argnames="impl")
  def ours(kc, vc, impl):
    kc = path_key_update(kc, w_t[0], beta_t[0], jnp.int32(T), impl=impl)
    kc, vc = write_slot(kc, k_t[0], T), write_slot(vc, v_t[0], T)
    return decode_attention(q_t[0], kc, vc, jnp.int32(T + 1), scale=K ** -0.5, impl=impl), kc

  for impl in ("xla", "pallas"):
    o, kc = ours(jnp.transpose(cache.k[0], (1, 0, 2)), jnp.transpose(cache.v[0], (1, 0, 2)),
                 impl)
    assert_rel_close(np.asarray(o), np.asarray(o_ref[0]), rtol=tol(F32, T * K), name=impl)
    assert_rel_close(np.asarray(kc)[:, :T + 1], new_k, rtol=tol(F32, K), name=f"keys {impl}")


# PaTH-FoX: ~15 s, slow (CI runs it; the PaTH step and FoX stay in the default run)
@pytest.mark.parametrize("use_path", [pytest.param(True, marks=pytest.mark.slow), False])
def test_gated_decode_step_matches_jaxlab_ops(use_path):
  """PaTH-FoX (use_path) and FoX: the decoder's gate row (older slots += g_t, new slot 0),
  updated by path_decode_attention / decode_attention (gate_HS, g_H) or by hand and passed
  as their score bias, = path_decode_step with g_t (outputs, keys, the gate row)."""
  from kernels.path_decode_attention import path_decode_attention
  T, S, HQ, H, K = 29, 64, 4, 2, 64
  ks = jax.random.split(jax.random.key(3), 12)
  q, k, v = (jax.random.normal(ks[i], (1, T, n, K)) for i, n in ((0, HQ), (1, H), (2, H)))
  w = _unit(jax.random.normal(ks[3], (1, T, H, K))) if use_path else None
  beta = jax.random.uniform(ks[4], (1, T, H), minval=0.5, maxval=1.9) if use_path else None
  g = jax.nn.log_sigmoid(jax.random.normal(ks[9], (1, T, HQ)) + 1.0)
  scale = K ** -0.5
  # FoX (no transitions) goes through the ops' private entry points, as the FoX mixer does.
  prefill = functools.partial(path._prefill, scale=scale, max_len=S, impl="naive", kv_mask=None,
                              cache_dtype=None, block_size=path.DEFAULT_BLOCK)
  _, cache = jax.jit(prefill)(q, k, v, w, beta, g)
  q_t, k_t, v_t = (jax.random.normal(ks[5 + i], (1, n, K)) for i, n in enumerate((HQ, H, H)))
  w_t = _unit(jax.random.normal(ks[8], (1, H, K))) if use_path else None
  beta_t = jnp.array([[1.2, 1.8]]) if use_path else None
  g_t = jax.nn.log_sigmoid(jax.random.normal(ks[10], (1, HQ)))
  o_ref, new = jax.jit(functools.partial(path._decode_step, scale=scale, mask_t=None))(
      cache, q_t, k_t, v_t, w_t, beta_t, g_t)

  @functools.partial(jax.jit, static_argnames=("impl", "fold"))
  def ours(kc, vc, gate, impl, fold):
    """fold: the op updates the gate (the driver's form); else by hand, as a bias."""
    kc, vc = write_slot(kc, k_t[0], T), write_slot(vc, v_t[0], T)
    if fold:
      kw = dict(gate_HS=gate, g_H=g_t[0])
    else:
      gate = jax.lax.dynamic_update_slice(gate + g_t[0][:, None], jnp.zeros((HQ, 1)), (0, T))
      kw = dict(bias_HS=scale * gate)
    if use_path:
      out = path_decode_attention(q_t[0], kc, vc, w_t[0], beta_t[0], jnp.int32(T + 1),
                                  scale=scale, impl=impl, **kw)
    else:
      out = decode_attention(q_t[0], kc, vc, jnp.int32(T + 1), scale=scale, impl=impl, **kw)
      out = (out[0], kc, out[1]) if fold else (out, kc)
    return out if fold else (*out, gate)

  for impl in ("xla", "pallas"):
    for fold in (False, True):
      o, kc, gate = ours(jnp.transpose(cache.k[0], (1, 0, 2)),
                         jnp.transpose(cache.v[0], (1, 0, 2)), cache.gate[0].T, impl, fold)
      name = f"{impl} fold={fold}"
      assert_rel_close(np.asarray(o), np.asarray(o_ref[0]), rtol=tol(F32, T * K), name=name)
      new_k = np.transpose(np.asarray(new.k[0]), (1, 0, 2))[:, :T + 1]
      assert_rel_close(np.asarray(kc)[:, :T + 1], new_k, rtol=tol(F32, K), name=f"keys {name}")
      np.testing.assert_array_equal(np.asarray(gate)[:, :T + 1],
                                    np.asarray(new.gate[0]).T[:, :T + 1])


@pytest.mark.parametrize("variant", ["mamba2", "gdn"])
def test_log_linear_recurrence_matches_jaxlab_ops(variant):
  T, H, L, dk, dv = 13, 2, 5, 64, 32
  ks = jax.random.split(jax.random.key(1), 6)
  q = jax.random.normal(ks[0], (T, H, dk))
  k = _unit(jax.random.normal(ks[1], (T, H, dk)))
  v = jax.random.normal(ks[2], (T, H, dv))
  lam = jax.nn.softplus(jax.random.normal(ks[3], (T, H, L)))
  g = -jax.nn.softplus(jax.random.normal(ks[4], (T, H)))
  beta = jax.nn.sigmoid(jax.random.normal(ks[5], (T, H)))
  gdn = variant == "gdn"
  step = jax.jit(functools.partial(log_linear_state_update, variant=variant, impl="xla"))
  S, outs = jnp.zeros((H, L, dk, dv)), []
  for t in range(T):
    o, S = step(S, jnp.int32(t), q[t], k[t], v[t], lam[t], g[t], beta[t] if gdn else None)
    outs.append(o)
  if gdn:
    ref, st = jax.jit(functools.partial(ll.log_linear_gated_delta, impl="naive",
                                        return_state=True))(
        q[None], k[None], v[None], g[None], beta[None], lam[None])
  else:
    ref, st = jax.jit(functools.partial(ll.log_linear_attention, impl="naive",
                                        return_state=True))(
        q[None], k[None], v[None], g[None], lam[None])
  assert_rel_close(np.stack(outs), np.asarray(ref[0]), rtol=tol(F32, T * dk), name="o")
  assert_rel_close(np.asarray(S), np.asarray(st.levels[0]), rtol=tol(F32, T), name="levels")


@pytest.mark.parametrize("variant", ["mamba2", "gdn"])
def test_plain_recurrence_matches_jaxlab_ops(variant):
  """fenwick=False (one state, insert added): the plain Mamba-2 / Gated DeltaNet
  recurrence = jaxlab.ops.log_linear.linear_attention / gated_delta_rule (naive form),
  for both impls, outputs and final state, with a score scale as the level weight."""
  T, H, dk, dv, scale = 21, 2, 64, 32, 0.125
  ks = jax.random.split(jax.random.key(4), 5)
  q = jax.random.normal(ks[0], (T, H, dk))
  k = _unit(jax.random.normal(ks[1], (T, H, dk)))
  v = jax.random.normal(ks[2], (T, H, dv))
  g = -jax.nn.softplus(jax.random.normal(ks[3], (T, H)))
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (T, H)))
  gdn = variant == "gdn"
  lam = jnp.full((H, 1), scale)
  if gdn:
    ref, st = jax.jit(functools.partial(ll.gated_delta_rule, scale=scale, impl="naive",
                                        return_state=True))(
        q[None], k[None], v[None], g[None], beta[None])
  else:
    ref, st = jax.jit(functools.partial(ll.linear_attention, scale=scale, impl="naive",
                                        return_state=True))(q[None], k[None], v[None], g[None])
  for impl in ("xla", "pallas"):
    step = jax.jit(functools.partial(log_linear_state_update, variant=variant, impl=impl,
                                     fenwick=False))
    S, outs = jnp.zeros((H, 1, dk, dv)), []
    for t in range(T):
      o, S = step(S, jnp.int32(t), q[t], k[t], v[t], lam, g[t], beta[t] if gdn else None)
      outs.append(o)
    # fp32; the longest sums: T tokens x dk in the output, T tokens in the state
    assert_rel_close(np.stack(outs), np.asarray(ref[0]), rtol=tol(F32, T * dk), name=impl)
    assert_rel_close(np.asarray(S), np.asarray(st.levels[0]), rtol=tol(F32, T), name="state")


@pytest.mark.parametrize("mixer", ["log_linear_mamba2",
                                   pytest.param("log_linear_gated_deltanet",
                                                marks=pytest.mark.slow),
                                   "mamba2",
                                   # ~10 s: slow (CI runs it)
                                   pytest.param("gated_deltanet", marks=pytest.mark.slow)])
@pytest.mark.parametrize("impl", [pytest.param("xla", marks=pytest.mark.slow), "pallas"])
def test_mixer_extend_with_level_kernel_matches_recurrent(mixer, impl):
  """A Mamba-2 / GDN mixer's one-token extend through kernels/log_linear_state (log-linear:
  the Fenwick levels; plain: its one state, fenwick=False) equals its own recurrent step:
  outputs, states and counts, for a batch with a padded row."""
  from flax import nnx
  from jaxlab.models import ModelConfig
  from jaxlab.models.mixers.base import get_mixer_factory
  from jaxlab.models.mixers.mamba2 import LevelKernel
  cfg = ModelConfig(d_model=64, n_heads=2, head_dim=64, max_seq_len=64, init_std=0.3,
                    mixer_options={"state_size": 64, "expand": 2, "n_groups": 1})
  m = get_mixer_factory(mixer)(cfg, 0, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 6, 64))
  cache = m.init_cache(2, 64)
  # jitted (one compile, not one per eager op); the error case below runs eagerly
  ext = nnx.jit(lambda m, x, c, mask_BT=None, level_kernel=None: m.extend(
      x, c, mask_BT=mask_BT, level_kernel=level_kernel), static_argnames="level_kernel")
  _, cache = ext(m, x[:, :5], cache)                          # 5 tokens of context
  mask = jnp.array([[True], [False]])                        # row 1: a padded step
  ref, ref_cache = ext(m, x[:, 5:], cache, mask_BT=mask)
  out, new = ext(m, x[:, 5:], cache, mask_BT=mask, level_kernel=LevelKernel(impl))
  # y: the level read sums L levels x dk (64), then the out-projection sums d_inner (128);
  # levels: the GDN transition reduces k^T S over dk (64); Mamba-2's is elementwise.
  nl = m.opts.num_levels if m.opts.log_linear else 1
  assert_rel_close(np.asarray(out), np.asarray(ref), rtol=tol(F32, nl * 64 + 128), name="y")
  assert_rel_close(np.asarray(new["state"].levels), np.asarray(ref_cache["state"].levels),
                   rtol=tol(F32, 64), name="levels")
  np.testing.assert_array_equal(np.asarray(new["state"].count), [6, 5])
  np.testing.assert_array_equal(np.asarray(new["conv"]), np.asarray(ref_cache["conv"]))
  with pytest.raises(ValueError, match="T = 1"):
    m.extend(x[:, :2], cache, level_kernel=LevelKernel(impl))
