"""Each decode kernel, exactly as written for the GPU (SMEM staging, TMA copies,
barriers, emit_pipeline), in the Mosaic-GPU interpreter on CPU: uninitialized
SMEM is NaN and out-of-bounds reads raise, so a wrong index map, a missed
barrier or a read past the live cache shows up here. One small multi-block
config per kernel (this interpreter is slow); test_kernels_ops.py covers the
shape matrix with the fast HLO interpreter."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.testing import assert_rel_close, tol
from kernels.decode_attention import decode_attention
from kernels.lm_head_argmax import lm_head_argmax
from kernels.log_linear_state import log_linear_state_update
from kernels.out_proj_residual import out_proj_residual
from kernels.path_key_update import path_key_update
from kernels.rmsnorm_qkv import rmsnorm_qkv
from kernels.rmsnorm_swiglu import rmsnorm_swiglu
from kernels.rope_append import rope_append

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(jax.default_backend() != "cpu", reason="interpreter test (CPU only)"),
]
M = "mosaic"
EPS = 1e-6


def _close(out, ref, n, name):
  assert_rel_close(np.asarray(out), np.asarray(ref), rtol=tol(jnp.float32, n), name=name)


def _r(seed, *shape):
  return jax.random.normal(jax.random.key(seed), shape)


def test_gemv_kernels_mosaic():
  D, N, F, V = 128, 192, 128, 256
  x, g = _r(0, D), 1.0 + 0.1 * _r(1, D)
  w = _r(2, N, D) / 11
  for split in (1, 2):                 # fused epilogue; split-K partials
    _close(rmsnorm_qkv(x, g, w, _r(3, N), eps=EPS, impl="pallas", interpret=M, block_n=64,
                       block_k=64, split_k=split),
           rmsnorm_qkv(x, g, w, _r(3, N), eps=EPS, impl="xla"), D, f"qkv split {split}")
  wo = _r(4, D, N) / 14
  _close(out_proj_residual(_r(5, N), wo, x, impl="pallas", interpret=M, block_n=64, block_k=64,
                           split_k=3),
         out_proj_residual(_r(5, N), wo, x, impl="xla"), N, "oproj")
  wg, wu, wd = _r(6, F, D) / 11, _r(7, F, D) / 11, _r(8, F, D) / 11
  for once in (False, True):          # a store per down step; one SMEM row, one store
    _close(rmsnorm_swiglu(x, g, wg, wu, wd, eps=EPS, impl="pallas", interpret=M, block_f=64,
                          block_k=64, block_d=64, store_once=once),
           rmsnorm_swiglu(x, g, wg, wu, wd, eps=EPS, impl="xla"), F, f"mlp store_once={once}")
    _close(rmsnorm_swiglu(x, g, wg, wu, w_down_t_DF=wd.T, eps=EPS, impl="pallas", interpret=M,
                          block_f=64, block_k=64, block_d=64, store_once=once),
           rmsnorm_swiglu(x, g, wg, wu, wd, eps=EPS, impl="xla"), F,
           f"mlp w_down_t_DF store_once={once}")
  E = _r(9, V, D) / 11
  lg, tk = lm_head_argmax(x, g, E, eps=EPS, impl="pallas", interpret=M, block_n=64)
  lr, tr = lm_head_argmax(x, g, E, eps=EPS, impl="xla")
  _close(lg, lr, D, "logits")
  assert int(tk) == int(tr)


def test_int8_gemv_kernels_mosaic():
  """int8 weights through TMA (int8 SMEM tiling) with the per-row scale in the kernel
  (one pass), in the XLA epilogue (split-K) and in the MLP (gate/up in-kernel, down in
  the epilogue)."""
  from kernels.quant import quantize_int8
  D, N, F, V = 128, 192, 128, 256
  x, g = _r(0, D), 1.0 + 0.1 * _r(1, D)
  q, s = quantize_int8(_r(2, N, D) / 11, axis=1)
  for split in (1, 2):
    _close(rmsnorm_qkv(x, g, q, eps=EPS, impl="pallas", interpret=M, w_scale_N=s, block_n=64,
                       block_k=64, split_k=split),
           rmsnorm_qkv(x, g, q, eps=EPS, impl="xla", w_scale_N=s), D, f"int8 qkv split {split}")
  (qg, sg), (qu, su), (qd, sd) = (quantize_int8(_r(i, F, D) / 11, axis=a)
                                  for i, a in ((6, 1), (7, 1), (8, 0)))
  sc = dict(w_gate_scale_F=sg, w_up_scale_F=su, w_down_scale_D=sd)
  for once in (False, True):
    _close(rmsnorm_swiglu(x, g, qg, qu, qd, eps=EPS, impl="pallas", interpret=M, block_f=64,
                          block_k=64, block_d=64, store_once=once, **sc),
           rmsnorm_swiglu(x, g, qg, qu, qd, eps=EPS, impl="xla", **sc), F,
           f"int8 mlp store_once={once}")
  qe, se = quantize_int8(_r(9, V, D) / 11, axis=1)
  lg, tk = lm_head_argmax(x, g, qe, eps=EPS, impl="pallas", interpret=M, w_scale_V=se,
                          block_n=64)
  lr, tr = lm_head_argmax(x, g, qe, eps=EPS, impl="xla", w_scale_V=se)
  _close(lg, lr, D, "int8 logits")
  assert int(tk) == int(tr)


def test_fused_ops_mosaic():
  """qkv_rope_append (GEMV partials -> finish + RoPE + in-place append) and out_proj_mlp
  (O partials finished in the MLP's x stream), fp32 and with int8 weights + bias."""
  from kernels.out_proj_mlp import out_proj_mlp
  from kernels.qkv_rope_append import qkv_rope_append
  from kernels.quant import quantize_int8
  Hq, Hkv, Dh, D, S, F = 8, 2, 64, 128, 128, 128
  N = (Hq + 2 * Hkv) * Dh
  x, g = _r(0, D), 1.0 + 0.1 * _r(1, D)
  kc, vc = _r(2, Hkv, S, Dh), _r(3, Hkv, S, Dh)
  cos, sin = _r(4, Dh), _r(5, Dh)
  kw = dict(eps=EPS, n_heads=Hq, n_kv_heads=Hkv)
  for int8 in (False, True):
    w, ws = (_r(6, N, D) / 11, None) if not int8 else quantize_int8(_r(6, N, D) / 11, axis=1)
    b = _r(7, N) if int8 else None
    f = jax.jit(lambda p: qkv_rope_append(x, g, w, b, cos, sin, kc, vc, p, impl="pallas",
                                          interpret=M, w_scale_N=ws, block_k=64, split_k=2,
                                          **kw))
    out = f(jnp.int32(77))
    ref = qkv_rope_append(x, g, w, b, cos, sin, kc, vc, 77, impl="xla", w_scale_N=ws, **kw)
    for a, r, name in zip(out, ref, "qkv"):
      _close(a, r, D, f"fused {name} int8={int8}")
    k2, v2 = f(jnp.int32(S))[1:]            # outside the cache: nothing written
    np.testing.assert_array_equal(np.asarray(k2), np.asarray(kc))
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(vc))
  o, wo = _r(8, N), _r(9, D, N) / 14
  wg, wu, wd = _r(10, F, D) / 11, _r(11, F, D) / 11, _r(12, F, D) / 11
  blk = dict(o_block=dict(block_n=64, block_k=64, split_k=3), block_f=64, block_k=64,
             block_d=64)
  _close(out_proj_mlp(o, wo, x, g, wg, wu, wd, eps=EPS, impl="pallas", interpret=M, **blk),
         out_proj_mlp(o, wo, x, g, wg, wu, wd, eps=EPS, impl="xla"), N + F, "out_proj_mlp")
  (qo, so), (qg, sg), (qu, su), (qd, sd) = (quantize_int8(w, axis=a) for w, a in (
      (wo, 1), (wg, 1), (wu, 1), (wd, 0)))
  sc = dict(w_o_scale_D=so, w_gate_scale_F=sg, w_up_scale_F=su, w_down_scale_D=sd)
  _close(out_proj_mlp(o, qo, x, g, qg, qu, qd, eps=EPS, impl="pallas", interpret=M, **blk, **sc),
         out_proj_mlp(o, qo, x, g, qg, qu, qd, eps=EPS, impl="xla", **sc), N + F,
         "int8 out_proj_mlp")


def test_attention_out_mlp_mosaic():
  """The attention partials merged inside the O-projection GEMV (the (m, l) rows staged
  per CTA, the weights per block of heads), NaN past the live length, an empty split."""
  from kernels.attention_out_mlp import attention_out_mlp
  for Hq, Dh, bk in ((8, 64, 128), (4, 128, 64)):   # BK over two heads / half a head
    _attention_out_mlp_case(attention_out_mlp, Hq, Dh, bk)


def _attention_out_mlp_case(attention_out_mlp, Hq, Dh, bk):
  Hkv, S, L, D, F = 2, 256, 150, 128, 128
  q, kc, vc = _r(0, Hq, Dh), _r(1, Hkv, S, Dh), _r(2, Hkv, S, Dh)
  tail = jnp.arange(S)[None, :, None] >= L
  wo, x, g = _r(3, D, Hq * Dh) / 22, _r(4, D), 1.0 + 0.1 * _r(5, D)
  ws = [_r(6 + i, F, D) / 11 for i in range(3)]
  ref = attention_out_mlp(q, kc, vc, L, wo, x, g, *ws, scale=0.125, eps=EPS, impl="xla")
  out = attention_out_mlp(q, jnp.where(tail, jnp.nan, kc), jnp.where(tail, jnp.nan, vc), L, wo,
                          x, g, *ws, scale=0.125, eps=EPS, impl="pallas", interpret=M,
                          attn_block=dict(num_splits=4),
                          o_block=dict(block_n=64, block_k=bk, split_k=2), block_f=64,
                          block_k=64, block_d=64)
  _close(out, ref, L + Hq * Dh + F, f"attention_out_mlp Dh={Dh} block_k={bk}")


def test_rope_and_attention_mosaic():
  Hq, Hkv, Dh, S, L = 8, 2, 64, 192, 77
  qkv = _r(10, (Hq + 2 * Hkv) * Dh)
  kc, vc = _r(11, Hkv, S, Dh), _r(12, Hkv, S, Dh)
  cos, sin = jnp.cos(0.1 * jnp.arange(Dh)), jnp.sin(0.1 * jnp.arange(Dh))
  out = rope_append(qkv, cos, sin, kc, vc, 40, n_heads=Hq, n_kv_heads=Hkv, impl="pallas",
                    interpret=M)
  ref = rope_append(qkv, cos, sin, kc, vc, 40, n_heads=Hq, n_kv_heads=Hkv, impl="xla")
  for a, b, name in zip(out, ref, "qkv"):
    _close(a, b, 2, name)
  # The kernel's in-place row write skips a traced slot outside the cache.
  f = jax.jit(lambda p: rope_append(qkv, cos, sin, kc, vc, p, n_heads=Hq, n_kv_heads=Hkv,
                                    impl="pallas", interpret=M)[1:])
  for bad in (S, -1):
    k2, v2 = f(jnp.int32(bad))
    np.testing.assert_array_equal(np.asarray(k2), np.asarray(kc))
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(vc))
  nan = jnp.arange(S)[None, :, None] >= L
  kn, vn = jnp.where(nan, jnp.nan, kc), jnp.where(nan, jnp.nan, vc)
  o = decode_attention(_r(13, Hq, Dh), kn, vn, L, scale=0.125, impl="pallas", interpret=M,
                       block_s=64, num_splits=3)
  _close(o, decode_attention(_r(13, Hq, Dh), kc, vc, L, scale=0.125, impl="xla"), L * Dh,
         "attention")


def test_attention_fp32_keys_bf16_values_mosaic():
  """PaTH layers attend over fp32 keys and model-dtype values (separate SMEM tilings)."""
  Hq, Hkv, S, Dh, L = 4, 2, 128, 64, 90
  kc = _r(30, Hkv, S, Dh)
  vc = _r(31, Hkv, S, Dh).astype(jnp.bfloat16)
  q = _r(32, Hq, Dh)
  o = decode_attention(q, kc, vc, L, scale=0.125, impl="pallas", interpret=M, block_s=64,
                       num_splits=2)
  _close(o, decode_attention(q, kc, vc, L, scale=0.125, impl="xla"), L * Dh, "mixed dtypes")


def test_path_decode_attention_mosaic():
  """The fused PaTH key update + attention exactly as written (fp32 keys, bf16 values)."""
  from kernels.path_decode_attention import path_decode_attention
  Hq, Hkv, S, Dh, L = 4, 2, 192, 64, 130
  tail = jnp.arange(S)[None, :, None] >= L
  kc = jnp.where(tail, jnp.nan, _r(40, Hkv, S, Dh))
  vc = jnp.where(tail, jnp.nan, _r(41, Hkv, S, Dh)).astype(jnp.bfloat16)
  w = _r(42, Hkv, Dh)
  w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
  beta, q = jnp.array([0.7, 1.8]), _r(43, Hq, Dh)
  o, k = path_decode_attention(q, kc, vc, w, beta, L, scale=0.125, impl="pallas", interpret=M,
                               block_s=64, num_splits=2)
  o_r, k_r = path_decode_attention(q, kc, vc, w, beta, L, scale=0.125, impl="xla")
  _close(o, o_r, L * Dh, "o")
  _close(np.asarray(k)[:, :L], np.asarray(k_r)[:, :L], Dh, "keys")


def test_gate_bias_mosaic():
  """The FoX / PaTH-FoX score bias exactly as written: its [G, BS] blocks through the
  pipeline, NaN past the live length in keys, values and bias (GQA 3)."""
  from kernels.path_decode_attention import path_decode_attention
  Hq, Hkv, S, Dh, L = 6, 2, 192, 64, 130
  live = jnp.arange(S) < L
  kc = jnp.where(~live[None, :, None], jnp.nan, _r(44, Hkv, S, Dh))
  vc = jnp.where(~live[None, :, None], jnp.nan, _r(45, Hkv, S, Dh)).astype(jnp.bfloat16)
  bias = jnp.where(live, -jnp.abs(_r(46, Hq, S)) * jnp.arange(S)[::-1] / S, jnp.nan)
  w = _r(47, Hkv, Dh)
  w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
  beta, q = jnp.array([0.7, 1.8]), _r(48, Hq, Dh)
  kw = dict(scale=0.125, bias_HS=bias)
  o = decode_attention(q, kc, vc, L, impl="pallas", interpret=M, block_s=64, num_splits=2, **kw)
  _close(o, decode_attention(q, kc, vc, L, impl="xla", **kw), L * Dh, "fox o")
  o, k = path_decode_attention(q, kc, vc, w, beta, L, impl="pallas", interpret=M, block_s=64,
                               num_splits=2, **kw)
  o_r, k_r = path_decode_attention(q, kc, vc, w, beta, L, impl="xla", **kw)
  _close(o, o_r, L * Dh, "path-fox o")
  _close(np.asarray(k)[:, :L], np.asarray(k_r)[:, :L], Dh, "path-fox keys")
  # the gate updated in the kernel: rows through SMEM, one TMA store per block
  gkw = dict(scale=0.125, gate_HS=bias, g_H=-jnp.abs(_r(49, Hq)))
  o, k, gate = path_decode_attention(q, kc, vc, w, beta, L, impl="pallas", interpret=M,
                                     block_s=64, num_splits=2, **gkw)
  o_r, k_r, gate_r = path_decode_attention(q, kc, vc, w, beta, L, impl="xla", **gkw)
  _close(o, o_r, L * Dh, "path-fox o (gate update)")
  np.testing.assert_array_equal(np.asarray(gate)[:, :L], np.asarray(gate_r)[:, :L])
  o, gate = decode_attention(q, kc, vc, L, impl="pallas", interpret=M, block_s=64,
                             num_splits=2, **gkw)
  o_r, gate_r = decode_attention(q, kc, vc, L, impl="xla", **gkw)
  _close(o, o_r, L * Dh, "fox o (gate update)")
  np.testing.assert_array_equal(np.asarray(gate)[:, :L], np.asarray(gate_r)[:, :L])
  # commit=False: keys and gate written back whole and unchanged (NaN tails included)
  _, k, gate = path_decode_attention(q, kc, vc, w, beta, L, impl="pallas", interpret=M,
                                     block_s=64, num_splits=2, commit=jnp.bool_(False), **gkw)
  np.testing.assert_array_equal(np.asarray(k), np.asarray(kc))
  np.testing.assert_array_equal(np.asarray(gate), np.asarray(bias))


def test_path_and_log_linear_mosaic():
  Hkv, S, Dh, L = 2, 192, 64, 100
  kc = jnp.where(jnp.arange(S)[None, :, None] >= L, jnp.nan, _r(14, Hkv, S, Dh))
  w = _r(15, Hkv, Dh)
  w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
  beta = jnp.array([1.6, 1.9])
  out = path_key_update(kc, w, beta, L, impl="pallas", interpret=M, block_s=64, num_splits=2)
  _close(np.asarray(out)[:, :L], path_key_update(kc, w, beta, L, impl="xla")[:, :L], Dh, "path")
  H, Lv, dk, dv = 2, 4, 64, 64
  S0 = _r(16, H, Lv, dk, dv)
  args = (_r(17, H, dk), _r(18, H, dk) / 8, _r(19, H, dv), jax.nn.softplus(_r(20, H, Lv)),
          -jax.nn.softplus(_r(21, H)), jax.nn.sigmoid(_r(22, H)))
  f = functools.partial(log_linear_state_update, variant="gdn")
  o_r, S1_r = f(S0, 6, *args, impl="xla")
  for split in (True, False):   # t = 6: level 2 takes levels 0 and 1
    o, S1 = f(S0, 6, *args, impl="pallas", interpret=M, block_v=32, split_levels=split)
    _close(o, o_r, Lv * dk, f"o split_levels={split}")
    _close(S1, S1_r, Lv, f"state split_levels={split}")
  o_r, S1_r = f(S0, 4, *args, impl="xla")   # t = 4: level 3 takes levels 0..2
  o, S1 = f(S0, 4, *args, impl="pallas", interpret=M, block_v=32)
  _close(o, o_r, Lv * dk, "o t=4")
  _close(S1, S1_r, Lv, "state t=4")
  # the plain recurrence: one state, the insert added (fenwick=False)
  one = (S0[:, :1], 40) + args[:3] + (jnp.full((H, 1), 0.125),) + args[4:]
  o, S1 = f(*one, impl="pallas", interpret=M, block_v=32, fenwick=False)
  o_r, S1_r = f(*one, impl="xla", fenwick=False)
  _close(o, o_r, dk, "plain o")
  _close(S1, S1_r, dk, "plain state")
  # commit=False (a step past the end of the cache): the old tiles written back
  _, kept = f(S0, 6, *args, impl="pallas", interpret=M, block_v=32, commit=jnp.bool_(False))
  np.testing.assert_array_equal(np.asarray(kept), np.asarray(S0))


def test_attention_head_chunks_and_groups_mosaic():
  """Head-dim chunks and query-head groups exactly as written: Dh 128 with four heads per
  KV head (the llama-8b-bench CTA: 2 chunks of 64 columns, 2 heads per CTA by default),
  and at Dh 64 one head per CTA with 32-column chunks, with the gate update (each CTA
  stores its own heads' gate rows); NaN past the live length."""
  Hq, Hkv, S, L = 8, 2, 192, 130
  tail = jnp.arange(S)[None, :, None] >= L
  for Dh, opts in ((128, {}), (64, dict(block_d=32, block_g=1))):
    kc = jnp.where(tail, jnp.nan, _r(50, Hkv, S, Dh))
    vc = jnp.where(tail, jnp.nan, _r(51, Hkv, S, Dh))
    q = _r(52, Hq, Dh)
    kw = dict(scale=Dh ** -0.5, block_s=64, num_splits=2)
    o = decode_attention(q, kc, vc, L, impl="pallas", interpret=M, **kw, **opts)
    _close(o, decode_attention(q, kc, vc, L, impl="xla", scale=Dh ** -0.5), L * Dh,
           f"Dh={Dh} {opts}")
  gate = jnp.where(jnp.arange(S) < L, -jnp.abs(_r(53, Hq, S)), jnp.nan)
  gkw = dict(scale=0.125, gate_HS=gate, g_H=-jnp.abs(_r(54, Hq)))
  o, g = decode_attention(q, kc, vc, L, impl="pallas", interpret=M, block_s=64, num_splits=2,
                          block_d=32, block_g=1, **gkw)
  o_r, g_r = decode_attention(q, kc, vc, L, impl="xla", **gkw)
  _close(o, o_r, L * 64, "gate update, one head per CTA")
  np.testing.assert_array_equal(np.asarray(g)[:, :L], np.asarray(g_r)[:, :L])
