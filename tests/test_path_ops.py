"""PaTH attention op: every form and its gradients against the fp32 reference.

Oracle chain: an explicit float64 product of Householder matrices (numpy, tiny sizes)
checks the "naive" reference; "blockwise" and "decode" are checked against "naive"
(fp32: norm-relative tol(float32, T); bf16 q/k/v: the fla test ratios, papers.md 2.4).
Jitted functions are shared between tests so each shape compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.ops import path_attention
from jaxlab.ops.path import (_path_attention, _validate, path_decode_step, path_extend,
                             path_init_cache, path_prefill)
from jaxlab.testing import assert_ratio, assert_rel_close, tol

F32 = jnp.float32
# fla tests/ops/test_path_attn.py ratios (papers.md 2.4): o, dq/dk/dv, dw, dbeta, dg.
FLA_RATIO = dict(o=0.005, q=0.008, k=0.008, v=0.008, w=0.015, beta=0.02, g=0.02)
NAMES = ("q", "k", "v", "w", "beta", "g")


def make_inputs(seed, B, T, H, HQ, K, V, *, gate=True, dtype=F32, beta_range=(1.5, 2.0)):
  """fla's test distribution: w = l2norm(randn), beta ~ U(beta_range), g = log U(.95, 1)."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (B, T, HQ, K), F32).astype(dtype)
  k = jax.random.normal(ks[1], (B, T, H, K), F32).astype(dtype)
  v = jax.random.normal(ks[2], (B, T, H, V), F32).astype(dtype)
  w = jax.random.normal(ks[3], (B, T, H, K), F32)
  w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
  beta = jax.random.uniform(ks[4], (B, T, H), F32, *beta_range)
  g = jnp.log(jax.random.uniform(ks[5], (B, T, HQ), F32, 0.95, 1.0)) if gate else None
  return dict(q=q, k=k, v=v, w=w, beta=beta, g=g)


def brute_force(q, k, v, w, beta, g, scale):
  """float64, straight from the definition: s_ij = q_i^T H_i ... H_{j+1} k_j."""
  q, k, v, w, beta = (np.asarray(x, np.float64) for x in (q, k, v, w, beta))
  B, T, HQ, K = q.shape
  G = HQ // k.shape[2]
  gc = np.zeros((B, T, HQ)) if g is None else np.cumsum(np.asarray(g, np.float64), axis=1)
  o = np.zeros((B, T, HQ, v.shape[-1]))
  for b in range(B):
    for hq in range(HQ):
      h = hq // G
      for i in range(T):
        prod, s = np.eye(K), np.zeros(i + 1)
        for j in range(i, -1, -1):
          s[j] = q[b, i, hq] @ prod @ k[b, j, h]
          prod = prod @ (np.eye(K) - beta[b, j, h] * np.outer(w[b, j, h], w[b, j, h]))
        lg = scale * (s + gc[b, i, hq] - gc[b, :i + 1, hq])
        p = np.exp(lg - lg.max())
        o[b, i, hq] = (p / p.sum()) @ v[b, :i + 1, h]
  return o


# Test-only: skip LLVM's optimization passes. Same HLO and IEEE semantics (no fast-math),
# half the compile time on CPU; the test shapes run in milliseconds either way.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


@functools.partial(jit, static_argnames=("impl", "block"))
def fwd_bwd(x, do, mask, pad, *, impl, block=16):
  """Output and all input gradients (None gate -> no dg) for one impl."""
  def f(x):
    return _path_attention(**x, impl=impl, kv_mask=mask, block_size=block, pad_value=pad)
  o, vjp = jax.vjp(f, x)
  return o, vjp(do.astype(o.dtype))[0]


@functools.partial(jit, static_argnames=("impl", "block"))
def fwd(x, mask, pad, *, impl, block=16):
  return _path_attention(**x, impl=impl, kv_mask=mask, block_size=block, pad_value=pad)


def ones_mask(x):
  return jnp.ones(x["q"].shape[:2], bool)


# --------------------------------------------------------------------------- reference

SMALL = dict(B=2, T=11, H=2, HQ=4, K=8, V=6)   # brute-force size


@pytest.mark.parametrize("gate", [pytest.param(True, marks=pytest.mark.slow), False])
def test_reference_and_forms_match_householder_products(gate):
  # T=11 with block 4 (3 blocks: odd count, partial last) and block 16 (one partial block).
  x = make_inputs(0, **SMALL, gate=gate, beta_range=(0.0, 2.0))
  ref = brute_force(**x, scale=8 ** -0.5)
  m = ones_mask(x)
  rtol = tol(F32, reduction=11 * 8)
  forms = (("naive", 16), ("blockwise", 4), ("decode", 16), ("blockwise", 16))
  if not gate:  # the other forms without a gate are covered against naive below
    forms = forms[:1]
  for impl, block in forms:
    assert_rel_close(fwd(x, m, 0.0, impl=impl, block=block), ref, rtol=rtol, name=f"{impl}/{block}")


def test_masked_tokens_are_invisible():
  # Left padding: P garbage tokens with mask False, then the real ones.
  P = 3
  x = make_inputs(8, **SMALL, gate=True)
  ref = brute_force(**{n: x[n][:, P:] for n in NAMES}, scale=8 ** -0.5)
  mask = jnp.arange(SMALL["T"])[None, :].repeat(2, 0) >= P
  for impl in ("naive", "blockwise", "decode"):
    out = fwd(x, mask, 0.0, impl=impl, block=4 if impl == "blockwise" else 16)
    assert np.all(np.isfinite(np.asarray(out))), impl
    assert_rel_close(out[:, P:], ref, rtol=tol(F32, 11 * 8), name=impl)


# --------------------------------------------------------------------------- gradients

# (B, T, H, HQ, K, V, gate, block): GQA + gate with 7 blocks (odd, partial last);
# MHA without gate, 3 blocks of 64, full beta range (0, 2).
CASES = [(2, 100, 2, 4, 16, 16, True, 16), (1, 150, 1, 1, 32, 24, False, 64)]


@pytest.mark.parametrize("case", [pytest.param(CASES[0], id="gqa-gate-b16", marks=pytest.mark.slow),
                                  pytest.param(CASES[1], id="mha-nogate-b64")])
def test_blockwise_fp32_output_and_grads_match_naive(case):
  B, T, H, HQ, K, V, gate, block = case
  x = make_inputs(1, B, T, H, HQ, K, V, gate=gate,
                  beta_range=(1.5, 2.0) if gate else (0.0, 2.0))
  do = jax.random.normal(jax.random.PRNGKey(2), (B, T, HQ, V))
  m = ones_mask(x)
  o_ref, g_ref = fwd_bwd(x, do, m, 0.0, impl="naive")
  o, g = fwd_bwd(x, do, m, 0.0, impl="blockwise", block=block)
  rtol = tol(F32, reduction=T)
  assert_rel_close(o, o_ref, rtol=rtol, name="o")
  for n in NAMES:
    if x[n] is not None:
      assert_rel_close(g[n], g_ref[n], rtol=rtol, name=f"d{n}")


def test_blockwise_bf16_qkv_within_published_ratios():
  B, T, H, HQ, K, V, gate, block = CASES[0]
  x = make_inputs(3, B, T, H, HQ, K, V, gate=gate, dtype=jnp.bfloat16)
  do = jax.random.normal(jax.random.PRNGKey(4), (B, T, HQ, V))
  m = ones_mask(x)
  o_ref, g_ref = fwd_bwd(x, do, m, 0.0, impl="naive")   # fp32 math on the bf16 values
  o, g = fwd_bwd(x, do, m, 0.0, impl="blockwise", block=block)
  assert o.dtype == jnp.bfloat16 and g["q"].dtype == jnp.bfloat16 and g["w"].dtype == F32
  assert_ratio(o_ref, o, FLA_RATIO["o"], name="o")
  for n in NAMES:
    assert_ratio(g_ref[n], g[n], FLA_RATIO[n], name=f"d{n}")


def test_decode_form_grads_match_naive():
  B, T, H, HQ, K, V, gate, _ = CASES[0]
  x = make_inputs(5, B, T, H, HQ, K, V, gate=gate)
  do = jax.random.normal(jax.random.PRNGKey(6), (B, T, HQ, V))
  m = ones_mask(x)
  o_ref, g_ref = fwd_bwd(x, do, m, 0.0, impl="naive")
  o, g = fwd_bwd(x, do, m, 0.0, impl="decode")
  assert_rel_close(o, o_ref, rtol=tol(F32, T), name="o")
  for n in NAMES:
    assert_rel_close(g[n], g_ref[n], rtol=tol(F32, T), name=f"d{n}")


# --------------------------------------------------------------------------- special cases

def causal_attention(q, k, v, g, scale):
  """Plain causal softmax attention (NoPE), gate G_i - G_j inside the scale."""
  HQ, H = q.shape[2], k.shape[2]
  k, v = jnp.repeat(k, HQ // H, axis=2), jnp.repeat(v, HQ // H, axis=2)
  s = jnp.einsum("bihk,bjhk->bhij", q, k)
  if g is not None:
    gc = jnp.cumsum(g, axis=1).transpose(0, 2, 1)
    s = s + gc[..., :, None] - gc[..., None, :]
  T = q.shape[1]
  s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scale * s, -jnp.inf)
  return jnp.einsum("bhij,bjhv->bihv", jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize("case", CASES, ids=["gqa-gate-b16", "mha-nogate-b64"])
def test_beta_zero_is_causal_attention(case):
  B, T, H, HQ, K, V, gate, block = case
  x = make_inputs(7, B, T, H, HQ, K, V, gate=gate)
  ref = causal_attention(x["q"], x["k"], x["v"], x["g"], K ** -0.5)
  do = jnp.ones((B, T, HQ, V))
  m = ones_mask(x)
  # Sanity of the test itself: with beta != 0 the output differs from plain attention.
  o, _ = fwd_bwd(x, do, m, 0.0, impl="blockwise", block=block)
  assert float(jnp.abs(o - ref).max()) > 1e-2
  x["beta"] = jnp.zeros_like(x["beta"])
  for impl in ("naive", "blockwise"):
    o, _ = fwd_bwd(x, do, m, 0.0, impl=impl, block=block)
    assert_rel_close(o, ref, rtol=tol(F32, T), name=impl)


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_blockwise_backward_memory_is_linear_in_t():
  # Compile only: XLA's buffer assignment for fwd+bwd at T and 4T. Linear memory gives a
  # ratio near 4; keeping any T x T (or per-step key copies, as naive does) gives ~16.
  def temp_bytes(T):
    x = make_inputs(14, 1, T, 1, 1, 8, 8, gate=True)
    lowered = fwd_bwd.lower(x, jnp.ones((1, T, 1, 8)), ones_mask(x), 0.0, impl="blockwise")
    return lowered.compile().memory_analysis().temp_size_in_bytes
  small, large = temp_bytes(256), temp_bytes(1024)
  assert large / small < 6, (small, large)


def test_nan_in_padded_block_tail_is_never_read():
  B, T, H, HQ, K, V, gate, block = CASES[0]       # T=100, block 16: 12 padded slots
  x = make_inputs(1, B, T, H, HQ, K, V, gate=gate)
  do = jax.random.normal(jax.random.PRNGKey(2), (B, T, HQ, V))
  m = ones_mask(x)
  o0, g0 = fwd_bwd(x, do, m, 0.0, impl="blockwise", block=block)
  o1, g1 = fwd_bwd(x, do, m, jnp.nan, impl="blockwise", block=block)
  np.testing.assert_array_equal(np.asarray(o1), np.asarray(o0))
  for n in NAMES:
    np.testing.assert_array_equal(np.asarray(g1[n]), np.asarray(g0[n]), err_msg=f"d{n}")


# --------------------------------------------------------------------------- decoding

prefill = jit(path_prefill, static_argnames=("max_len", "impl"))
extend = jit(path_extend, static_argnames=("block_size",))
decode_step = jit(path_decode_step)
DEC = dict(zip("B T H HQ K V".split(), CASES[0][:6]))   # T = 100; reuses fwd_bwd's compile


def test_prefill_extend_decode_reproduce_blockwise():
  x = make_inputs(10, **DEC)
  T = DEC["T"]
  full, _ = fwd_bwd(x, jnp.zeros(x["q"].shape[:3] + (DEC["V"],)), ones_mask(x), 0.0,
                    impl="blockwise")
  sl = lambda a, b: {n: x[n][:, a:b] for n in NAMES}
  o0, cache = prefill(**sl(0, 17), max_len=T)
  _, cache_naive = prefill(**sl(0, 17), max_len=T, impl="naive")
  for f in ("k", "gate"):   # cache keys = keys carried to the last prompt token
    assert_rel_close(getattr(cache, f)[:, :17], getattr(cache_naive, f)[:, :17],
                     rtol=tol(F32, 17), name=f"cache.{f}")
  o1, cache = extend(cache, **sl(17, 30), block_size=4)   # 4 blocks after the cache
  outs = [o0, o1]
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), cache)
  for t in range(30, T):
    o, cache = decode_step(cache, *(x[n][:, t] for n in NAMES))
    outs.append(o[:, None])
  assert jax.tree.map(lambda a: (a.shape, a.dtype), cache) == shapes  # compiles once
  assert int(cache.length) == T
  assert_rel_close(jnp.concatenate(outs, axis=1), full, rtol=tol(F32, T), name="decode")


def test_nan_in_unused_cache_slots_is_never_read():
  x = make_inputs(11, **DEC)
  B, H, HQ, K = DEC["B"], DEC["H"], DEC["HQ"], DEC["K"]

  def run(cache):
    o, cache = extend(cache, **{n: x[n][:, :13] for n in NAMES}, block_size=4)
    outs = [o]
    for t in range(13, 20):
      o, cache = decode_step(cache, *(x[n][:, t] for n in NAMES))
      outs.append(o[:, None])
    return np.asarray(jnp.concatenate(outs, axis=1))

  zero = path_init_cache(B, DEC["T"], num_heads=H, num_q_heads=HQ, head_dim=K, gate=True)
  nan = zero._replace(k=jnp.full_like(zero.k, jnp.nan), v=jnp.full_like(zero.v, jnp.nan),
                      gate=jnp.full_like(zero.gate, jnp.nan))
  out_nan, out_zero = run(nan), run(zero)
  assert np.all(np.isfinite(out_nan))
  np.testing.assert_array_equal(out_nan, out_zero)


# --------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_naming_the_argument():
  x = make_inputs(12, 1, 8, 2, 4, 8, 8)
  bad = lambda **kw: {**x, **kw}
  with pytest.raises(ValueError, match="impl.*'flash'"):
    path_attention(**x, impl="flash")
  with pytest.raises(ValueError, match="^q: 3 query heads"):
    path_attention(**bad(q=x["q"][:, :, :3]))
  with pytest.raises(ValueError, match="^k: head dim"):
    path_attention(**bad(k=x["k"][..., :4]))
  with pytest.raises(ValueError, match="^w: shape"):
    path_attention(**bad(w=x["w"][:, :, :1]))
  with pytest.raises(ValueError, match="^beta: shape"):
    path_attention(**bad(beta=x["beta"][..., None]))
  with pytest.raises(ValueError, match="^g: shape"):
    path_attention(**bad(g=x["g"][..., :2]))
  with pytest.raises(ValueError, match=r"^beta: values must lie in \[0, 2\]"):
    path_attention(**bad(beta=x["beta"].at[0, 3, 1].set(2.5)))
  with pytest.raises(ValueError, match=r"^beta: values"):
    path_attention(**bad(beta=x["beta"].at[0, 0, 0].set(-0.1)))
  with pytest.raises(ValueError, match="^w: rows must have unit L2 norm"):
    path_attention(**bad(w=x["w"].at[0, 2, 0].mul(1.5)))
  # A transition with beta = 0 is the identity, so its w is not checked.
  _validate(**bad(w=x["w"].at[0, 2, 0].set(0.0), beta=x["beta"].at[0, 2, 0].set(0.0)))
  # Traced values (under jit) cannot be checked (documented): tracing does not raise.
  jax.eval_shape(path_attention, **bad(beta=x["beta"].at[0, 3, 1].set(2.5)))


def test_cache_overflow_raises_or_poisons():
  x = make_inputs(13, 1, 1, 1, 1, 8, 8, gate=True)
  cache = path_init_cache(1, 3, num_heads=1, num_q_heads=1, head_dim=8, gate=True)
  cache = cache._replace(valid=jnp.ones_like(cache.valid), length=jnp.int32(3))
  t = [x[n][:, 0] for n in NAMES]
  with pytest.raises(ValueError, match="^cache: 3 used"):
    path_decode_step(cache, *t)
  o, _ = decode_step(cache, *t)
  assert np.all(np.isnan(np.asarray(o)))
  with pytest.raises(ValueError, match="^g: a cache built with a forget gate"):
    path_decode_step(cache, *t[:5])


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_bench_rows_and_table():
  """`jaxlab bench attention --op path` rows: timed, memory-measured, skips say why."""
  from jaxlab.bench import path as bench_path
  rows = bench_path.bench([32, 64], repeats=1, head_dim=16, block=16,
                          naive_max_t={"fwd": 32, "fwd+bwd": 32}, run_max_t={"fwd+bwd": 32})
  by = {(r["op"], r["impl"], r["T"]): r for r in rows}
  assert len(rows) == 8
  assert all(r["peak_mb"] > 0 for k, r in by.items() if not (k[1] == "naive" and k[2] == 64))
  assert by[("fwd", "naive", 64)]["ms"] is None and "skipped" in by[("fwd", "naive", 64)]["note"]
  assert by[("fwd+bwd", "blockwise", 64)]["ms"] is None  # compiled only, past run_max_t
  assert by[("fwd+bwd", "blockwise", 64)]["peak_mb"] > by[("fwd+bwd", "blockwise", 32)]["peak_mb"]
  assert by[("fwd", "blockwise", 64)]["ms"] > 0
  table = bench_path.format_table(rows)
  assert table.count("\n") == len(rows) + 1 and "| fwd | naive | 64 |  |  | skipped" in table
