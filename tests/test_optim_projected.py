"""jaxlab.optim.projected / galore: optax conventions, memory, references, bad input."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlab.optim import (
    Factors,
    ProjectedState,
    galore,
    leaf_key,
    project,
    project_back,
    projected,
    random_factors,
    state_bytes,
    svd_factors,
)
from jaxlab.testing import assert_rel_close, tol


def _params(dtype=jnp.float32, m=12, n=20, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {
      "w1": (jax.random.normal(k[0], (m, n)) / np.sqrt(m)).astype(dtype),
      "w2": (jax.random.normal(k[1], (n, m)) / np.sqrt(n)).astype(dtype),
      "b": jnp.zeros((m,), dtype),
  }


def _loss(p, x):
  h = jnp.tanh(x @ p["w1"])
  return jnp.mean((h @ p["w2"] + p["b"] - jnp.cos(x)) ** 2)


def _grads(params, t):
  x = jax.random.normal(jax.random.fold_in(jax.random.key(99), t), (8, params["w1"].shape[0]),
                        params["w1"].dtype)
  return jax.grad(_loss)(params, x)


def _train(tx, params, steps):
  """`steps` updates in one compiled scan; returns (params, state)."""

  def step(carry, t):
    params, state = carry
    u, state = tx.update(_grads(params, t), state, params)
    return (optax.apply_updates(params, u), state), None

  return jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(steps))[0])((params, tx.init(params)))


# ----------------------------------------------------------------------------- conventions


def test_factory_returns_gradient_transformation_with_namedtuple_state():
  tx = projected(optax.scale_by_adam(), rank=3)
  assert isinstance(tx, optax.GradientTransformation)
  state = tx.init(_params())
  assert isinstance(state, ProjectedState) and state._fields == (
      "count", "inner_state", "projectors")
  assert state.count.dtype == jnp.int32 and state.count.shape == ()
  # Projected leaves carry low-rank moments; the vector goes to Adam unchanged.
  mu = state.inner_state.mu
  assert mu["w1"].shape == (3, 20) and mu["w2"].shape == (20, 3) and mu["b"].shape == (12,)
  assert state.projectors["w1"].left.shape == (12, 3) and state.projectors["w1"].right is None
  assert state.projectors["w2"].right.shape == (12, 3) and state.projectors["w2"].left is None
  assert state.projectors["b"] is None


@pytest.mark.parametrize("shape,side", [((20, 12), "left"), ((12, 20), "right")])
def test_matches_optax_contrib_galore(shape, side):
  """With the side chosen to match (optax projects the *longer* side: left when m >= n),
  our GaLore equals optax.contrib.galore: same SVD refresh schedule, moments kept,
  scale on the projected update, decoupled weight decay, learning rate."""
  m, n = shape
  k = jax.random.split(jax.random.key(1), 2)
  params = {"w": jax.random.normal(k[0], (m, n)) / np.sqrt(m), "b": jnp.ones((n,))}

  def grads(p, t):
    x = jax.random.normal(jax.random.fold_in(k[1], t), (6, m))
    return jax.grad(lambda p: jnp.mean(jnp.sin(x @ p["w"] + p["b"]) ** 2))(p)

  ours = galore(0.05, rank=4, update_every=3, scale=0.5, weight_decay=0.1, side=side)
  ref = optax.contrib.galore(0.05, rank=4, update_proj_gap=3, scale=0.5, weight_decay=0.1)

  def step(carry, t):
    p_a, s_a, p_b, s_b = carry
    u, s_a = ours.update(grads(p_a, t), s_a, p_a)
    v, s_b = ref.update(grads(p_b, t), s_b, p_b)
    return (optax.apply_updates(p_a, u), s_a, optax.apply_updates(p_b, v), s_b), None

  carry = (params, ours.init(params), params, ref.init(params))
  p_a, _, p_b, _ = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(10))[0])(carry)
  assert_rel_close(p_a, p_b, rtol=tol(jnp.float32, 10 * max(m, n)), name="vs optax.contrib")
  assert float(jnp.linalg.norm(p_a["w"] - params["w"])) > 1e-3


def test_inner_sees_unprojected_leaves_as_they_are():
  """A filter selecting nothing gives exactly the inner optimizer."""
  params = _params()
  g = _grads(params, 0)
  tx = projected(optax.adam(1e-2), rank=3, filter=lambda name, x: False)
  a, _ = jax.jit(tx.update)(g, tx.init(params))
  b, _ = jax.jit(optax.adam(1e-2).update)(g, optax.adam(1e-2).init(params))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_full_rank_orthogonal_projector_is_the_identity():
  """rank = the projected side and an orthogonal P: P Pᵀ = I, so SGD is unchanged."""
  params = {"w": _params()["w1"]}
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(4), (12, 12)))
  g = {"w": jax.random.normal(jax.random.key(5), (12, 20))}
  u, _ = projected(optax.sgd(1.0), rank=12, projector={"w": q}).update(
      g, projected(optax.sgd(1.0), rank=12, projector={"w": q}).init(params))
  assert_rel_close(u["w"], -g["w"], rtol=tol(jnp.float32, 12), name="full rank")


def test_projection_reference_forms():
  """project / project_back equal the materialised matrix products (Pᵀ G Q, P U Qᵀ)."""
  k = jax.random.split(jax.random.key(2), 4)
  g = jax.random.normal(k[0], (7, 9))
  pm = jax.random.normal(k[1], (7, 3))
  qm = jax.random.normal(k[2], (9, 3))
  g64 = np.asarray(g, np.float64)
  p64, q64 = np.asarray(pm, np.float64), np.asarray(qm, np.float64)
  t = tol(jnp.float32, 9)
  assert_rel_close(project(g, Factors(pm, None)), p64.T @ g64, rtol=t)
  assert_rel_close(project(g, Factors(None, qm)), g64 @ q64, rtol=t)
  assert_rel_close(project(g, Factors(pm, qm)), p64.T @ g64 @ q64, rtol=t)
  u = jax.random.normal(k[3], (3, 3))
  u64 = np.asarray(u, np.float64)
  assert_rel_close(project_back(u, Factors(pm, qm)), p64 @ u64 @ q64.T, rtol=t)


def test_svd_projector_refreshes_on_schedule_and_keeps_moments():
  params = _params()
  tx = projected(optax.scale_by_adam(), rank=3, update_every=3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  seen = []
  for t in range(7):
    g = _grads(params, t)
    _, state = update(g, state, params)
    seen.append(np.asarray(state.projectors["w1"].left))
    if t % 3 == 0:  # refreshed from this very gradient
      want = svd_factors(g["w1"], 3, "left").left
      np.testing.assert_array_equal(seen[-1], want)
    else:
      np.testing.assert_array_equal(seen[-1], seen[-2])
  assert not np.allclose(seen[0], seen[3])
  assert int(state.inner_state.count) == 7  # "keep": Adam's count never restarted


def test_reset_restarts_inner_state_at_refresh():
  params = _params()
  tx = projected(optax.scale_by_adam(), rank=3, update_every=3, refresh_state="reset")
  _, state = _train(tx, params, 7)
  assert int(state.count) == 7
  assert int(state.inner_state.count) == 1  # reset at step 6, then one update


def test_random_projector_is_regenerated_not_stored():
  params = _params()
  tx = projected(optax.scale_by_adam(), rank=3, projector="random", update_every=4, seed=11)
  state = tx.init(params)
  assert state.projectors == {"b": None, "w1": None, "w2": None}
  # The update uses exactly random_factors(leaf_key(seed, name), count // update_every).
  g = _grads(params, 0)
  u, _ = projected(optax.sgd(1.0), rank=3, projector="random", update_every=4, seed=11).update(
      g, projected(optax.sgd(1.0), rank=3, projector="random", seed=11).init(params))
  f = random_factors(leaf_key(11, "w1"), 0, (12, 20), 3, "left")
  assert_rel_close(u["w1"], -project_back(project(g["w1"], f), f), rtol=tol(jnp.float32, 20))
  f2 = random_factors(leaf_key(12, "w1"), 0, (12, 20), 3, "left")
  assert not np.allclose(f.left, f2.left)


def test_scale_multiplies_projected_updates_only():
  params = _params()
  g = _grads(params, 0)
  tx1 = projected(optax.sgd(1.0), rank=3, projector="random")
  tx2 = projected(optax.sgd(1.0), rank=3, projector="random", scale=0.25)
  u1, _ = tx1.update(g, tx1.init(params))
  u2, _ = tx2.update(g, tx2.init(params))
  assert_rel_close(u2["w1"], 0.25 * u1["w1"], rtol=tol(jnp.float32))
  np.testing.assert_array_equal(u2["b"], u1["b"])


# ------------------------------------------------------------------- jit, sharding, dtypes


class _CompileLog(logging.Handler):

  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def _assert_same_types(a, b):
  """Same structure, shapes, dtypes and (equivalent) shardings."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert (x.shape, x.dtype) == (y.shape, y.dtype)
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (x.sharding, y.sharding)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("projector", ["svd", "random"])
def test_jitted_sharded_train_step(dtype, projector):
  """A train step jitted once over a 1-device mesh with NamedShardings in and out: it
  compiles once for three calls (so update keeps every aval: shape, dtype, weak type), and
  an unpinned jit of the same step returns state and params with the same types and
  (equivalent) shardings as it was given; bf16 params keep bf16 moments."""
  mesh = jax.make_mesh((1,), ("data",))
  rep = NamedSharding(mesh, P())
  params = jax.device_put(_params(dtype), rep)
  tx = optax.chain(projected(optax.scale_by_adam(), rank=3, projector=projector,
                             update_every=2), optax.scale_by_learning_rate(1e-2))
  state = jax.device_put(tx.init(params), rep)
  xs = [jax.device_put(jax.random.normal(jax.random.key(t), (8, 12), dtype),
                       NamedSharding(mesh, P("data"))) for t in range(3)]

  def train_step(params, state, x):
    g = jax.grad(_loss)(params, x)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  shardings = lambda t: jax.tree.map(lambda a: a.sharding, t)
  pinned = jax.jit(train_step, in_shardings=(shardings(params), shardings(state), xs[0].sharding),
                   out_shardings=(shardings(params), shardings(state)))
  handler = _CompileLog()
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles():
      p, s = params, state
      for x in xs:
        p, s = pinned(p, s, x)
  finally:
    logger.removeHandler(handler)
  compiles = [m for m in handler.messages if m.startswith("Compiling") and "train_step" in m]
  assert len(compiles) == 1, compiles
  _assert_same_types(s, state)
  assert int(s[0].count) == 3
  assert s[0].inner_state.mu["w1"].dtype == dtype
  assert all(bool(jnp.all(jnp.isfinite(a.astype(jnp.float32)))) for a in jax.tree.leaves(p))

  free = jax.jit(train_step)
  p, s = free(params, state, xs[0])
  _assert_same_types(s, state)
  _assert_same_types(p, params)
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(state)):
    assert a.aval.weak_type == b.aval.weak_type


def test_init_on_shape_dtype_structs():
  params = _params(jnp.bfloat16)
  mesh = jax.make_mesh((1,), ("data",))
  rep = NamedSharding(mesh, P())
  sds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), params)
  for tx in (galore(1e-3, rank=4),
             projected(optax.adam(1e-3), rank=4, projector="random", side="both")):
    concrete = tx.init(params)
    from_sds = tx.init(sds)
    abstract = jax.eval_shape(tx.init, sds)
    shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
    assert shapes(from_sds) == shapes(concrete) == shapes(abstract)
    assert jax.tree.structure(from_sds) == jax.tree.structure(concrete)
    for a in jax.tree.leaves(from_sds):
      assert a.sharding.is_equivalent_to(rep, a.ndim)


# ----------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("m,n", [(48, 80), (80, 48)])
def test_state_bytes_match_the_formulas(m, n):
  """Adam on an m x n fp32 matrix: 2 m n floats. Projected (short side s = min, long
  side l = max): 2 r l moments + s r projector for "svd", no projector for "random";
  Kronecker ("both"): 2 r² + (m + n) r. Plus an int32 count per counter."""
  r, f, i = 8, 4, 4
  params = {"w": jnp.zeros((m, n), jnp.float32)}
  s, lng = min(m, n), max(m, n)
  adam = state_bytes(optax.scale_by_adam().init(params))
  assert adam == f * 2 * m * n + i
  svd = state_bytes(projected(optax.scale_by_adam(), rank=r).init(params))
  assert svd == f * (2 * r * lng + s * r) + 2 * i
  rnd = state_bytes(projected(optax.scale_by_adam(), rank=r, projector="random").init(params))
  assert rnd == f * 2 * r * lng + 2 * i
  both = state_bytes(projected(optax.scale_by_adam(), rank=r, side="both").init(params))
  assert both == f * (2 * r * r + (m + n) * r) + 2 * i
  both_rnd = state_bytes(projected(optax.scale_by_adam(), rank=r, side="both",
                                   projector="random").init(params))
  assert both_rnd == f * 2 * r * r + 2 * i
  fixed = state_bytes(projected(optax.scale_by_adam(), rank=r,
                                projector={"w": jnp.zeros((m, r))}, side="left").init(params))
  assert fixed == f * 2 * r * n + 2 * i  # a fixed matrix is a hyperparameter, not state
  # The ratio the issue asks for (m <= n): (2 r n + m r) / (2 m n).
  assert svd < adam and rnd < svd


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(rank=-3), "rank must be a positive integer"),
    (dict(rank=2.0), "rank must be a positive integer"),
    (dict(rank=True), "rank must be a positive integer"),
    (dict(rank=2, update_every=0), "update_every must be a positive integer"),
    (dict(rank=2, update_every=-5), "update_every must be a positive integer"),
    (dict(rank=2, projector="qr"), "unknown projector 'qr'"),
    (dict(rank=2, side="top"), "unknown side 'top'"),
    (dict(rank=2, refresh_state="rotate"), "unknown refresh_state 'rotate'"),
    (dict(rank=2, scale=float("nan")), "scale must be a finite number"),
    (dict(rank=2, projector={"w": None}, filter=lambda n, x: True), "filter must be None"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    projected(optax.sgd(1.0), **kwargs)


def test_bad_inner():
  with pytest.raises(ValueError, match="inner must be an optax GradientTransformation"):
    projected(lambda g: g, rank=2)
  tx = projected(optax.adamw(1e-3), rank=2)
  params = {"w": jnp.ones((4, 6))}
  with pytest.raises(ValueError, match="inner needs params"):
    tx.update(params, tx.init(params), params)


@pytest.mark.parametrize("kwargs,shape,match", [
    (dict(rank=13), (12, 20), r"rank=13 exceeds the rows \(m\) = 12 of parameter 'w'"),
    (dict(rank=13, side="right"), (20, 12), r"rank=13 exceeds the columns \(n\) = 12"),
    (dict(rank=21, side="right"), (12, 20), r"rank=21 exceeds the columns \(n\) = 20"),
    (dict(rank=13, side="both"), (12, 20), r"rank=13 exceeds the rows \(m\) = 12"),
    (dict(rank=2, filter=lambda n, x: True), (2, 3, 4), "only 2-D matrices can be projected"),
])
def test_rank_larger_than_matrix(kwargs, shape, match):
  tx = projected(optax.sgd(1.0), **kwargs)
  params = {"w": jnp.zeros(shape)}
  with pytest.raises(ValueError, match=match):
    tx.init(params)
  with pytest.raises(ValueError, match=match):
    tx.update(params, None)


def test_bad_fixed_projector_shapes():
  params = {"w": jnp.zeros((12, 20)), "b": jnp.zeros(3)}
  with pytest.raises(ValueError, match=r"projector P for 'w' .* must have shape \(12, 4\)"):
    projected(optax.sgd(1.0), rank=4, projector={"w": jnp.zeros((12, 5)), "b": None}).init(params)
  with pytest.raises(ValueError, match="side='both' needs a pair"):
    projected(optax.sgd(1.0), rank=4, side="both",
              projector={"w": jnp.zeros((12, 4)), "b": None}).init(params)
  with pytest.raises(ValueError, match="does not match the params"):
    projected(optax.sgd(1.0), rank=4, projector={"x": jnp.zeros((12, 4))}).init(params)
