"""Decode kernels (kernels/) against their fp32 references, Pallas in interpret mode.

Shapes are small but multi-block (several CTAs, several pipeline stages), head
dims 64/128, GQA ratios 1/4, cache lengths that are not block multiples, and
NaN in every cache slot past the live length. On a GPU the same tests run the
compiled Mosaic kernels (interpret=None picks the mode from the backend).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.testing import assert_rel_close, tol
from kernels.decode_attention import decode_attention
from kernels.decode_attention import pallas as attn_pallas
from kernels.decode_attention import reference as attn_ref
from kernels.lm_head_argmax import lm_head_argmax
from kernels.log_linear_state import log_linear_state_update
from kernels.log_linear_state import reference as ll_ref
from kernels.out_proj_residual import out_proj_residual
from kernels.path_key_update import path_key_update
from kernels.rmsnorm_qkv import rmsnorm_qkv
from kernels.rmsnorm_swiglu import rmsnorm_swiglu
from kernels.rope_append import rope_append
from jaxlab.models.rope import rope_cos_sin, rope_frequencies

F32 = jnp.float32
EPS = 1e-6


def _keys(seed, n):
  return jax.random.split(jax.random.key(seed), n)


def _close(out, ref, reduction, name):
  assert_rel_close(np.asarray(out), np.asarray(ref), rtol=tol(F32, reduction), name=name)


# ---------------------------------------------------------------- GEMV family


# split_k: None = automatic (here 2 for D = 128, 4 for D = 256: few row blocks), 1 = one
# CTA per row block (fused epilogue), 2/4 = explicit split-K (partials + XLA epilogue).
@pytest.mark.parametrize("bias,D,split_k", [(False, 128, None), (True, 128, None),
                                            (True, 128, 1), (False, 128, 1), (True, 256, 4)])
def test_rmsnorm_qkv(bias, D, split_k):
  N = 320                             # 5 row blocks of 64, K blocks of 64
  k = _keys(0, 4)
  x = 3.0 * jax.random.normal(k[0], (D,))
  g = 1.0 + 0.2 * jax.random.normal(k[1], (D,))
  w = jax.random.normal(k[2], (N, D)) / np.sqrt(D)
  b = jax.random.normal(k[3], (N,)) if bias else None
  f = jax.jit(functools.partial(rmsnorm_qkv, eps=EPS, impl="pallas", block_n=64, block_k=64,
                                split_k=split_k))
  ref = rmsnorm_qkv(x, g, w, b, eps=EPS, impl="xla")
  _close(f(x, g, w, b), ref, D, "rmsnorm_qkv")


def test_gemv_split_choice():
  from kernels import _gemv
  assert _gemv.pick_split(48, 2048, 128) == 4      # llama-1b QKV: 48 row blocks -> 192 CTAs
  assert _gemv.pick_split(32, 2048, 128) == 4      # llama-1b output projection
  assert _gemv.pick_split(96, 4096, 128) == 2      # llama-8b QKV
  assert _gemv.pick_split(500, 2048, 128) == 1     # LM head: already enough CTAs
  assert _gemv.pick_split(2, 128, 64) == 2         # limited by whole K blocks
  x = jnp.ones((128,))
  with pytest.raises(ValueError, match="split_k=3"):
    out_proj_residual(x, jnp.ones((64, 128)), jnp.ones((64,)), impl="pallas", block_k=64,
                      split_k=3)


@pytest.mark.parametrize("split_k", [None, 1, 3])
def test_out_proj_residual(split_k):
  M, D = 192, 128
  k = _keys(1, 3)
  o, r = jax.random.normal(k[0], (M,)), jax.random.normal(k[1], (D,))
  w = jax.random.normal(k[2], (D, M)) / np.sqrt(M)
  f = jax.jit(functools.partial(out_proj_residual, impl="pallas", block_n=64, block_k=64,
                                split_k=split_k))
  _close(f(o, w, r), out_proj_residual(o, w, r, impl="xla"), M, "out_proj_residual")


def test_split_k_in_bf16_matches_one_pass():
  # Same math, different summation order: both sum D = 256 products in fp32 (order error
  # ~D * 2^-24, far below bf16's 2^-8 relative spacing) and round once to bf16, so
  # they differ by at most one bf16 ulp of the value, <= 2^-7 * max |y|.
  D, N = 256, 128
  k = _keys(3, 3)
  x = jax.random.normal(k[0], (D,)).astype(jnp.bfloat16)
  g = (1.0 + 0.2 * jax.random.normal(k[1], (D,))).astype(jnp.bfloat16)
  w = (jax.random.normal(k[2], (N, D)) / np.sqrt(D)).astype(jnp.bfloat16)
  f = lambda s: rmsnorm_qkv(x, g, w, eps=EPS, impl="pallas", block_n=64, block_k=64, split_k=s)
  one, four = np.asarray(f(1), np.float32), np.asarray(f(4), np.float32)
  ref = np.asarray(rmsnorm_qkv(x, g, w, eps=EPS, impl="xla"), np.float32)
  assert np.max(np.abs(four - one)) <= 2 ** -7 * np.max(np.abs(ref))
  assert not np.array_equal(one, np.zeros_like(one))


def test_rmsnorm_swiglu():
  D, F = 128, 256                     # 4 CTAs over the hidden dim
  k = _keys(2, 5)
  x = jax.random.normal(k[0], (D,))
  g = 1.0 + 0.2 * jax.random.normal(k[1], (D,))
  wg, wu, wd = (jax.random.normal(kk, (F, D)) / np.sqrt(D) for kk in k[2:5])
  ref = rmsnorm_swiglu(x, g, wg, wu, wd, eps=EPS, impl="xla")
  for once in (False, True):
    f = jax.jit(functools.partial(rmsnorm_swiglu, eps=EPS, impl="pallas", block_f=64,
                                  block_k=64, block_d=64, store_once=once))
    _close(f(x, g, wg, wu, wd), ref, F, f"rmsnorm_swiglu store_once={once}")
    # W_down^T [D, F] (row-reduced down blocks), Pallas and the reference.
    ft = jax.jit(lambda *a: rmsnorm_swiglu(*a, w_down_t_DF=wd.T, eps=EPS, impl="pallas",
                                           block_f=64, block_k=64, block_d=64, store_once=once))
    _close(ft(x, g, wg, wu), ref, F, f"rmsnorm_swiglu w_down_t_DF store_once={once}")
  _close(rmsnorm_swiglu(x, g, wg, wu, w_down_t_DF=wd.T, eps=EPS, impl="xla"), ref, F,
         "reference with w_down_t_DF")
  with pytest.raises(ValueError, match="pass the down weight once"):
    rmsnorm_swiglu(x, g, wg, wu, wd, w_down_t_DF=wd.T, eps=EPS, impl="pallas")
  with pytest.raises(ValueError, match="pass the down weight once"):
    rmsnorm_swiglu(x, g, wg, wu, eps=EPS, impl="xla")
  with pytest.raises(ValueError, match=r"w_down_t_DF \(256, 128\) must be \[128, 256\]"):
    rmsnorm_swiglu(x, g, wg, wu, w_down_t_DF=wd, eps=EPS, impl="pallas")


def test_lm_head_argmax_values_and_ties():
  D, V = 128, 512                     # 4 blocks of 128 logits
  k = _keys(3, 3)
  x = jax.random.normal(k[0], (D,))
  g = 1.0 + 0.2 * jax.random.normal(k[1], (D,))
  E = jax.random.normal(k[2], (V, D)) / np.sqrt(D)
  f = jax.jit(functools.partial(lm_head_argmax, eps=EPS, impl="pallas", block_n=128))
  logits, tok = f(x, g, E)
  ref_logits, ref_tok = lm_head_argmax(x, g, E, eps=EPS, impl="xla")
  _close(logits, ref_logits, D, "logits")
  assert int(tok) == int(ref_tok) == int(jnp.argmax(logits))
  # An exact tie between two blocks (rows 300 and 100) and inside a block (rows 100, 101):
  # the lowest index wins, as in jnp.argmax.
  top = 10.0 * (x * g) / jnp.linalg.norm(x * g)
  E2 = E.at[300].set(top).at[100].set(top).at[101].set(top)
  _, tok2 = f(x, g, E2)
  assert int(tok2) == 100 == int(lm_head_argmax(x, g, E2, eps=EPS, impl="xla")[1])


# ------------------------------------------------------- RoPE + cache append

ATTN_SHAPES = [  # (Hq, Hkv, Dh): GQA ratio 1 and 4, head dims 64 and 128
    (4, 4, 64), (16, 4, 64), (2, 2, 128), (8, 2, 128)]


@pytest.mark.parametrize("Hq,Hkv,Dh", ATTN_SHAPES)
def test_rope_append(Hq, Hkv, Dh):
  S = 96
  k = _keys(4, 3)
  qkv = jax.random.normal(k[0], ((Hq + 2 * Hkv) * Dh,))
  kc = jax.random.normal(k[1], (Hkv, S, Dh))
  vc = jax.random.normal(k[2], (Hkv, S, Dh))
  inv, af = rope_frequencies(Dh, 10000.0, None)
  f = jax.jit(functools.partial(rope_append, n_heads=Hq, n_kv_heads=Hkv, impl="pallas"))
  r = jax.jit(functools.partial(rope_append, n_heads=Hq, n_kv_heads=Hkv, impl="xla"))
  for pos in (0, 37, S - 1):
    cos, sin = (a[0, 0] for a in rope_cos_sin(jnp.array([[pos]]), inv, af))
    out = f(qkv, cos, sin, kc, vc, jnp.int32(pos))
    ref = r(qkv, cos, sin, kc, vc, jnp.int32(pos))
    _close(out[0], ref[0], 2, "q")
    _close(out[1], ref[1], 2, "k_cache")
    np.testing.assert_array_equal(np.asarray(out[2]), np.asarray(ref[2]))
    others = np.arange(S) != pos
    np.testing.assert_array_equal(np.asarray(out[1])[:, others], np.asarray(kc)[:, others])
  # Any cos/sin (not only rope_cos_sin's, whose two halves are equal).
  cos, sin = jax.random.normal(k[0], (Dh,)), jax.random.normal(k[1], (Dh,))
  out = f(qkv, cos, sin, kc, vc, jnp.int32(3))
  ref = r(qkv, cos, sin, kc, vc, jnp.int32(3))
  _close(out[0], ref[0], 2, "q (general cos/sin)")


@pytest.mark.parametrize("write", ["select", "scatter", "kernel"])
def test_rope_append_position_outside_cache(write):
  """write="kernel" (Pallas' default): the kernel's own in-place row write."""
  Hq, Hkv, Dh, S = 4, 4, 64, 32
  qkv = jnp.ones(((Hq + 2 * Hkv) * Dh,))
  kc = jnp.zeros((Hkv, S, Dh))
  cos, sin = jnp.ones((Dh,)), jnp.zeros((Dh,))
  for impl in ("pallas",) if write == "kernel" else ("xla", "pallas"):
    with pytest.raises(ValueError, match="pos=32"):
      rope_append(qkv, cos, sin, kc, kc, 32, n_heads=Hq, n_kv_heads=Hkv, impl=impl, write=write)
    # Traced positions cannot raise: an out-of-range write (past the end or negative)
    # leaves the cache unchanged; an in-range one writes exactly its slot.
    f = jax.jit(functools.partial(rope_append, n_heads=Hq, n_kv_heads=Hkv, impl=impl,
                                  write=write))
    for bad in (S, S + 5, -1):
      _, k2, v2 = f(qkv, cos, sin, kc, kc, jnp.int32(bad))
      np.testing.assert_array_equal(np.asarray(k2), np.asarray(kc))
      np.testing.assert_array_equal(np.asarray(v2), np.asarray(kc))
    _, k2, v2 = f(qkv, cos, sin, kc, kc, jnp.int32(S - 1))
    written = np.zeros((S,), bool)
    written[S - 1] = True
    assert np.all(np.asarray(k2)[:, written] == 1) and np.all(np.asarray(k2)[:, ~written] == 0)
    assert np.all(np.asarray(v2)[:, written] == 1) and np.all(np.asarray(v2)[:, ~written] == 0)
  with pytest.raises(ValueError, match="unknown write 'copy'"):
    rope_append(qkv, cos, sin, kc, kc, 0, n_heads=Hq, n_kv_heads=Hkv, impl="xla", write="copy")
  with pytest.raises(ValueError, match="unknown write 'kernel' for impl='xla'"):
    rope_append(qkv, cos, sin, kc, kc, 0, n_heads=Hq, n_kv_heads=Hkv, impl="xla", write="kernel")
  with pytest.raises(ValueError, match="write='kernel' needs the caches in qkv's dtype"):
    rope_append(qkv.astype(jnp.bfloat16), cos, sin, kc, kc, 0, n_heads=Hq, n_kv_heads=Hkv,
                impl="pallas")


# ---------------------------------------------------------- decode attention


@pytest.mark.parametrize("Hq,Hkv,Dh", ATTN_SHAPES)
def test_decode_attention(Hq, Hkv, Dh):
  S, BS = 192, 64
  k = _keys(5, 3)
  q = jax.random.normal(k[0], (Hq, Dh))
  kc = jax.random.normal(k[1], (Hkv, S, Dh))
  vc = jax.random.normal(k[2], (Hkv, S, Dh))
  f = jax.jit(functools.partial(decode_attention, scale=Dh ** -0.5, impl="pallas", block_s=BS,
                                num_splits=2))
  r = jax.jit(functools.partial(decode_attention, scale=Dh ** -0.5, impl="xla"))
  for L in (1, 63, 64, 77, 150, 192):  # one slot, partial blocks, block ends, full cache
    nan = jnp.arange(S)[None, :, None] >= L
    kn, vn = jnp.where(nan, jnp.nan, kc), jnp.where(nan, jnp.nan, vc)
    out = f(q, kn, vn, jnp.int32(L))
    ref = r(q, kc, vc, jnp.int32(L))
    _close(out, ref, L * Dh, f"attention L={L}")
    np.testing.assert_array_equal(np.asarray(r(q, kn, vn, jnp.int32(L))), np.asarray(ref))


@pytest.mark.parametrize("Dh,block_d,block_g", [(128, 32, 4), (128, 128, 1), (64, 32, 2)])
def test_decode_attention_chunks_and_head_groups(Dh, block_d, block_g):
  """Head-dim chunks (block_d) and query heads per CTA (block_g) change only the order of
  the work: the reference's output, NaN past the live length harmless."""
  Hq, Hkv, S, L = 8, 2, 192, 150
  k = _keys(9, 3)
  q = jax.random.normal(k[0], (Hq, Dh))
  tail = jnp.arange(S)[None, :, None] >= L
  kc = jax.random.normal(k[1], (Hkv, S, Dh))
  vc = jax.random.normal(k[2], (Hkv, S, Dh))
  out = decode_attention(q, jnp.where(tail, jnp.nan, kc), jnp.where(tail, jnp.nan, vc), L,
                         scale=Dh ** -0.5, impl="pallas", block_s=64, num_splits=2,
                         block_d=block_d, block_g=block_g)
  _close(out, decode_attention(q, kc, vc, L, scale=Dh ** -0.5, impl="xla"), L * Dh,
         f"block_d={block_d} block_g={block_g}")


def test_decode_attention_blocks_are_checked():
  from kernels.path_decode_attention import path_decode_attention
  q, kc = jnp.zeros((8, 64)), jnp.zeros((2, 64, 64))
  with pytest.raises(ValueError, match="block_g=3 must divide the 4 query heads"):
    decode_attention(q, kc, kc, 5, scale=1.0, impl="pallas", block_g=3)
  with pytest.raises(ValueError, match="with PaTH's key update, be all of them"):
    path_decode_attention(q, kc, kc, jnp.ones((2, 64)), jnp.ones(2), 5, scale=1.0,
                          impl="pallas", block_g=2)
  with pytest.raises(ValueError, match="block for Dh .head dim.: 12"):
    decode_attention(q, kc, kc, 5, scale=1.0, impl="pallas", block_d=12)


def test_decode_attention_partials_and_merge():
  """The kernel's (m, l, o) partials against direct per-split sums; empty splits."""
  Hq, Hkv, Dh, S, BS, P, L = 8, 2, 64, 256, 64, 4, 150   # 3 live blocks over 4 splits
  k = _keys(6, 3)
  q = jax.random.normal(k[0], (Hq, Dh))
  kc = jax.random.normal(k[1], (Hkv, S, Dh))
  vc = jax.random.normal(k[2], (Hkv, S, Dh))
  scale = Dh ** -0.5
  o, m, l = jax.jit(functools.partial(attn_pallas.partials, scale=scale, mode="hlo", block_s=BS,
                                      num_splits=P))(q, kc, vc, jnp.int32(L))
  qg = np.asarray(q, np.float64).reshape(Hkv, Hq // Hkv, Dh) * scale
  s = np.einsum("kgd,ksd->kgs", qg, np.asarray(kc, np.float64))
  ranges = [(0, 64), (64, 128), (128, 150), (150, 150)]  # ceil(3 / 4) = 1 block per split
  for p, (a, b) in enumerate(ranges):
    if a == b:
      assert np.all(np.isneginf(np.asarray(m)[p])) and np.all(np.asarray(l)[p] == 0)
      continue
    mp = s[..., a:b].max(-1)
    e = np.exp(s[..., a:b] - mp[..., None])
    np.testing.assert_allclose(np.asarray(m)[p], mp, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(l)[p], e.sum(-1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(o)[p],
                               np.einsum("kgs,ksd->kgd", e, np.asarray(vc, np.float64)[:, a:b]),
                               rtol=1e-4, atol=1e-5)
  merged = attn_ref.merge_splits(o, m, l).reshape(Hq, Dh)
  _close(merged, decode_attention(q, kc, vc, L, scale=scale, impl="xla"), L * Dh, "merge")


# ------------------------------------------------------------ PaTH key update


@pytest.mark.parametrize("Dh", [64, 128])
def test_path_key_update(Dh):
  Hkv, S, BS = 2, 192, 64
  k = _keys(7, 3)
  kc = jax.random.normal(k[0], (Hkv, S, Dh))
  w = jax.random.normal(k[1], (Hkv, Dh))
  w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
  beta = jax.random.uniform(k[2], (Hkv,), minval=1.5, maxval=2.0)
  f = jax.jit(functools.partial(path_key_update, impl="pallas", block_s=BS, num_splits=2))
  r = jax.jit(functools.partial(path_key_update, impl="xla"))
  for L in (1, 100, 192):
    kn = jnp.where(jnp.arange(S)[None, :, None] >= L, jnp.nan, kc)
    out = np.asarray(f(kn, w, beta, jnp.int32(L)))[:, :L]
    ref = r(kc, w, beta, jnp.int32(L))[:, :L]
    _close(out, ref, Dh, f"path L={L}")
  # The update is the Householder-like map: it scales the w-component by (1 - beta).
  ref = path_key_update(kc, w, beta, S, impl="xla")
  np.testing.assert_allclose(np.einsum("ksd,kd->ks", ref, w),
                             (1 - beta[:, None]) * np.einsum("ksd,kd->ks", kc, w), atol=1e-5)


def test_path_key_update_bf16_accumulates_in_fp32():
  Hkv, S, Dh = 2, 64, 64
  k = _keys(8, 3)
  kc = jax.random.normal(k[0], (Hkv, S, Dh)).astype(jnp.bfloat16)
  w = jax.random.normal(k[1], (Hkv, Dh))
  w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
  beta = jnp.full((Hkv,), 1.9)
  out = path_key_update(kc, w, beta, S, impl="pallas", block_s=64)
  ref = path_key_update(kc, w, beta, S, impl="xla")
  assert out.dtype == jnp.bfloat16
  # Both accumulate in fp32 and round once: at most one bf16 ulp apart.
  assert_rel_close(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                   rtol=tol(jnp.bfloat16, 1, factor=1.0), name="path bf16")


# ------------------------------------------------ PaTH fused decode attention


@pytest.mark.parametrize("Dh,G", [(64, 1), (128, 4)])
def test_path_decode_attention(Dh, G):
  """Fused key update + attention = the reference composition, for outputs and the live
  keys; the new key (slot length - 1) is not transformed; NaN past length is harmless."""
  from kernels.path_decode_attention import path_decode_attention
  Hkv, S, BS = 2, 192, 64
  k = _keys(21, 5)
  kc = jax.random.normal(k[0], (Hkv, S, Dh))
  vc = jax.random.normal(k[1], (Hkv, S, Dh))
  q = jax.random.normal(k[2], (Hkv * G, Dh))
  w = jax.random.normal(k[3], (Hkv, Dh))
  w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
  beta = jax.random.uniform(k[4], (Hkv,), minval=0.5, maxval=1.9)
  f = jax.jit(functools.partial(path_decode_attention, scale=Dh ** -0.5, impl="pallas",
                                block_s=BS, num_splits=2))
  r = jax.jit(functools.partial(path_decode_attention, scale=Dh ** -0.5, impl="xla"))
  for L in (1, 63, 65, 150, 192):
    tail = jnp.arange(S)[None, :, None] >= L
    o, kn = f(q, jnp.where(tail, jnp.nan, kc), jnp.where(tail, jnp.nan, vc), w, beta,
              jnp.int32(L))
    o_r, k_r = r(q, kc, vc, w, beta, jnp.int32(L))
    _close(o, o_r, L * Dh, f"o L={L}")
    _close(np.asarray(kn)[:, :L], np.asarray(k_r)[:, :L], Dh, f"keys L={L}")
    np.testing.assert_array_equal(np.asarray(kn)[:, L - 1], np.asarray(kc)[:, L - 1])
  # = path_key_update on the older slots, then decode_attention
  L = 150
  older = path_key_update(kc, w, beta, L - 1, impl="xla")
  k2 = jnp.where(jnp.arange(S)[None, :, None] < L - 1, older, kc)
  _close(r(q, kc, vc, w, beta, jnp.int32(L))[0],
         decode_attention(q, k2, vc, L, scale=Dh ** -0.5, impl="xla"), L * Dh, "composition")
  with pytest.raises(ValueError, match="w_KD"):
    path_decode_attention(q, kc, vc, w[:1], beta, 5, scale=1.0, impl="xla")
  with pytest.raises(ValueError, match="'triton'"):
    path_decode_attention(q, kc, vc, w, beta, 5, scale=1.0, impl="triton")


# ------------------------------------------- forget-gate score bias (FoX, PaTH-FoX)


@pytest.mark.parametrize("path,Hq,Hkv,Dh", [(False, 6, 2, 64), (False, 4, 4, 128),
                                            (True, 8, 2, 64), (True, 4, 1, 128)])
def test_attention_with_gate_bias(path, Hq, Hkv, Dh):
  """scores = scale q.k + bias [Hq, S]: Pallas = reference over lengths that are not block
  multiples, with NaN in every key, value and bias slot past the live length; the
  reference = a float64 softmax written out here."""
  from kernels.path_decode_attention import path_decode_attention
  S, BS = 192, 64
  k = _keys(23, 6)
  q = jax.random.normal(k[0], (Hq, Dh))
  kc = jax.random.normal(k[1], (Hkv, S, Dh))
  vc = jax.random.normal(k[2], (Hkv, S, Dh))
  # G_t - G_j of log-sigmoid gates: 0 at the newest slot, decreasing into the past
  g = jax.nn.log_sigmoid(jax.random.normal(k[3], (Hq, S)) + 1.0)
  w = jax.random.normal(k[4], (Hkv, Dh))
  w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
  beta = jax.random.uniform(k[5], (Hkv,), minval=0.5, maxval=1.9)
  scale = Dh ** -0.5
  if path:
    op = lambda q, kc, vc, n, bias, **kw: path_decode_attention(q, kc, vc, w, beta, n,
                                                                bias_HS=bias, **kw)
  else:
    op = lambda q, kc, vc, n, bias, **kw: decode_attention(q, kc, vc, n, bias_HS=bias, **kw)
  f = jax.jit(functools.partial(op, scale=scale, impl="pallas", block_s=BS, num_splits=2))
  r = jax.jit(functools.partial(op, scale=scale, impl="xla"))
  for L in (1, 63, 77, 192):
    live = jnp.arange(S) < L
    bias = scale * jnp.where(live, jnp.cumsum(g[:, ::-1], axis=1)[:, ::-1] - g, 0.0)
    bias = bias - bias[:, L - 1:L]   # newest slot: 0
    nan = ~live[None, :, None]
    out = f(q, jnp.where(nan, jnp.nan, kc), jnp.where(nan, jnp.nan, vc), jnp.int32(L),
            jnp.where(live, bias, jnp.nan))
    ref = r(q, kc, vc, jnp.int32(L), bias)
    o, o_r = (out[0], ref[0]) if path else (out, ref)
    _close(o, o_r, L * Dh, f"biased attention L={L}")
    if path:
      _close(np.asarray(out[1])[:, :L], np.asarray(ref[1])[:, :L], Dh, f"keys L={L}")
    # the reference against a float64 softmax over its own (updated) keys
    keys = np.asarray(ref[1] if path else kc, np.float64)[:, :L]
    qg = np.asarray(q, np.float64).reshape(Hkv, Hq // Hkv, Dh)
    s = scale * np.einsum("kgd,ksd->kgs", qg, keys) + np.asarray(
        bias, np.float64)[:, :L].reshape(Hkv, Hq // Hkv, L)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    oracle = np.einsum("kgs,ksd->kgd", p, np.asarray(vc, np.float64)[:, :L]).reshape(Hq, Dh)
    _close(o_r, oracle, L * Dh, f"reference vs float64 L={L}")
  # the bias changes the output (the test would notice a kernel that ignores it)
  L = 150
  biased, plain = r(q, kc, vc, jnp.int32(L), bias), r(q, kc, vc, jnp.int32(L), jnp.zeros_like(bias))
  if path:
    biased, plain = biased[0], plain[0]
  assert float(jnp.max(jnp.abs(biased - plain))) > 1e-2
  with pytest.raises(ValueError, match="bias_HS"):
    op(q, kc, vc, 5, bias[:, :5], scale=1.0, impl="xla")


@pytest.mark.parametrize("path,Hq,Hkv,Dh", [(False, 6, 2, 64), (False, 4, 4, 128),
                                            (True, 8, 2, 64), (True, 4, 1, 128)])
def test_attention_updates_the_gate(path, Hq, Hkv, Dh):
  """gate_HS, g_H: the op updates the forget gate's row itself (older slots + g_t, the new
  slot 0) and adds scale * it to the scores. Pallas = reference for o and, bit for bit, the
  live gate slots, with NaN past the live length in keys, values and gate; the reference
  = gate_update by hand, then the bias form."""
  from kernels.path_decode_attention import path_decode_attention
  S, BS = 192, 64
  k = _keys(24, 6)
  q = jax.random.normal(k[0], (Hq, Dh))
  kc = jax.random.normal(k[1], (Hkv, S, Dh))
  vc = jax.random.normal(k[2], (Hkv, S, Dh))
  gate = -jnp.abs(jax.random.normal(k[3], (Hq, S))) * jnp.arange(S, 0, -1) / 16
  g = jax.nn.log_sigmoid(jax.random.normal(k[4], (Hq,)))
  w = jax.random.normal(k[5], (Hkv, Dh))
  w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
  beta = jnp.linspace(0.5, 1.9, Hkv)
  scale = Dh ** -0.5

  def op(q, kc, vc, n, **kw):   # -> (o, keys, gate)
    if path:
      return path_decode_attention(q, kc, vc, w, beta, n, **kw)
    out = decode_attention(q, kc, vc, n, **kw)
    return (out[0], kc, out[1]) if isinstance(out, tuple) else (out, kc, None)

  f = jax.jit(functools.partial(op, scale=scale, impl="pallas", block_s=BS, num_splits=2))
  r = jax.jit(functools.partial(op, scale=scale, impl="xla"))
  for L in (1, 63, 64, 77, 192):
    live = jnp.arange(S) < L
    nan = ~live[None, :, None]
    o, keys, gn = f(q, jnp.where(nan, jnp.nan, kc), jnp.where(nan, jnp.nan, vc), jnp.int32(L),
                    gate_HS=jnp.where(live, gate, jnp.nan), g_H=g)
    o_r, keys_r, gn_r = r(q, kc, vc, jnp.int32(L), gate_HS=gate, g_H=g)
    _close(o, o_r, L * Dh, f"o L={L}")
    np.testing.assert_array_equal(np.asarray(gn)[:, :L], np.asarray(gn_r)[:, :L])
    if path:
      _close(np.asarray(keys)[:, :L], np.asarray(keys_r)[:, :L], Dh, f"keys L={L}")
    # the reference's gate by hand, then its output = the bias form over that gate
    by_hand = np.asarray(gate).copy()
    by_hand[:, :L - 1] += np.asarray(g)[:, None]
    by_hand[:, L - 1] = 0.0
    np.testing.assert_array_equal(np.asarray(gn_r), by_hand)
    o_b = r(q, kc, vc, jnp.int32(L), bias_HS=scale * jnp.asarray(by_hand))[0]
    np.testing.assert_array_equal(np.asarray(o_r), np.asarray(o_b))
  # g_t changes the output (a kernel that skipped the update would be caught)
  L = 150
  o0 = r(q, kc, vc, jnp.int32(L), gate_HS=gate, g_H=jnp.zeros_like(g))[0]
  assert float(jnp.max(jnp.abs(o_r - o0))) > 1e-3
  with pytest.raises(ValueError, match="go together"):
    op(q, kc, vc, 5, scale=1.0, impl="xla", gate_HS=gate)
  with pytest.raises(ValueError, match="go together"):
    op(q, kc, vc, 5, scale=1.0, impl="pallas", gate_HS=gate, g_H=g, bias_HS=gate)
  with pytest.raises(ValueError, match="g_H"):
    op(q, kc, vc, 5, scale=1.0, impl="xla", gate_HS=gate, g_H=g[:1])


# ------------------------------------------------------- log-linear decode


def _ll_inputs(T, H, L, dk, dv, seed=9):
  k = _keys(seed, 6)
  q = jax.random.normal(k[0], (T, H, dk))
  kk = jax.random.normal(k[1], (T, H, dk))
  kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
  v = jax.random.normal(k[2], (T, H, dv))
  lam = jax.nn.softplus(jax.random.normal(k[3], (T, H, L)))
  g = -jax.nn.softplus(jax.random.normal(k[4], (T, H)) - 1.0)
  beta = jax.nn.sigmoid(jax.random.normal(k[5], (T, H)))
  return q, kk, v, lam, g, beta


@pytest.mark.parametrize("variant,split_levels", [("mamba2", True), ("gdn", True),
                                                  ("mamba2", False), ("gdn", False)])
def test_log_linear_state_update(variant, split_levels):
  """Both kernel forms: one CTA per level (the level z + 1 CTA also reads 0..z) and one
  per column block streaming the levels."""
  T, H, L, dk, dv = 15, 2, 5, 64, 64      # t = 0..14 uses every level of L = 5
  q, k, v, lam, g, beta = _ll_inputs(T, H, L, dk, dv)
  gdn = variant == "gdn"
  kern = jax.jit(functools.partial(log_linear_state_update, variant=variant, impl="pallas",
                                   block_v=32, split_levels=split_levels))
  ref = jax.jit(functools.partial(log_linear_state_update, variant=variant, impl="xla"))
  S_ref = S_ker = jnp.zeros((H, L, dk, dv))
  flat = np.zeros((H, dk, dv))
  outs_ref, outs_ker = [], []
  for t in range(T):
    b = beta[t] if gdn else None
    o_r, S_ref = ref(S_ref, jnp.int32(t), q[t], k[t], v[t], lam[t], g[t], b)
    o_k, S_ker = kern(S_ker, jnp.int32(t), q[t], k[t], v[t], lam[t], g[t], b)
    outs_ref.append(o_r)
    outs_ker.append(o_k)
    _close(S_ker, S_ref, L, f"state t={t}")
    if gdn:  # the ordinary GDN state, S <- a (I - beta k k^T) S + beta k v^T
      a, bb, kt = np.exp(np.asarray(g[t])), np.asarray(beta[t]), np.asarray(k[t], np.float64)
      flat = a[:, None, None] * (flat - bb[:, None, None] * kt[:, :, None]
                                 * np.einsum("hk,hkv->hv", kt, flat)[:, None, :])
      flat = flat + bb[:, None, None] * kt[:, :, None] * np.asarray(v[t])[:, None, :]
      # Invariant: the levels sum to the ordinary state.
      np.testing.assert_allclose(np.asarray(S_ref).sum(1), flat, rtol=1e-5, atol=1e-5)
  outs_ref, outs_ker = np.stack(outs_ref), np.stack(outs_ker)
  _close(outs_ker, outs_ref, L * dk, "o")
  if not gdn:  # the materialized parallel form (QK^T * M^S * M^H) V
    par = np.stack([ll_ref.mamba2_parallel(q[:, h], k[:, h], v[:, h], lam[:, h], g[:, h])
                    for h in range(H)], 1)
    _close(outs_ref, par, T * dk, "parallel form")


@pytest.mark.parametrize("variant,fenwick", [("mamba2", True), ("gdn", True), ("gdn", False)])
def test_log_linear_commit_false_keeps_the_state(variant, fenwick):
  """commit=False (traced): the state comes back exactly as it went in, both impls and
  both kernel forms, while commit=True changes it: the decode driver's step past the end
  of the cache, no branch."""
  H, L, dk, dv = 2, (4 if fenwick else 1), 64, 64
  q, k, v, lam, g, beta = _ll_inputs(1, H, L, dk, dv, seed=11)
  S = jax.random.normal(jax.random.key(12), (H, L, dk, dv))
  b = beta[0] if variant == "gdn" else None
  for impl, kw in (("xla", {}), ("pallas", {}), ("pallas", dict(split_levels=False))):
    f = jax.jit(functools.partial(log_linear_state_update, variant=variant, impl=impl,
                                  fenwick=fenwick, **kw))
    _, kept = f(S, jnp.int32(6), q[0], k[0], v[0], lam[0], g[0], b, commit=jnp.bool_(False))
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(S), err_msg=impl)
    _, new = f(S, jnp.int32(6), q[0], k[0], v[0], lam[0], g[0], b, commit=jnp.bool_(True))
    assert float(jnp.max(jnp.abs(new - S))) > 1e-3, impl


@pytest.mark.parametrize("path", [False, True])
def test_attention_commit_false_keeps_the_caches(path):
  """commit=False (traced): PaTH's keys and the forget gate's row come back exactly as they
  went in, every slot (finite values past the live length, so a kernel that wrote only
  the live blocks of its fresh outputs would be caught), both impls; commit=True changes
  them."""
  from kernels.path_decode_attention import path_decode_attention
  Hq, Hkv, S, Dh, L = 4, 2, 192, 64, 77
  k = _keys(25, 5)
  kc = jax.random.normal(k[0], (Hkv, S, Dh))
  vc = jax.random.normal(k[1], (Hkv, S, Dh))
  gate = -jnp.abs(jax.random.normal(k[2], (Hq, S)))
  g = jax.nn.log_sigmoid(jax.random.normal(k[3], (Hq,)))
  q = jax.random.normal(k[4], (Hq, Dh))
  w = jnp.ones((Hkv, Dh)) / Dh ** 0.5
  beta = jnp.full((Hkv,), 1.5)
  for impl in ("xla", "pallas"):
    opts = dict(block_s=64, num_splits=2) if impl == "pallas" else {}

    @jax.jit
    def caches(commit, impl=impl, opts=opts):   # -> (keys, gate row), commit traced
      kw = dict(scale=Dh ** -0.5, impl=impl, gate_HS=gate, g_H=g, commit=commit, **opts)
      if path:
        return path_decode_attention(q, kc, vc, w, beta, L, **kw)[1:]
      return kc, decode_attention(q, kc, vc, L, **kw)[1]

    keys, row = caches(jnp.bool_(False))
    np.testing.assert_array_equal(np.asarray(keys), np.asarray(kc), err_msg=f"keys {impl}")
    np.testing.assert_array_equal(np.asarray(row), np.asarray(gate), err_msg=f"gate {impl}")
    keys, row = caches(jnp.bool_(True))
    assert np.any(np.asarray(row)[:, :L] != np.asarray(gate)[:, :L]), impl
    if path:
      assert float(jnp.max(jnp.abs(keys[:, :L - 1] - kc[:, :L - 1]))) > 1e-3, impl


def test_log_linear_level_overflow():
  H, L, dk, dv = 1, 3, 64, 32
  S = jnp.zeros((H, L, dk, dv))
  args = (jnp.ones((H, dk)), jnp.ones((H, dk)), jnp.ones((H, dv)), jnp.ones((H, L)),
          jnp.zeros((H,)))
  for impl in ("xla", "pallas"):
    with pytest.raises(ValueError, match="t=4"):
      log_linear_state_update(S, 4, *args, variant="mamba2", impl=impl)
    f = jax.jit(functools.partial(log_linear_state_update, variant="mamba2", impl=impl))
    assert np.all(np.isnan(np.asarray(f(S, jnp.int32(4), *args)[0])))
    assert np.all(np.isfinite(np.asarray(f(S, jnp.int32(3), *args)[0])))
  # the plain recurrence (fenwick=False) has one state and no capacity limit
  one = (jnp.ones((H, dk)), jnp.ones((H, dk)), jnp.ones((H, dv)), jnp.ones((H, 1)),
         jnp.zeros((H,)))
  for impl in ("xla", "pallas"):
    o, S1 = log_linear_state_update(jnp.ones((H, 1, dk, dv)), 10 ** 6, *one, variant="mamba2",
                                    impl=impl, fenwick=False)
    # decay 1: the old all-ones state plus k v^T = 2 everywhere; o = sum over dk of 2 * q
    np.testing.assert_array_equal(np.asarray(S1), 2.0)
    np.testing.assert_allclose(np.asarray(o), 2.0 * dk)
    with pytest.raises(ValueError, match="fenwick=False runs one state"):
      log_linear_state_update(S, 0, *args, variant="mamba2", impl=impl, fenwick=False)


# ------------------------------------------------------------ API contracts


def test_unknown_impl_and_bad_arguments():
  x = jnp.ones((64,))
  with pytest.raises(ValueError, match="'triton'"):
    rmsnorm_qkv(x, x, jnp.ones((64, 64)), eps=EPS, impl="triton")
  with pytest.raises(ValueError, match="'cuda'"):
    decode_attention(jnp.ones((2, 64)), jnp.ones((2, 8, 64)), jnp.ones((2, 8, 64)), 3,
                     scale=1.0, impl="cuda")
  with pytest.raises(ValueError, match="w_t_ND"):
    rmsnorm_qkv(x, x, jnp.ones((64, 32)), eps=EPS, impl="xla")
  with pytest.raises(ValueError, match="length=9"):
    decode_attention(jnp.ones((2, 64)), jnp.ones((2, 8, 64)), jnp.ones((2, 8, 64)), 9,
                     scale=1.0, impl="xla")
  with pytest.raises(ValueError, match="variant"):
    log_linear_state_update(jnp.zeros((1, 2, 64, 8)), 0, jnp.ones((1, 64)), jnp.ones((1, 64)),
                            jnp.ones((1, 8)), jnp.ones((1, 2)), jnp.zeros((1,)),
                            variant="mamba3", impl="xla")
  with pytest.raises(ValueError, match="interpret"):
    out_proj_residual(x, jnp.ones((64, 64)), x, impl="pallas", interpret="triton")
  with pytest.raises(ValueError, match="multiple of 64"):
    rmsnorm_qkv(x, x, jnp.ones((96, 64)), eps=EPS, impl="pallas")


def test_kernel_launches_are_keyed_on_every_option():
  """Each op's kernel is traced once per configuration and reused: a launch with another
  option (eps here), or the same value as another type, must not reuse it."""
  from kernels import _common as C
  D, N = 128, 64
  k = _keys(7, 3)
  x = 3.0 * jax.random.normal(k[0], (D,))
  g = 1.0 + 0.2 * jax.random.normal(k[1], (D,))
  w = jax.random.normal(k[2], (N, D)) / np.sqrt(D)
  outs = []
  for eps in (EPS, 1e3, EPS):
    out = rmsnorm_qkv(x, g, w, eps=eps, impl="pallas", block_n=64, block_k=64)
    _close(out, rmsnorm_qkv(x, g, w, eps=eps, impl="xla"), D, f"rmsnorm_qkv eps={eps}")
    outs.append(np.asarray(out))
  assert np.abs(outs[0] - outs[1]).max() > 0.1 * np.abs(outs[0]).max()
  np.testing.assert_array_equal(outs[0], outs[2])
  keys = {C.freeze(v) for v in (1, 1.0, True, (1,), [1], {"a": 1})}
  assert len(keys) == 5                      # (1,) and [1] are the same option
  assert C.thaw(C.freeze({"a": [1, (2.0, "s")]})) == {"a": (1, (2.0, "s"))}
  with pytest.raises(TypeError, match="rmsnorm_qkv: block_n is an array"):
    rmsnorm_qkv(x, g, w, eps=EPS, impl="pallas", block_n=jnp.int32(64))


def test_pallas_forms_are_inference_only():
  x = jnp.ones((64,))
  w = jnp.ones((64, 64))
  with pytest.raises(TypeError, match="inference-only"):
    jax.grad(lambda x: jnp.sum(out_proj_residual(x, w, x, impl="pallas")))(x)
  g = jax.grad(lambda x: jnp.sum(out_proj_residual(x, w, x, impl="xla")))(x)
  np.testing.assert_allclose(np.asarray(g), 65.0)
