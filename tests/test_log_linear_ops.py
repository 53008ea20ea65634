"""Log-linear Mamba-2 / Gated DeltaNet ops: every form, state and gradient.

Oracle chain: a float64 brute force straight from the definition (explicit
per-(t, s) transition products and Fenwick levels, numpy, tiny T) checks the
"naive" reference; "chunked" and "recurrent" (and their gradients) are checked
against "naive": fp32 norm-relative 1e-5 (issue 4); bf16 inputs: the fla test
ratios (papers.md 1.2). Jitted functions are cached so each shape compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.ops import log_linear as ll
from jaxlab.ops import log_linear_attention, log_linear_gated_delta
from jaxlab.testing import assert_ratio, assert_rel_close

F32 = jnp.float32
RTOL = 1e-5  # fp32, issue 4
# fla tests/ops/test_log_linear_attn.py (papers.md 1.2); beta has no published ratio, it
# gets the one of g and lambda (the other per-token scalar inputs).
FLA_RATIO = dict(o=0.004, q=0.007, k=0.008, v=0.007, g=0.015, beta=0.015, level_scales=0.015)
IMPLS = ("naive", "chunked", "recurrent")


def make_inputs(seed, B, T, G, H, K, V, L, *, dtype=F32, gscale=1.0):
  """fla's distribution: dt = softplus(N - 4), g = -exp(U) dt, v = x dt; raw N(0,1) lambdas.

  gscale > 1 strengthens the decay so that long products stay well away from 1.
  """
  r = np.random.default_rng(seed)
  dt = np.log1p(np.exp(r.normal(size=(B, T, H)) - 4.0))
  g = -np.exp(r.uniform(size=(H,))) * dt * gscale
  k = r.normal(size=(B, T, G, K)) / np.sqrt(K)   # keeps (I - beta k k^T) contractive
  d = dict(q=r.normal(size=(B, T, G, K)), k=k, v=r.normal(size=(B, T, H, V)) * dt[..., None],
           g=g, beta=r.uniform(size=(B, T, H)), level_scales=r.normal(size=(B, T, H, L)))
  return {n: jnp.asarray(x, F32).astype(dtype if n in "qkv" else F32) for n, x in d.items()}


def args_of(variant, x):
  names = ["q", "k", "v", "g"] + (["beta"] if variant == "gdn" else []) + ["level_scales"]
  return tuple(x[n] for n in names), names


def op(variant):
  return log_linear_gated_delta if variant == "gdn" else log_linear_attention


def brute_force(variant, x, scale):
  """float64: o_t = scale sum_{s<=t} lam_t^(bitlen(t^s)) q_t^T P(t,s) b_s k_s v_s."""
  q, k, v, g, beta, lam = (np.asarray(x[n], np.float64)
                           for n in ("q", "k", "v", "g", "beta", "level_scales"))
  B, T, G, K = q.shape
  H = v.shape[2]
  o = np.zeros(v.shape)
  for b in range(B):
    for h in range(H):
      gr = h // (H // G)
      for t in range(T):
        P = np.eye(K)
        for s in range(t, -1, -1):     # P = A_t ... A_{s+1}
          bs = beta[b, s, h] if variant == "gdn" else 1.0
          w = q[b, t, gr] @ P @ k[b, s, gr] * bs
          o[b, t, h] += scale * lam[b, t, h, (t ^ s).bit_length()] * w * v[b, s, h]
          a = np.exp(g[b, s, h]) * np.eye(K)
          if variant == "gdn":
            a = a @ (np.eye(K) - beta[b, s, h] * np.outer(k[b, s, gr], k[b, s, gr]))
          P = P @ a
  return o


@functools.lru_cache(maxsize=None)
def fwd(variant, impl, with_state, chunk=64, parallel=True):
  """Jitted (o, state) of one form; with_state feeds an incoming state; `pad` is what
  the chunked form writes into padded slots before masking them (test hook)."""
  beta = variant == "gdn"

  def f(q, k, v, g, b, lam, state, pad):
    return ll._run(q, k, v, g, b if beta else None, lam, scale=0.5, impl=impl,
                   initial_state=state if with_state else None, return_state=True,
                   chunk_size=chunk, parallel=parallel, pad_value=pad)
  return jax.jit(f)


def run(variant, impl, x, state=None, pad=0.0, **kw):
  return fwd(variant, impl, state is not None, **kw)(
      x["q"], x["k"], x["v"], x["g"], x["beta"], x["level_scales"], state, pad)


def sl(x, a, b):
  return {n: v[:, a:b] for n, v in x.items()}


def close(a, b, name, rtol=RTOL):
  assert_rel_close(a, b, rtol=rtol, name=name)


# ---------------------------------------------------------------------------- reference


@pytest.mark.parametrize("variant", ["mamba2", "gdn"])
def test_naive_matches_brute_force(variant):
  x = make_inputs(0, B=1, T=11, G=1, H=2, K=4, V=3, L=5)
  ref = brute_force(variant, x, 0.5)
  args, _ = args_of(variant, x)
  out = op(variant)(*args, scale=0.5, impl="naive")
  close(out, ref, "naive vs float64 brute force")


# ---------------------------------------------------------------- forms agree, states
# One input set per variant, shared by several tests so that each program compiles once:
# T=100 (partial last chunk), G=2 < H=4, L=9 > 8 needed, split at 37 (the continuation's
# chunks are not aligned with the buffer: the state shifts it).


@functools.lru_cache(maxsize=None)
def shared(variant):
  x = make_inputs(1, B=2, T=100, G=2, H=4, K=8, V=8, L=9)
  ref = run(variant, "naive", x)
  pre = run(variant, "naive", sl(x, 0, 37))
  return x, ref, pre


# ~12 s each: Mamba-2's is slow (CI runs it; its gradients stay in the default run)
@pytest.mark.parametrize("variant", [pytest.param("mamba2", marks=pytest.mark.slow), "gdn"])
def test_forms_agree_with_states(variant):
  x, (ref_o, ref_s), (a_o, a_s) = shared(variant)
  assert (ref_s.count == 100).all() and (a_s.count == 37).all()
  o, s = run(variant, "chunked", x)
  close(o, ref_o, "chunked output")
  close(s.levels, ref_s.levels, "chunked state")
  for impl in IMPLS:   # continue from the prefill state: 37 + 63 tokens == 100
    b_o, b_s = run(variant, impl, sl(x, 37, 100), a_s)
    close(jnp.concatenate([a_o, b_o], 1), ref_o, f"{impl} output after a state")
    close(b_s.levels, ref_s.levels, f"{impl} state after a state")
    assert (b_s.count == 100).all()


@pytest.mark.parametrize("variant", ["mamba2", "gdn"])
def test_small_chunks_many_levels(variant):
  """Chunk size 4 at T=100: 25 chunks, 5 chunk levels, both chunk-level algorithms."""
  x, (ref_o, ref_s), _ = shared(variant)
  for parallel in (True, False) if variant == "mamba2" else (False,):   # GDN always scans
    o, s = run(variant, "chunked", x, chunk=4, parallel=parallel)
    close(o, ref_o, f"chunk 4 parallel={parallel}")
    close(s.levels, ref_s.levels, f"chunk 4 state parallel={parallel}")


@pytest.mark.parametrize("chunk,T", [pytest.param(4, 100, marks=pytest.mark.slow), (2, 150)])
def test_streamed_training_form_many_blocks(chunk, T):
  assert ll._STREAM_BLOCK == 8
  """Log-linear Mamba-2 without states runs as a scan over blocks of 8 chunks with
  block-level binary carry (ll._streamed). Small chunks give 4 blocks / 2 outer levels
  (chunk 4, T 100) and 10 blocks / 4 outer levels, last block partial (chunk 2, T 150):
  outputs and every gradient vs the naive form."""
  x = make_inputs(11, B=2, T=T, G=1, H=2, K=4, V=4, L=(T - 1).bit_length() + 1, gscale=3.0)
  names = ("q", "k", "v", "g", "level_scales")

  def loss(impl, chunk_size, *a):
    o, _ = ll._run(a[0], a[1], a[2], a[3], None, a[4], scale=0.5, impl=impl,
                   initial_state=None, return_state=False, chunk_size=chunk_size)
    return jnp.sum(o * do), o

  do = jax.random.normal(jax.random.PRNGKey(3), x["v"].shape, F32)
  args = [x[n] for n in names]
  argnums = tuple(range(2, 7))
  (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True),
                          static_argnums=(0, 1))("chunked", chunk, *args)
  (_, ref), ref_grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True),
                                static_argnums=(0, 1))("naive", 64, *args)
  close(o, ref, f"streamed o (chunk {chunk}, T {T})")
  for n, a, b in zip(names, grads, ref_grads):
    close(a, b, f"streamed d{n}")


@pytest.mark.parametrize("variant", ["mamba2", "gdn"])
def test_t1_and_decode_step(variant):
  x = make_inputs(3, B=2, T=9, G=1, H=2, K=4, V=4, L=5)
  ref_o, ref_s = run(variant, "naive", x)
  close(run(variant, "chunked", sl(x, 0, 1))[0], ref_o[:, :1], "chunked T=1")
  args, _ = args_of(variant, x)
  st = ll.init_state(2, 2, 5, 4, 4)
  step = ll.log_linear_gated_delta_step if variant == "gdn" else ll.log_linear_attention_step
  step = jax.jit(functools.partial(step, scale=0.5))
  outs = []
  for t in range(9):
    o, st = step(st, *(a[:, t] for a in args))
    outs.append(o)
    if t == 7:
      pre = st
  close(jnp.stack(outs, 1), ref_o, "decode steps")
  close(st.levels, ref_s.levels, "decode state")
  assert (st.count == 9).all()
  o, s = run(variant, "chunked", sl(x, 8, 9), pre)   # T=1 after a state
  close(o, ref_o[:, 8:], "chunked T=1 after a state")
  close(s.levels, ref_s.levels, "chunked T=1 state")


@functools.lru_cache(maxsize=None)
def base_fn(variant, impl):
  base = ll.gated_delta_rule if variant == "gdn" else ll.linear_attention
  return jax.jit(functools.partial(base, scale=0.5, impl=impl, return_state=True))


def test_level_sum_is_the_base_state():
  """Invariant (papers.md 1.1): the levels of a state sum to the base model's state."""
  for variant in ("mamba2", "gdn"):
    x, (_, ref_s), _ = shared(variant)
    args, _ = args_of(variant, x)
    _, b = base_fn(variant, "chunked")(*args[:-1])
    close(ref_s.levels.sum(2), b.levels[:, :, 0], f"{variant} level sum")


# ----------------------------------------------------------------- one level = base


def base_recurrence(variant, x, scale):
  """Plain Mamba-2 / Gated DeltaNet, float64 token loop: S = A_t S + b_t k_t v_t^T."""
  q, k, v, g, beta = (np.asarray(x[n], np.float64) for n in ("q", "k", "v", "g", "beta"))
  B, T, G, K = q.shape
  H = v.shape[2]
  o = np.zeros(v.shape)
  for b in range(B):
    for h in range(H):
      gr, S = h // (H // G), np.zeros((K, v.shape[-1]))
      for t in range(T):
        kt = k[b, t, gr]
        if variant == "gdn":
          S = np.exp(g[b, t, h]) * (S - beta[b, t, h] * np.outer(kt, kt @ S))
          S += beta[b, t, h] * np.outer(kt, v[b, t, h])
        else:
          S = np.exp(g[b, t, h]) * S + np.outer(kt, v[b, t, h])
        o[b, t, h] = scale * q[b, t, gr] @ S
  return o


@pytest.mark.parametrize("variant", ["mamba2", "gdn"])
def test_equal_lambdas_reduce_to_base_model(variant):
  x, _, _ = shared(variant)
  x = dict(x, level_scales=jnp.full_like(x["level_scales"], 0.7))
  ref = 0.7 * base_recurrence(variant, x, 0.5)
  for impl in ("naive", "chunked"):
    close(run(variant, impl, x)[0], ref, f"log-linear {impl} with equal lambdas")
  args, _ = args_of(variant, x)
  for impl in ("chunked", "recurrent"):
    close(0.7 * base_fn(variant, impl)(*args[:-1])[0], ref, f"base model {impl}")


# ---------------------------------------------------------------------------- gradients


@functools.lru_cache(maxsize=None)
def grads_fn(variant, impl, n_args):
  """Jitted (o, *input grads) for cotangent do; pad as in fwd."""
  beta = variant == "gdn"

  def fn(pad, *a):
    b = a[4] if beta else None
    return ll._run(a[0], a[1], a[2], a[3], b, a[-1], scale=0.5, impl=impl,
                   initial_state=None, return_state=False, pad_value=pad)

  def f(*a, pad=0.0):
    o, vjp = jax.vjp(functools.partial(fn, pad), *a[:n_args])
    return (o,) + vjp(a[n_args].astype(o.dtype))
  return jax.jit(f)


# ~11 s each: GDN's is slow (CI runs it; its forms stay in the default run)
@pytest.mark.parametrize("variant", ["mamba2", pytest.param("gdn", marks=pytest.mark.slow)])
def test_gradients_fp32(variant):
  x = make_inputs(6, B=1, T=70, G=1, H=2, K=8, V=8, L=9, gscale=10.0)
  args, names = args_of(variant, x)
  do = jax.random.normal(jax.random.PRNGKey(0), x["v"].shape, F32)
  ref = grads_fn(variant, "naive", len(args))(*args, do)
  for impl in ("chunked", "recurrent"):
    out = grads_fn(variant, impl, len(args))(*args, do)
    for name, a, b in zip(["o"] + names, out, ref):
      close(a, b, f"{impl} d{name}")


@pytest.mark.parametrize("variant", ["mamba2", "gdn"])
def test_bf16_inputs_within_fla_ratios(variant):
  x32 = make_inputs(7, B=1, T=70, G=1, H=2, K=8, V=8, L=9, gscale=10.0)
  x16 = dict(x32, **{n: x32[n].astype(jnp.bfloat16) for n in "qkv"})
  args16, names = args_of(variant, x16)
  ref_args = tuple(a.astype(F32) for a in args16)   # same values, fp32 reference
  do = jax.random.normal(jax.random.PRNGKey(1), x32["v"].shape, F32)
  ref = grads_fn(variant, "naive", len(args16))(*ref_args, do)
  out = grads_fn(variant, "chunked", len(args16))(*args16, do)
  assert out[0].dtype == jnp.bfloat16
  for name, a, b in zip(["o"] + names, out, ref):
    assert_ratio(b, a, FLA_RATIO[name], name=f"bf16 d{name}" if name != "o" else "bf16 o")


# -------------------------------------------------------------- padding is never read


@pytest.mark.parametrize("variant", ["mamba2", "gdn"])
def test_padding_never_read(variant):
  """NaN in every padded slot (tail of the last chunk; also the head of the first chunk
  when a state shifts the buffer) leaves outputs, states and gradients finite and
  bit-identical to zero padding."""
  x = make_inputs(6, B=1, T=70, G=1, H=2, K=8, V=8, L=9, gscale=10.0)
  args, _ = args_of(variant, x)
  do = jax.random.normal(jax.random.PRNGKey(0), x["v"].shape, F32)
  g0 = grads_fn(variant, "chunked", len(args))(*args, do, pad=0.0)
  g1 = grads_fn(variant, "chunked", len(args))(*args, do, pad=float("nan"))
  for a, b in zip(g1, g0):
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  xs, _, (_, st) = shared(variant)                       # count 37: shift 37 in the buffer
  rest = sl(xs, 37, 100)
  o0, s0 = run(variant, "chunked", rest, st, pad=0.0)
  o1, s1 = run(variant, "chunked", rest, st, pad=float("nan"))
  assert np.isfinite(np.asarray(o1)).all() and np.isfinite(np.asarray(s1.levels)).all()
  np.testing.assert_array_equal(np.asarray(o1), np.asarray(o0))
  np.testing.assert_array_equal(np.asarray(s1.levels), np.asarray(s0.levels))


@pytest.mark.parametrize("variant", ["mamba2", "gdn"])
def test_unused_state_levels_never_read(variant):
  """A state with NaN in its unoccupied levels gives the same finite results."""
  x, _, (_, st) = shared(variant)                         # count 37: last token 36 = 100100b
  occ = np.asarray(ll._occupied(st.count, 9))
  assert occ[0].tolist() == [True, False, False, True, False, False, True, False, False]
  poisoned = ll.LogLinearState(jnp.where(occ[:, None, :, None, None], st.levels, jnp.nan),
                               st.count)
  rest = sl(x, 37, 100)
  for impl in IMPLS:
    o0, s0 = run(variant, impl, rest, st)
    o1, s1 = run(variant, impl, rest, poisoned)
    assert np.isfinite(np.asarray(o1)).all(), impl
    np.testing.assert_array_equal(np.asarray(o1), np.asarray(o0))
    np.testing.assert_array_equal(np.asarray(s1.levels), np.asarray(s0.levels))
  step = ll.log_linear_gated_delta_step if variant == "gdn" else ll.log_linear_attention_step
  args, _ = args_of(variant, rest)
  o0, _ = step(st, *(a[:, 0] for a in args))
  o1, _ = step(poisoned, *(a[:, 0] for a in args))
  np.testing.assert_array_equal(np.asarray(o1), np.asarray(o0))


# ---------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
  x = make_inputs(10, B=1, T=20, G=2, H=4, K=4, V=4, L=6)
  q, k, v, g, beta, lam = (x[n] for n in ("q", "k", "v", "g", "beta", "level_scales"))
  cases = [
      (lambda: log_linear_attention(q, k[:, :, :1], v, g, lam), "k:"),
      (lambda: log_linear_attention(q, k, v[:, :19], g, lam), "v:"),
      (lambda: log_linear_attention(q, k, v[:, :, :3], g[..., :3], lam[:, :, :3]),
       "not divisible"),
      (lambda: log_linear_attention(q, k, v, g[..., :2], lam), "g:"),
      (lambda: log_linear_attention(q, k, v, g, lam[..., :5]), "level_scales: L=5"),
      (lambda: log_linear_attention(q, k, v, g, lam[:, :, :2]), "level_scales:"),
      (lambda: log_linear_gated_delta(q, k, v, g, beta[:, 1:], lam), "beta:"),
      (lambda: log_linear_attention(q[0], k, v, g, lam), "q:"),
      (lambda: log_linear_attention(q, k, v, g, lam, impl="fast"), "impl: unknown"),
      (lambda: log_linear_attention(q, k, v, g, lam, initial_state=ll.init_state(1, 4, 5, 4, 4)),
       "initial_state:"),
      (lambda: log_linear_attention(q, k, v, g, lam, initial_state=ll.LogLinearState(
          jnp.zeros((1, 4, 6, 4, 4)), jnp.array([20], jnp.int32))), "capacity"),
      (lambda: ll.log_linear_attention_step(ll.init_state(1, 4, 6, 4, 4), q[:, 0], k[:, 0],
                                            v[:, 0], g[:, 0], lam[:, 0, :, :5]), "state:"),
  ]
  for fn, msg in cases:
    with pytest.raises((ValueError, TypeError), match=msg):
      fn()
  with pytest.raises(ValueError, match="v: H=4 value heads are not divisible by G=3"):
    log_linear_attention(jnp.zeros((1, 20, 3, 4)), jnp.zeros((1, 20, 3, 4)), v, g, lam)


def test_bench_rows():
  from jaxlab.bench.log_linear import bench
  rows = bench([96], repeats=1, heads=2, dk=8, dv=8, ops=("log_linear_attention",),
               impls=("chunked", "naive"), naive_max_t=64)
  assert [(r["impl"], r["T"]) for r in rows] == [("chunked", 96), ("naive", 96)]
  for r in rows:
    if r["impl"] == "naive":
      assert r["ms"] is None and "skipped" in r["note"], r
    else:
      assert r["ms"] > 0 and r["peak_mb"] > 0 and r["note"] == "", r
