"""Duality: projected-gradient training == training a low-rank adapter (papers.md §7.1).

Same fixed projector and same inner optimizer on both sides; after 100 steps the
effective weights agree to fp32 rounding (relative to ||W||; tolerance from
jaxlab.testing.tol with the step count as the accumulation length). Projector
refreshes == merge-and-reinit of the adapter, with the inner state kept or reset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlab._compat import enable_x64
from jaxlab.models.lowrank import OneSidedLoRA, TwoSidedLoRA
from jaxlab.optim import Factors, leaf_key, projected, svd_factors
from jaxlab.testing import assert_rel_close, tol

STEPS = 100
B = 16

INNERS = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
}


def _problem(m, n, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  w0 = (jax.random.normal(k[0], (m, n)) / np.sqrt(m)).astype(dtype)
  teacher = jax.random.normal(k[1], (m, n)).astype(dtype)

  def batch(t):
    x = jax.random.normal(jax.random.fold_in(k[2], t), (B, m)).astype(dtype)
    return x, jnp.sin(x @ teacher)

  return w0, batch


def _loss(y_pred, y):
  return jnp.mean((jnp.tanh(y_pred) - y) ** 2)


def _joint_run(tx, module, opt, batch, steps, *, merge_every=None, basis_fn=None,
               reset_on_merge=False):
  """Train {'w': W} with the gradient transformation `tx` and, side by side in the same
  compiled program, only the adapter's nnx.Params with `opt`; every `merge_every` steps the
  adapter is merged and re-initialised (and its optimizer reset if asked).
  Returns (W from tx, effective adapter weight, final adapter module)."""
  params = {"w": module.kernel()}
  tx_state = tx.init(params)
  graphdef, a, rest = nnx.split(module, nnx.Param, ...)
  opt_state = opt.init(a)

  def step(carry, t):
    p, s, a, os_, rest = carry
    x, y = batch(t)
    g = jax.grad(lambda p: _loss(x @ p["w"], y))(p)
    u, s = tx.update(g, s, p)
    ga = jax.grad(lambda a: _loss(nnx.merge(graphdef, a, rest)(x), y))(a)
    ua, os_ = opt.update(ga, os_, a)
    return (optax.apply_updates(p, u), s, optax.apply_updates(a, ua), os_, rest), None

  run = jax.jit(lambda c, ts: jax.lax.scan(step, c, ts)[0])
  block = merge_every or steps
  for start in range(0, steps, block):
    if start > 0:
      mod = nnx.merge(graphdef, a, rest)
      mod.merge_and_reinit(None if basis_fn is None else basis_fn(mod, start))
      _, a, rest = nnx.split(mod, nnx.Param, ...)
      if reset_on_merge:
        opt_state = opt.init(a)
    params, tx_state, a, opt_state, rest = run((params, tx_state, a, opt_state, rest),
                                               jnp.arange(start, start + block))
  mod = nnx.merge(graphdef, a, rest)
  return params["w"], mod.kernel(), mod


def _fixed_basis(kind, m, r, key):
  if kind == "gaussian":
    return jax.random.normal(key, (m, r)) / np.sqrt(m)
  if kind == "orthogonal":
    q, _ = jnp.linalg.qr(jax.random.normal(key, (m, r)))
    return q
  raise AssertionError(kind)


@pytest.mark.parametrize("inner,side,shape,basis_kind", [
    ("sgd", "left", (24, 40), "gaussian"),
    ("momentum", "left", (24, 40), "gaussian"),
    ("adam", "left", (24, 40), "gaussian"),
    ("adam", "right", (24, 40), "orthogonal"),
    ("momentum", "right", (40, 24), "orthogonal"),
])
def test_one_sided_duality_fixed_projector(inner, side, shape, basis_kind):
  m, n = shape
  r = 5
  w0, batch = _problem(m, n, jnp.float32)
  dim = m if side == "left" else n
  basis = _fixed_basis(basis_kind, dim, r, jax.random.key(7))
  w_gt, w_ad, _ = _joint_run(
      projected(INNERS[inner](), rank=r, projector={"w": basis}, side=side),
      OneSidedLoRA(w0, rank=r, side=side, basis=basis), INNERS[inner](), batch, STEPS)
  # The trajectory moved well beyond rounding noise.
  assert float(jnp.linalg.norm(w_gt - w0)) > 1e-2 * float(jnp.linalg.norm(w0))
  assert_rel_close(w_ad, w_gt, rtol=tol(jnp.float32, STEPS), name=f"{inner}/{side}")


def test_one_sided_duality_svd_projector():
  """A fixed P taken from the SVD of the first gradient (GaLore's projector, frozen)."""
  m, n, r = 24, 40, 6
  w0, batch = _problem(m, n, jnp.float32)
  x, y = batch(0)
  g0 = jax.grad(lambda w: _loss(x @ w, y))(w0)
  basis = svd_factors(g0, r, "left").left
  w_gt, w_ad, _ = _joint_run(projected(optax.adam(1e-2), rank=r, projector={"w": basis}),
                             OneSidedLoRA(w0, rank=r, basis=basis), optax.adam(1e-2), batch,
                             STEPS)
  assert_rel_close(w_ad, w_gt, rtol=tol(jnp.float32, STEPS), name="svd")


@pytest.mark.parametrize("inner,shape", [("sgd", (24, 40)), ("adam", (40, 24))])
def test_two_sided_duality_kronecker(inner, shape):
  """Gradient mapped to Pᵀ G Q  <=>  adapter W0 + P A Qᵀ."""
  m, n = shape
  r = 5
  w0, batch = _problem(m, n, jnp.float32, seed=1)
  kp, kq = jax.random.split(jax.random.key(3))
  p = jax.random.normal(kp, (m, r)) / np.sqrt(m)
  q = jax.random.normal(kq, (n, r)) / np.sqrt(n)
  w_gt, w_ad, _ = _joint_run(projected(INNERS[inner](), rank=r, projector={"w": (p, q)}),
                             TwoSidedLoRA(w0, rank=r, basis=(p, q)), INNERS[inner](), batch,
                             STEPS)
  assert float(jnp.linalg.norm(w_gt - w0)) > 1e-3 * float(jnp.linalg.norm(w0))
  assert_rel_close(w_ad, w_gt, rtol=tol(jnp.float32, STEPS), name=f"kron/{inner}")


def test_duality_float64():
  """In float64 the two trajectories agree to ~1e-15 (papers.md: <= 1.2e-15 max abs)."""
  with enable_x64(True):
    m, n, r = 24, 40, 5
    w0, batch = _problem(m, n, jnp.float64)
    basis = jax.random.normal(jax.random.key(7), (m, r), jnp.float64) / np.sqrt(m)
    w_gt, w_ad, _ = _joint_run(projected(INNERS["momentum"](), rank=r, projector={"w": basis}),
                               OneSidedLoRA(w0, rank=r, basis=basis), INNERS["momentum"](),
                               batch, STEPS)
    assert w_gt.dtype == jnp.float64 and w_ad.dtype == jnp.float64
    assert_rel_close(w_ad, w_gt, rtol=tol(jnp.float64, STEPS), name="f64")


# ------------------------------------------------------------------------------- refreshes


@pytest.mark.parametrize("kind,refresh_state,inner", [
    ("random", "keep", "adam"),
    ("random", "reset", "adam"),
    ("orthogonal", "keep", "momentum"),
])
def test_refresh_equals_merge_and_reinit(kind, refresh_state, inner):
  """Random projector refreshed every 25 steps == adapter merged and re-drawn every 25 steps
  (same keys), with the inner state kept (GaLore) or reset (fresh optimizer)."""
  m, n, r, every, seed = 24, 40, 5, 25, 3
  w0, batch = _problem(m, n, jnp.float32, seed=2)
  tx = projected(INNERS[inner](), rank=r, projector=kind, update_every=every, seed=seed,
                 refresh_state=refresh_state)
  mod = OneSidedLoRA(w0, rank=r, key=leaf_key(seed, "w"), kind=kind)
  p0 = mod.P[...]
  w_gt, w_ad, mod = _joint_run(tx, mod, INNERS[inner](), batch, STEPS, merge_every=every,
                               reset_on_merge=refresh_state == "reset")
  assert int(mod.refresh[...]) == STEPS // every - 1
  assert not np.allclose(mod.P[...], p0)  # the basis really was re-drawn
  assert_rel_close(w_ad, w_gt, rtol=tol(jnp.float32, STEPS), name=f"{kind}/{refresh_state}")


def test_refresh_equals_merge_two_sided():
  m, n, r, every, seed = 24, 40, 4, 25, 5
  w0, batch = _problem(m, n, jnp.float32, seed=4)
  tx = projected(optax.adam(1e-2), rank=r, projector="random", side="both",
                 update_every=every, seed=seed)
  w_gt, w_ad, _ = _joint_run(tx, TwoSidedLoRA(w0, rank=r, key=leaf_key(seed, "w")),
                             optax.adam(1e-2), batch, STEPS, merge_every=every)
  assert_rel_close(w_ad, w_gt, rtol=tol(jnp.float32, STEPS), name="kron refresh")


@pytest.mark.parametrize("refresh_state", ["keep", "reset"])
def test_svd_refresh_equals_merge_with_gradient_basis(refresh_state):
  """GaLore (SVD of the current gradient every 25 steps) == adapter merged every 25 steps
  into a basis taken from the SVD of the full gradient at the merged weights."""
  m, n, r, every = 24, 40, 5, 25
  w0, batch = _problem(m, n, jnp.float32, seed=5)
  tx = projected(optax.adam(1e-2), rank=r, projector="svd", update_every=every,
                 refresh_state=refresh_state)

  def grad_basis(w, t):
    x, y = batch(t)
    return svd_factors(jax.grad(lambda w: _loss(x @ w, y))(w), r, "left")

  def basis_after_merge(mod, t):  # mod.kernel() is the W that the merge writes into W0
    return Factors(grad_basis(mod.kernel(), t).left, None)

  w_gt, w_ad, _ = _joint_run(tx, OneSidedLoRA(w0, rank=r, basis=grad_basis(w0, 0).left),
                             optax.adam(1e-2), batch, STEPS, merge_every=every,
                             basis_fn=basis_after_merge, reset_on_merge=refresh_state == "reset")
  assert_rel_close(w_ad, w_gt, rtol=tol(jnp.float32, STEPS), name=f"svd/{refresh_state}")


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_scale_conventions(inner):
  """Adapter scale s (W = W0 + s P A) vs projected scale: with SGD the adapter's s enters
  squared (ΔW = -η s² P Pᵀ G); with Adam it is the same s once Adam's eps is scaled by s
  too (Adam(s g) with eps s ε == Adam(g) with ε), i.e. equal up to ε in practice."""
  m, n, r, s = 24, 40, 5, 0.5
  w0, batch = _problem(m, n, jnp.float32, seed=6)
  basis = _fixed_basis("gaussian", m, r, jax.random.key(8))
  if inner == "sgd":
    tx, opt = projected(optax.sgd(0.1), rank=r, projector={"w": basis}, scale=s * s), optax.sgd(0.1)
  else:
    tx = projected(optax.adam(1e-2, eps=1e-8), rank=r, projector={"w": basis}, scale=s)
    opt = optax.adam(1e-2, eps=s * 1e-8)
  w_gt, w_ad, _ = _joint_run(tx, OneSidedLoRA(w0, rank=r, basis=basis, scale=s), opt, batch,
                             STEPS)
  assert float(jnp.linalg.norm(w_gt - w0)) > 1e-3 * float(jnp.linalg.norm(w0))
  assert_rel_close(w_ad, w_gt, rtol=tol(jnp.float32, STEPS), name=f"scale/{inner}")
