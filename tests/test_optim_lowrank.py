"""jaxlab.models.lowrank: adapter forms vs the materialised reference, merges, model surgery,
and the duality on a whole LM (projected optimizer == adapters merged on the same schedule)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlab.models import LM, ModelConfig
from jaxlab.models.lowrank import (
    Basis,
    Frozen,
    OneSidedLoRA,
    TwoSidedLoRA,
    adapters,
    apply_adapters,
    merge_and_reinit,
)
from jaxlab.optim import projected, random_factors
from jaxlab.testing import assert_rel_close, tol


def _adapter(cls, shape, rank, side, dtype, bias=True):
  k = jax.random.split(jax.random.key(0), 4)
  w0 = jax.random.normal(k[0], shape, jnp.float32).astype(dtype)
  b = jax.random.normal(k[1], (shape[1],), jnp.float32).astype(dtype) if bias else None
  kw = dict(rank=rank, key=jax.random.key(5), bias=b, scale=0.7)
  mod = OneSidedLoRA(w0, side=side, **kw) if cls is OneSidedLoRA else TwoSidedLoRA(w0, **kw)
  mod.A[...] = jax.random.normal(k[2], mod.A[...].shape, jnp.float32).astype(dtype)
  return mod


@pytest.mark.parametrize("cls,shape,side,dtype", [
    (OneSidedLoRA, (13, 7), "left", jnp.float32),
    (OneSidedLoRA, (9, 17), "right", jnp.bfloat16),
    (TwoSidedLoRA, (11, 6), "both", jnp.float32),
])
def test_factored_forward_and_grads_match_reference(cls, shape, side, dtype):
  """x W0 + s((x P) A)Qᵀ never forms ΔW; it equals x (W0 + s P A Qᵀ) and so do the
  gradients w.r.t. x and the trained A (jax.vjp), on odd shapes, fp32 and bf16."""
  mod = _adapter(cls, shape, 3, side, dtype)
  x = jax.random.normal(jax.random.key(1), (2, 5, shape[0]), jnp.float32).astype(dtype)
  dy = jax.random.normal(jax.random.key(2), (2, 5, shape[1]), jnp.float32).astype(dtype)
  graphdef, a, rest = nnx.split(mod, nnx.Param, ...)
  ref_mod = nnx.merge(graphdef, a, rest)
  ref_mod.impl = "reference"
  ref_graphdef, _, _ = nnx.split(ref_mod, nnx.Param, ...)

  # fp32 oracle: the reference form computed in fp32 throughout.
  f32 = lambda t: jax.tree.map(
      lambda v: v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v, t)

  @jax.jit
  def forms(a, rest, x, dy):
    out = {}
    for label, gd, cast in (("factored", graphdef, lambda t: t),
                            ("reference", ref_graphdef, lambda t: t), ("oracle", ref_graphdef, f32)):
      y, vjp = jax.vjp(lambda a, x: nnx.merge(gd, a, cast(rest))(x), cast(a), cast(x))
      out[label] = (y, *vjp(cast(dy)))
    return out

  out = forms(a, rest, x, dy)
  y32, da32, dx32 = out["oracle"]
  for label in ("factored", "reference"):
    y, da, dx = out[label]
    assert y.dtype == dtype
    assert_rel_close(y, y32, rtol=tol(dtype, shape[0] + 3), name=f"{label} y")
    assert_rel_close(dx, dx32, rtol=tol(dtype, shape[1] + 3), name=f"{label} dx")
    assert_rel_close(jax.tree.leaves(da), jax.tree.leaves(da32), rtol=tol(dtype, 10 * shape[1]),
                     name=f"{label} dA")


def test_only_A_and_bias_are_trainable():
  mod = _adapter(TwoSidedLoRA, (8, 6), 2, "both", jnp.float32)
  params = nnx.state(mod, nnx.Param)
  assert sorted(params.keys()) == ["A", "bias"]
  assert isinstance(mod.kernel0, Frozen) and isinstance(mod.P, Basis) and isinstance(mod.Q, Basis)
  assert OneSidedLoRA(jnp.zeros((8, 6)), rank=2, key=jax.random.key(0)).A[...].shape == (8, 2)
  assert OneSidedLoRA(jnp.zeros((6, 8)), rank=2, key=jax.random.key(0)).A[...].shape == (2, 8)


@pytest.mark.parametrize("cls,side", [(OneSidedLoRA, "left"), (OneSidedLoRA, "right"),
                                      (TwoSidedLoRA, "both")])
def test_merge_and_reinit_keeps_the_function_and_draws_the_next_basis(cls, side):
  mod = _adapter(cls, (10, 7), 3, side, jnp.float32)
  w_before = mod.kernel()
  x = jax.random.normal(jax.random.key(3), (4, 10))
  y_before = mod(x)
  mod.merge_and_reinit()
  assert int(mod.refresh[...]) == 1
  np.testing.assert_array_equal(mod.A[...], 0.0)
  np.testing.assert_array_equal(mod.kernel0[...], w_before)
  np.testing.assert_array_equal(mod.kernel(), w_before)
  assert_rel_close(mod(x), y_before, rtol=tol(jnp.float32, 10))
  want = random_factors(jax.random.key(5), 1, (10, 7), 3, side)
  for got, exp in zip(mod.basis(), want):
    assert (got is None) == (exp is None)
    if got is not None:
      np.testing.assert_array_equal(got, exp)


@pytest.mark.parametrize("make,match", [
    (lambda: OneSidedLoRA(jnp.zeros((4, 9)), rank=5, key=jax.random.key(0)), "rank=5 exceeds"),
    (lambda: OneSidedLoRA(jnp.zeros((9, 4)), rank=5, side="right", key=jax.random.key(0)),
     "rank=5 exceeds"),
    (lambda: TwoSidedLoRA(jnp.zeros((9, 4)), rank=5, key=jax.random.key(0)), "rank=5 exceeds"),
    (lambda: OneSidedLoRA(jnp.zeros((4, 9)), rank=0, key=jax.random.key(0)),
     "rank must be a positive integer"),
    (lambda: OneSidedLoRA(jnp.zeros((4, 9)), rank=2, side="both", key=jax.random.key(0)),
     "unknown side 'both'"),
    (lambda: OneSidedLoRA(jnp.zeros((4, 9)), rank=2, impl="fast", key=jax.random.key(0)),
     "unknown impl 'fast'"),
    (lambda: OneSidedLoRA(jnp.zeros((4, 9)), rank=2, kind="svd", key=jax.random.key(0)),
     "unknown kind 'svd'"),
    (lambda: OneSidedLoRA(jnp.zeros((4, 9)), rank=2), "give a basis"),
    (lambda: OneSidedLoRA(jnp.zeros((4, 9)), rank=2, basis=jnp.zeros((4, 3))),
     r"basis.left must have shape \(4, 2\)"),
    (lambda: TwoSidedLoRA(jnp.zeros((4, 9)), rank=2, basis=jnp.zeros((4, 2))),
     "basis must be a pair"),
    (lambda: OneSidedLoRA(jnp.zeros((4, 9, 2)), rank=2, key=jax.random.key(0)),
     "must be a matrix"),
])
def test_bad_adapter_arguments(make, match):
  with pytest.raises(ValueError, match=match):
    make()


# ------------------------------------------------------------------------------ on the LM


def _tiny_lm():
  cfg = ModelConfig(vocab_size=48, d_model=32, n_layers=1, n_heads=2, ffn_dim=40)
  return LM(cfg, rngs=nnx.Rngs(0))


def _kernels(name, x):
  return name.endswith("/kernel")


def test_apply_adapters_to_lm():
  model = _tiny_lm()
  tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 48)
  forward = nnx.jit(lambda m, t: m(t))
  ref = forward(model, tokens)
  names = apply_adapters(model, rank=4, filter=lambda n, x: "mlp" in n)
  assert names == [f"layers/0/mlp/{p}/kernel" for p in ("down_proj", "gate_proj", "up_proj")]
  np.testing.assert_array_equal(forward(model, tokens), ref)  # A = 0: the model is unchanged
  assert [n for n, _ in adapters(model)] == names
  trainable = [jax.tree_util.keystr(p, simple=True, separator="/")
               for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]]
  assert not any("mlp" in n and "kernel" in n for n in trainable)
  assert sum("/A" in n for n in trainable) == 3
  with pytest.raises(ValueError, match="rank=41 exceeds"):
    apply_adapters(_tiny_lm(), rank=41)


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_projected_lm_equals_merged_adapter_lm():
  """Whole-LM duality: AdamW-free Adam on all params, with every Linear kernel's gradient
  randomly projected (refresh every 3 steps)  ==  Adam on the one-sided adapters (plus the
  embeddings and norms), merged and re-drawn every 3 steps with the same keys."""
  steps, every, seed, rank = 6, 3, 4, 4
  tokens = jax.random.randint(jax.random.key(1), (steps, 2, 9), 0, 48)

  def loss(model, tok):
    logits = model(tok[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()

  @nnx.jit
  def step(model, opt, tok):
    grads = nnx.grad(loss)(model, tok)
    opt.update(model, grads)

  full = _tiny_lm()
  initial = {name: lin.kernel[...] for name, lin in _linears(full)}
  tx = projected(optax.adam(3e-3), rank=rank, projector="random", update_every=every,
                 seed=seed, filter=_kernels)
  opt = nnx.Optimizer(full, tx, wrt=nnx.Param)
  ada = _tiny_lm()
  apply_adapters(ada, rank=rank, seed=seed, filter=_kernels)
  opt_a = nnx.Optimizer(ada, optax.adam(3e-3), wrt=nnx.Param)
  for t in range(steps):
    if t and t % every == 0:
      merge_and_reinit(ada)
    step(full, opt, tokens[t])
    step(ada, opt_a, tokens[t])
  trained = dict(_linears(full))
  assert sorted(trained) == sorted(n for n, _ in adapters(ada)) and len(trained) == 7
  for name, a in adapters(ada):
    w = trained[name].kernel[...]
    assert float(jnp.abs(w - initial[name]).max()) > 1e-3  # it trained
    assert_rel_close(a.kernel(), w, rtol=tol(jnp.float32, steps), name=name)
  assert_rel_close(ada.embed.embedding[...], full.embed.embedding[...],
                   rtol=tol(jnp.float32, steps), name="embedding")


def _linears(model):
  from jaxlab.models.layers import Linear
  return [("/".join(map(str, path)) + "/kernel", node) for path, node in nnx.iter_graph(model)
          if isinstance(node, Linear)]
