"""LoRA: factored forms vs the materialized reference (values and gradients), trainable
filter, merge/unmerge, dropout, batched adapters (vmap and per-row), and errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlab.config import ConfigError
from jaxlab.models import LM, ModelConfig
from jaxlab.models import hf, lora
from jaxlab.models.layers import Linear
from jaxlab.testing import assert_rel_close, tol

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  qk_norm=True, tie_embeddings=False)
CFG1 = dataclasses.replace(CFG, n_layers=1)  # for the compile-heavy tests
ALL = tuple(lora.TARGETS)
SOME = ("q_proj", "o_proj", "up_proj", "down_proj")  # attention and MLP, in and out shapes


def _model(seed=0, cfg=CFG):
  return LM(cfg, rngs=nnx.Rngs(seed))


def _randomize_b(model, key, std=0.05):
  """B starts at zero; give it values so that adapters change the output."""
  for i, (_, m) in enumerate(lora.lora_modules(model)):
    k = jax.random.fold_in(key, i)
    m.lora_b[...] = std * jax.random.normal(k, m.lora_b[...].shape, m.lora_b[...].dtype)


def _tokens(B=2, T=11, seed=0):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, CFG.vocab_size)


# --------------------------------------------------------------------------- the op

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("K,shape,din,r,dout", [
    (None, (2, 7), 24, 4, 40),
    (None, (3, 1), 17, 1, 5),
    (3, (6, 5), 24, 4, 40),
])
def test_lora_delta_matches_reference_with_grads(dtype, K, shape, din, r, dout):
  ks = jax.random.split(jax.random.key(1), 4)
  lead = () if K is None else (K,)
  x = jax.random.normal(ks[0], (*shape, din), jnp.float32).astype(dtype)
  a = (jax.random.normal(ks[1], (*lead, din, r)) / np.sqrt(din)).astype(dtype)
  b = jax.random.normal(ks[2], (*lead, r, dout)).astype(dtype)
  g = jax.random.normal(ks[3], (*shape, dout), jnp.float32).astype(dtype)
  scale = 2.0

  @jax.jit
  def both(x, a, b, g):
    out, vjp = jax.vjp(lambda x, a, b: lora.lora_delta(x, a, b, scale), x, a, b)
    f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
    ref, vjp_ref = jax.vjp(lambda x, a, b: lora.lora_delta_reference(x, a, b, scale),
                           f32(x), f32(a), f32(b))
    return out, vjp(g), ref, vjp_ref(f32(g))

  out, grads, ref, grads_ref = both(x, a, b, g)
  assert out.shape == ref.shape == (*shape, dout) and out.dtype == dtype
  # Longest sum in the forward or backward: over din, dout or the rows (for dA, dB).
  rt = tol(dtype, reduction=max(din, dout, int(np.prod(shape))))
  assert_rel_close(out, ref, rtol=rt, name="delta")
  for name, got, want in zip("xab", grads, grads_ref):
    assert got.dtype == dtype
    assert_rel_close(got, want, rtol=rt, name=f"d{name}")


def test_lora_delta_bad_input():
  a = jnp.zeros((3, 8, 2))
  b = jnp.zeros((3, 2, 4))
  with pytest.raises(ValueError, match="3 adapters"):
    lora.lora_delta(jnp.zeros((4, 5, 8)), a, b, 1.0)
  with pytest.raises(ValueError, match="unknown impl 'dense'"):
    lora.lora_delta(jnp.zeros((3, 5, 8)), a, b, 1.0, impl="dense")
  y = lora.lora_delta(jnp.ones((3, 5, 8), jnp.bfloat16), a, b, 1.0, impl="reference")
  assert y.shape == (3, 5, 4) and y.dtype == jnp.bfloat16


def test_lora_linear_matches_dense_update():
  base = Linear(24, 40, use_bias=True, rngs=nnx.Rngs(0))
  base.bias[...] = jnp.arange(40, dtype=jnp.float32) / 40
  cfg = lora.LoRAConfig(rank=4, alpha=12.0, targets=("q_proj",))
  m = lora.LoRALinear(base, cfg, rngs=nnx.Rngs(1))
  bound = 1 / np.sqrt(24)
  a = np.asarray(m.lora_a[...])
  assert a.shape == (24, 4) and np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound
  x = jax.random.normal(jax.random.key(2), (3, 5, 24))
  np.testing.assert_array_equal(m(x), base(x))  # B = 0: starts as the base layer
  m.lora_b[...] = jax.random.normal(jax.random.key(3), (4, 40))
  w = base.kernel[...] + (12.0 / 4) * (m.lora_a[...] @ m.lora_b[...])
  ref = jnp.einsum("bti,io->bto", x, w) + base.bias[...]
  assert_rel_close(m(x), ref, rtol=tol(jnp.float32, reduction=24))
  rs = dataclasses.replace(cfg, use_rslora=True)
  assert rs.scale == 12.0 / 2 and cfg.scale == 3.0


# --------------------------------------------------------------------------- on the LM

def test_apply_lora_targets_and_layers():
  cfg = lora.LoRAConfig(rank=2, targets=("k_proj", "up_proj"), layers=(1,))
  m = nnx.eval_shape(lambda: lora.apply_lora(_model(), cfg, rngs=nnx.Rngs(1)))
  paths = [p for p, _ in lora.lora_modules(m)]
  assert paths == [("layers", 1, "mixer", "k_proj"), ("layers", 1, "mlp", "up_proj")]
  assert m.layers[1].mixer.k_proj.lora_a.get_value().shape == (32, 2)
  assert m.layers[1].mixer.k_proj.lora_b.get_value().shape == (2, 16)
  assert type(m.layers[0].mixer.k_proj) is Linear
  with pytest.raises(ValueError, match="already has a LoRA"):
    lora.apply_lora(m, lora.LoRAConfig(targets=("k_proj",), layers=(1,)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="out of range"):
    lora.apply_lora(m, lora.LoRAConfig(layers=(5,)), rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="unknown target 'qkv'"):
    lora.LoRAConfig(targets=("qkv",))
  with pytest.raises(ConfigError, match="rank"):
    lora.LoRAConfig(rank=0)


def test_only_adapters_train():
  m = _model(cfg=CFG1)
  lora.apply_lora(m, lora.LoRAConfig(rank=4, targets=SOME), rngs=nnx.Rngs(1))
  assert len(lora.lora_modules(m)) == len(SOME) * CFG1.n_layers
  base0 = jax.tree.map(np.asarray, nnx.state(m, nnx.Not(lora.LoRAParam)))
  ad0 = jax.tree.map(np.asarray, lora.adapter_state(m))
  n_ad = sum(x.size for x in jax.tree.leaves(ad0))
  assert n_ad == sum(4 * (mm.in_features + mm.out_features) for _, mm in lora.lora_modules(m))
  toks = _tokens()

  def loss(model):
    logits = model(toks[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

  grad_fn = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, lora.LoRAParam))

  @nnx.jit
  def step(model, opt):
    l, grads = grad_fn(model)
    opt.update(model, grads)
    return l, grads

  opt = nnx.Optimizer(m, optax.adam(1e-2), wrt=lora.LoRAParam)
  l0, grads = step(m, opt)
  flat = dict(nnx.to_flat_state(grads))
  assert len(flat) == 2 * len(SOME) * CFG1.n_layers
  assert all(isinstance(v, lora.LoRAParam) for v in flat.values())
  ga = np.asarray(flat[("layers", 0, "mixer", "q_proj", "lora_a")][...])
  gb = np.asarray(flat[("layers", 0, "mixer", "q_proj", "lora_b")][...])
  assert np.abs(gb).max() > 0 and np.abs(ga).max() == 0  # B = 0: A gets no gradient yet
  for _ in range(3):
    l, _ = step(m, opt)
  assert l < l0
  base1 = jax.tree.map(np.asarray, nnx.state(m, nnx.Not(lora.LoRAParam)))
  jax.tree.map(np.testing.assert_array_equal, base1, base0)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), ad0, lora.adapter_state(m))
  assert all(jax.tree.leaves(changed))


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_merge_unmerge_remove(tmp_path):
  m = _model(cfg=CFG1)
  base_q = np.asarray(m.layers[0].mixer.q_proj.kernel[...])
  toks = _tokens()
  base_logits = m(toks)
  lora.apply_lora(m, lora.LoRAConfig(rank=4, alpha=8.0, targets=ALL), rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(m(toks), base_logits)  # B = 0: starts as the base model
  _randomize_b(m, jax.random.key(7))
  unmerged = m(toks)
  assert np.abs(np.asarray(unmerged - base_logits)).max() > 1e-3
  lora.merge(m)
  merged = m(toks)
  assert_rel_close(merged, unmerged, rtol=tol(jnp.float32, reduction=CFG.d_model * 4, factor=32))
  merged_q = np.asarray(m.layers[0].mixer.q_proj.base.kernel[...])
  lora.merge(m)  # idempotent
  np.testing.assert_array_equal(m.layers[0].mixer.q_proj.base.kernel[...], merged_q)
  lora.unmerge(m)
  q = m.layers[0].mixer.q_proj
  np.testing.assert_allclose(q.base.kernel[...], base_q, atol=1e-6, rtol=0)
  assert_rel_close(m(toks), unmerged, rtol=tol(jnp.float32, reduction=CFG.d_model * 4, factor=32))
  with pytest.raises(hf.CheckpointError, match="remove_lora"):
    hf.save(m, str(tmp_path / "with_lora"))
  lora.remove_lora(m, merge_weights=True)
  assert type(m.layers[0].mixer.q_proj) is Linear and not lora.lora_modules(m)
  hf.save(m, str(tmp_path / "merged"))  # a plain model again (Qwen3 layout: q/k norm)
  back = hf.load(str(tmp_path / "merged"))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(back), nnx.state(m))
  assert not any(isinstance(v, lora.LoRAParam) for _, v in nnx.to_flat_state(nnx.state(m)))
  assert_rel_close(m(toks), unmerged, rtol=tol(jnp.float32, reduction=CFG.d_model * 4, factor=32))


def test_dropout_only_in_train_mode():
  m = _model(cfg=CFG1)
  lora.apply_lora(m, lora.LoRAConfig(rank=4, targets=("q_proj", "down_proj"), dropout=0.5),
                  rngs=nnx.Rngs(1))
  _randomize_b(m, jax.random.key(7), std=0.5)
  toks = _tokens()
  eval_out = m(toks)
  np.testing.assert_array_equal(m(toks), eval_out)
  m.train()
  t1, t2 = m(toks), m(toks)
  assert np.abs(np.asarray(t1 - t2)).max() > 1e-3 and np.abs(np.asarray(t1 - eval_out)).max() > 1e-3
  m.eval()
  np.testing.assert_array_equal(m(toks), eval_out)


# --------------------------------------------------------------------------- batched adapters

@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_batched_adapters_vmap_and_per_row():
  m = _model(cfg=CFG1)
  lora.apply_lora(m, lora.LoRAConfig(rank=2, alpha=2.0, targets=SOME), rngs=nnx.Rngs(1))
  K, M = 3, 2
  states = []
  for k in range(K):
    for i, (_, mm) in enumerate(lora.lora_modules(m)):
      kk = jax.random.fold_in(jax.random.key(100 + k), i)
      mm.lora_a[...] = 0.2 * jax.random.normal(kk, mm.lora_a[...].shape)
      mm.lora_b[...] = 0.2 * jax.random.normal(jax.random.fold_in(kk, 1), mm.lora_b[...].shape)
    states.append(jax.tree.map(jnp.array, lora.adapter_state(m)))
  toks = _tokens(B=M, T=9)
  graphdef1, _, rest = nnx.split(m, lora.LoRAParam, ...)
  single = jax.jit(lambda ad, t: nnx.merge(graphdef1, ad, rest)(t))
  # One adapter at a time: [K, M, T, V].
  loop = np.stack([np.asarray(single(s, toks)) for s in states])
  assert np.abs(loop[0] - loop[1]).max() > 1e-2  # the adapters really differ
  stacked = lora.stack_adapters(states)
  rt = tol(jnp.float32, reduction=CFG.d_model, factor=32)
  vm = lora.batched_logits(m, stacked, toks)
  assert vm.shape == (K, M, 9, CFG.vocab_size)
  assert_rel_close(vm, loop, rtol=rt, name="vmap")
  # Per-row (DIT): rows [k*M, (k+1)*M) use adapter k; one jitted call.
  lora.set_adapters(m, stacked)
  graphdef, state = nnx.split(m)
  rows = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.tile(toks, (K, 1)))
  assert_rel_close(np.asarray(rows).reshape(K, M, 9, -1), loop, rtol=rt, name="per-row")
  with pytest.raises(ValueError, match="stacked"):
    lora.merge(m)


# --------------------------------------------------------------------------- files

def test_save_load_adapters_round_trip_and_errors(tmp_path):
  from safetensors.numpy import load_file, save_file

  m = _model()
  cfg = lora.LoRAConfig(rank=3, alpha=6.0, targets=("q_proj", "v_proj", "down_proj"), layers=(0,))
  lora.apply_lora(m, cfg, rngs=nnx.Rngs(1))
  _randomize_b(m, jax.random.key(3))
  d = tmp_path / "ad"
  lora.save_adapters(m, str(d))
  t = load_file(str(d / "adapter_model.safetensors"))
  assert sorted(t) == sorted(
      f"base_model.model.model.layers.0.{mod}.lora_{ab}.weight"
      for mod in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj") for ab in "AB")
  assert t["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (3, 48)
  assert t["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (32, 3)
  assert lora.read_adapter_config(str(d)) == cfg
  fresh = _model()
  lora.load_adapters(fresh, str(d))
  np.testing.assert_array_equal(fresh(_tokens()), m(_tokens()))
  # Errors name the tensor.
  name = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
  bad = dict(t)
  del bad[name]
  save_file(bad, str(d / "adapter_model.safetensors"))
  with pytest.raises(lora.CheckpointError, match=f"missing tensor {name}"):
    lora.load_adapters(_model(), str(d))
  bad[name] = np.zeros((16, 5), np.float32)
  save_file(bad, str(d / "adapter_model.safetensors"))
  msg = f"{name} has shape \\[16, 5\\], expected \\[16, 3\\]"
  fresh = _model()
  with pytest.raises(lora.CheckpointError, match=msg):
    lora.load_adapters(fresh, str(d))
  assert not lora.lora_modules(fresh)  # a bad adapter leaves the model untouched
  bad[name] = t[name]
  bad["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] = t[name]
  save_file(bad, str(d / "adapter_model.safetensors"))
  with pytest.raises(lora.CheckpointError, match="unexpected tensor .*layers.1.self_attn.q_proj"):
    lora.load_adapters(fresh, str(d))
