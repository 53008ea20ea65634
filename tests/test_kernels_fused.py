"""Fused decode ops (kernels/qkv_rope_append, kernels/out_proj_mlp) against their
references, which are the two unfused ops' references composed; Pallas interpreted
("hlo"; the Mosaic-GPU interpreter runs them in test_kernels_mosaic.py).

Each fused op runs two Mosaic kernels with no XLA kernel between them: the first
leaves its split-K partials unfinished and the second finishes them (sum, 1/RMS, scale,
bias, residual, rounding). Tolerances: fp32, reduction = the longest dot product.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.testing import assert_rel_close, tol
from kernels.out_proj_mlp import out_proj_mlp
from kernels.out_proj_residual import out_proj_residual
from kernels.qkv_rope_append import qkv_rope_append
from kernels.qkv_rope_append.pallas import layout_ok
from kernels.rmsnorm_qkv import rmsnorm_qkv
from kernels.rmsnorm_swiglu import rmsnorm_swiglu
from kernels.rope_append import rope_append

F32, BF16 = jnp.float32, jnp.bfloat16
EPS = 1e-6


def _r(seed, *shape):
  return jax.random.normal(jax.random.key(seed), shape)


def _close(out, ref, reduction, name):
  assert_rel_close(np.asarray(out, np.float64), np.asarray(ref, np.float64),
                   rtol=tol(F32, reduction), name=name)


# ------------------------------------------------------------ qkv_rope_append

def _qkv_case(Hq, Hkv, Dh, D, dt=F32, S=96, bias=True):
  N = (Hq + 2 * Hkv) * Dh
  x = (3.0 * _r(0, D)).astype(dt)
  g = (1.0 + 0.2 * _r(1, D)).astype(dt)
  w = (_r(2, N, D) / np.sqrt(D)).astype(dt)
  b = _r(3, N).astype(dt) if bias else None
  kc, vc = _r(4, Hkv, S, Dh).astype(dt), _r(5, Hkv, S, Dh).astype(dt)
  cos, sin = _r(6, Dh), _r(7, Dh)    # any cos / sin, not only rope_cos_sin's
  return (x, g, w, b, cos, sin, kc, vc)


# (Hq, Hkv, Dh): GQA 1 and 4, head dims 64 and 128; split_k None (automatic), 1, 3.
@pytest.mark.parametrize("Hq,Hkv,Dh,bias,split_k", [
    (4, 4, 64, True, None), (16, 4, 64, False, 1), (2, 2, 128, True, 3), (8, 2, 128, False, None)])
def test_qkv_rope_append(Hq, Hkv, Dh, bias, split_k):
  D = 192
  args = _qkv_case(Hq, Hkv, Dh, D, bias=bias)
  kc, vc = args[6], args[7]
  S = kc.shape[1]
  kw = dict(eps=EPS, n_heads=Hq, n_kv_heads=Hkv)
  f = jax.jit(lambda p: qkv_rope_append(*args, p, impl="pallas", block_n=64, block_k=64,
                                        split_k=split_k, **kw))
  r = jax.jit(lambda p: qkv_rope_append(*args, p, impl="xla", **kw))
  for pos in (0, 37, S - 1):
    out, ref = f(jnp.int32(pos)), r(jnp.int32(pos))
    _close(out[0], ref[0], D, "q")
    for name, a, b, c in (("k_cache", out[1], ref[1], kc), ("v_cache", out[2], ref[2], vc)):
      _close(a[:, pos], b[:, pos], D, f"{name} row {pos}")
      others = np.arange(S) != pos
      np.testing.assert_array_equal(np.asarray(a)[:, others], np.asarray(c)[:, others])
  # A traced slot outside the cache writes nothing; a concrete one is an error.
  for bad in (S, S + 3, -1):
    _, k2, v2 = f(jnp.int32(bad))
    np.testing.assert_array_equal(np.asarray(k2), np.asarray(kc))
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(vc))
  with pytest.raises(ValueError, match=f"pos={S}"):
    qkv_rope_append(*args, S, impl="pallas", **kw)


def test_qkv_rope_append_in_bf16_matches_the_unfused_kernels():
  """bf16 (the bench models): fused vs the two unfused Pallas kernels. Same products,
  same fp32 accumulation; the split-K sum runs in another order (in the kernel vs
  XLA's reduction), so the rounded qkv may differ by one bf16 ulp, which RoPE carries
  into q and k: |fused - unfused| <= 2 ulp of the largest |value| (2 * 2^-8 relative)."""
  Hq, Hkv, Dh, D = 8, 2, 64, 256
  args = _qkv_case(Hq, Hkv, Dh, D, BF16)
  kw = dict(n_heads=Hq, n_kv_heads=Hkv)
  fused = qkv_rope_append(*args, 5, eps=EPS, impl="pallas", block_k=64, split_k=4, **kw)
  qkv = rmsnorm_qkv(*args[:4], eps=EPS, impl="pallas", block_k=64, split_k=4)
  unfused = rope_append(qkv, *args[4:], 5, impl="pallas", **kw)
  assert fused[0].dtype == BF16
  for a, b, name in zip(fused, unfused, ("q", "k", "v")):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    a, b = (a, b) if name == "q" else (a[:, 5], b[:, 5])
    assert np.max(np.abs(a - b)) <= 2 * 2.0 ** -8 * np.max(np.abs(b)), name
    assert np.any(a != 0), name
    _few_entries_differ(a, b, f"qkv_rope_append bf16 {name}")


def test_qkv_rope_append_arguments_are_checked():
  x, g, w, b, cos, sin, kc, vc = _qkv_case(4, 2, 64, 128)
  kw = dict(eps=EPS, n_heads=4, n_kv_heads=2, impl="pallas")
  with pytest.raises(ValueError, match="'cuda'"):
    qkv_rope_append(x, g, w, b, cos, sin, kc, vc, 0, **dict(kw, impl="cuda"))
  with pytest.raises(ValueError, match=r"w_t_ND \(512, 128\) must be \[640, 128\]"):
    qkv_rope_append(x, g, w[:512], b, cos, sin, kc, vc, 0, **dict(kw, n_heads=6))
  with pytest.raises(ValueError, match="caches .* must be in x_D's dtype"):
    qkv_rope_append(x, g, w, b, cos, sin, kc.astype(BF16), vc.astype(BF16), 0, **kw)
  with pytest.raises(ValueError, match="bias_N"):
    qkv_rope_append(x, g, w, b[:10], cos, sin, kc, vc, 0, **kw)
  with pytest.raises(TypeError, match="inference-only"):
    jax.grad(lambda x: qkv_rope_append(x, g, w, b, cos, sin, kc, vc, 0, **kw)[0].sum())(x)


def test_qkv_rope_layout_rule():
  """The finishing kernel's [Hq + 2 Hkv, Dh/2] tile must fill whole warpgroups on GPU
  (the decode driver uses the unfused kernels otherwise)."""
  assert layout_ok(32, 8, 64, BF16) and layout_ok(32, 8, 128, BF16)     # llama 1B / 8B
  assert not layout_ok(6, 2, 32, F32)        # tiny: 10 heads x 16 = 160
  assert not layout_ok(8, 2, 64, BF16) and layout_ok(8, 2, 64, F32)     # 384: bf16 only


# ------------------------------------------------------------------ out_proj_mlp

def _mlp_case(M, D, F, dt=F32):
  o, r = _r(10, M).astype(dt), _r(11, D).astype(dt)
  g = (1.0 + 0.2 * _r(12, D)).astype(dt)
  wo = (_r(13, D, M) / np.sqrt(M)).astype(dt)
  ws = [(_r(14 + i, F, D) / np.sqrt(D)).astype(dt) for i in range(3)]
  return (o, wo, r, g, *ws)


@pytest.mark.parametrize("o_split,store_once", [(None, False), (1, True), (3, False)])
def test_out_proj_mlp(o_split, store_once):
  M, D, F = 192, 128, 256      # O: 2 row blocks x o_split; MLP: 4 CTAs over F
  args = _mlp_case(M, D, F)
  ref = out_proj_mlp(*args, eps=EPS, impl="xla")
  out = jax.jit(functools.partial(
      out_proj_mlp, eps=EPS, impl="pallas", o_block=dict(block_n=64, block_k=64, split_k=o_split),
      block_f=64, block_k=64, block_d=64, store_once=store_once))(*args)
  _close(out, ref, M + F, "out_proj_mlp")
  if o_split == 3:   # the down weight as W_down^T [D, F], both impls
    o, wo, r, g, wg, wu, wd = args
    f_t = lambda impl, **k: out_proj_mlp(o, wo, r, g, wg, wu, w_down_t_DF=wd.T, eps=EPS,
                                         impl=impl, **k)
    _close(f_t("xla"), ref, M + F, "out_proj_mlp reference, w_down_t_DF")
    _close(f_t("pallas", o_block=dict(block_n=64, block_k=64, split_k=3), block_f=64,
               block_k=64, block_d=64), ref, M + F, "out_proj_mlp w_down_t_DF")


def test_out_proj_mlp_in_bf16_matches_the_unfused_kernels():
  """bf16: fused vs unfused Pallas. x = resid + O-projection is rounded to bf16 by both
  (sums in a different order: x may differ by one ulp in a few entries), then the same
  MLP kernel: ||fused - unfused|| <= 2^-8 ||unfused||."""
  M, D, F = 256, 256, 512
  args = _mlp_case(M, D, F, BF16)
  blk = dict(block_f=64, block_k=64, block_d=64)
  fused = out_proj_mlp(*args, eps=EPS, impl="pallas", o_block=dict(block_k=64, split_k=4), **blk)
  x = out_proj_residual(*args[:3], impl="pallas", block_k=64, split_k=4)
  unfused = rmsnorm_swiglu(x, *args[3:], eps=EPS, impl="pallas", **blk)
  assert fused.dtype == BF16
  assert_rel_close(np.asarray(fused, np.float64), np.asarray(unfused, np.float64),
                   rtol=2.0 ** -8, name="out_proj_mlp bf16")
  _few_entries_differ(fused, unfused, "out_proj_mlp bf16")


def _few_entries_differ(fused, unfused, name):
  """A summation order flips a bf16 rounding of x (or o) with probability ~1e-4 per
  entry (fp32 order error ~1e-7 relative against half an ulp, 2^-9), so fused and
  unfused agree in nearly every output entry; a missing rounding step (x or o left in
  fp32) makes ~40% of them differ (checked when this test was written)."""
  frac = float(np.mean(np.asarray(fused) != np.asarray(unfused)))
  assert frac <= 0.05, f"{name}: {frac:.1%} of the entries differ"


def test_out_proj_mlp_arguments_are_checked():
  o, wo, r, g, wg, wu, wd = _mlp_case(64, 64, 128)
  kw = dict(eps=EPS, impl="pallas")
  with pytest.raises(ValueError, match=r"out_proj_mlp: w_o_t_DM \(64, 64\) must be \[D, 32\]"):
    out_proj_mlp(o[:32], wo, r, g, wg, wu, wd, **kw)
  with pytest.raises(ValueError, match=r"out_proj_mlp: w_down_FD \(128, 32\)"):
    out_proj_mlp(o, wo, r, g, wg, wu, wd[:, :32], **kw)
  with pytest.raises(ValueError, match="out_proj_mlp: w_o_scale_D is only for int8"):
    out_proj_mlp(o, wo, r, g, wg, wu, wd, w_o_scale_D=jnp.ones(64), **kw)


# ------------------------------------------------------------- attention_out_mlp

def _aom_case(Hq, Hkv, Dh, D, F, S, L, dt=F32, bias=False):
  M = Hq * Dh
  q = _r(20, Hq, Dh).astype(dt)
  kc, vc = _r(21, Hkv, S, Dh).astype(dt), _r(22, Hkv, S, Dh).astype(dt)
  tail = jnp.arange(S)[None, :, None] >= L
  kn, vn = jnp.where(tail, jnp.nan, kc), jnp.where(tail, jnp.nan, vc)   # unused slots: NaN
  b = None
  if bias:
    b = -jnp.abs(_r(23, Hq, S)) * jnp.arange(S)[None, :] / S
    b = jnp.where(jnp.arange(S)[None, :] >= L, jnp.nan, b)
  wo = (_r(24, D, M) / np.sqrt(M)).astype(dt)
  r, g = _r(25, D).astype(dt), (1.0 + 0.2 * _r(26, D)).astype(dt)
  ws = [(_r(27 + i, F, D) / np.sqrt(D)).astype(dt) for i in range(3)]
  clean = (q, kc, vc, L, wo, r, g, *ws)
  return clean, (q, kn, vn, L, wo, r, g, *ws), b


# (Hq, Hkv, Dh): GQA 1 / 4, head dims 64 / 128. O blocks: BK 128 (two 64-wide heads a
# block), 64 (inside a 128-wide head), 256 (four heads); num_splits 4 over 3 live blocks
# leaves an empty split (m = -inf, l = 0) for the merge to weigh 0.
@pytest.mark.parametrize("Hq,Hkv,Dh,o_block,splits,bias", [
    (4, 4, 64, dict(block_k=128, split_k=2), 4, False),
    (8, 2, 64, dict(block_k=64, split_k=1), 3, True),
    (2, 2, 128, dict(block_k=64, split_k=2), 4, False),
    (8, 2, 128, dict(block_k=256, split_k=None), 2, True)])
def test_attention_out_mlp(Hq, Hkv, Dh, o_block, splits, bias):
  from kernels.attention_out_mlp import attention_out_mlp
  D, F, S, L = 128, 256, 256, 150
  clean, poisoned, b = _aom_case(Hq, Hkv, Dh, D, F, S, L, bias=bias)
  kw = dict(scale=Dh ** -0.5, eps=EPS)
  ref = attention_out_mlp(*clean, bias_HS=None if b is None else jnp.nan_to_num(b), impl="xla",
                          **kw)
  out = jax.jit(functools.partial(
      attention_out_mlp, impl="pallas", attn_block=dict(num_splits=splits, block_s=64),
      o_block=dict(block_n=64, **o_block), block_f=64, block_k=64, block_d=64, **kw))(
          *poisoned, bias_HS=b)
  # Longest reductions: attention over L slots, O over Hq * Dh, the MLP's down over F.
  _close(out, ref, L + Hq * Dh + F, "attention_out_mlp")
  if bias:   # the down weight as W_down^T [D, F]
    *head, wd = poisoned
    out_t = attention_out_mlp(*head, w_down_t_DF=wd.T, bias_HS=b, impl="pallas",
                              attn_block=dict(num_splits=splits, block_s=64),
                              o_block=dict(block_n=64, **o_block), block_f=64, block_k=64,
                              block_d=64, **kw)
    _close(out_t, ref, L + Hq * Dh + F, "attention_out_mlp w_down_t_DF")


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_attention_out_mlp_in_bf16_matches_the_unfused_kernels():
  """bf16: fused vs decode_attention + out_proj_mlp (both Pallas). The merged attention
  output is rounded to bf16 by both; merge sums run in another order (kernel vs XLA), so
  o may differ by one bf16 ulp in a few entries: ||fused - unfused|| <= 2^-8 ||unfused||."""
  from kernels.attention_out_mlp import attention_out_mlp
  from kernels.decode_attention import decode_attention
  Hq, Hkv, Dh, D, F, S, L = 8, 2, 64, 256, 512, 192, 130
  clean, _, _ = _aom_case(Hq, Hkv, Dh, D, F, S, L, BF16)
  q, kc, vc, length, wo, r, g, wg, wu, wd = clean
  blk = dict(block_f=64, block_k=64, block_d=64)
  ob = dict(block_k=128, split_k=2)
  fused = attention_out_mlp(*clean, scale=0.125, eps=EPS, impl="pallas",
                            attn_block=dict(num_splits=3), o_block=ob, **blk)
  o = decode_attention(q, kc, vc, length, scale=0.125, impl="pallas", num_splits=3)
  unfused = out_proj_mlp(o.reshape(-1), wo, r, g, wg, wu, wd, eps=EPS, impl="pallas",
                         o_block=ob, **blk)
  assert fused.dtype == BF16
  assert_rel_close(np.asarray(fused, np.float64), np.asarray(unfused, np.float64),
                   rtol=2.0 ** -8, name="attention_out_mlp bf16")
  _few_entries_differ(fused, unfused, "attention_out_mlp bf16")


def test_attention_out_mlp_rules_and_errors():
  from kernels import _gemv
  from kernels.attention_out_mlp import attention_out_mlp
  # llama-1b / 8b O-projections on GPU: 8 / 16 heads per K slice; the tiny model's 3 is
  # too few for the (m, l) rows' TMA box, and K slices / blocks must hold whole heads.
  assert _gemv.merge_ok(32, 64, 2048, 2048, mode="compile")
  assert _gemv.merge_ok(32, 128, 4096, 4096, mode="compile")
  assert not _gemv.merge_ok(6, 32, 128, 192, mode="compile")
  assert _gemv.merge_ok(6, 32, 128, 192, mode="hlo")
  assert not _gemv.merge_ok(4, 96, 128, 384, mode="hlo", block_k=128)   # blocks split heads
  clean, _, _ = _aom_case(4, 2, 64, 64, 128, 64, 10)
  kw = dict(scale=0.125, eps=EPS, impl="pallas")
  with pytest.raises(ValueError, match=r"attention_out_mlp: w_o_t_DM \(64, 256\) must be "
                                       r"\[D, 128\]"):
    attention_out_mlp(clean[0][:2], clean[1][:1], clean[2][:1], *clean[3:], **kw)
  with pytest.raises(ValueError, match="attention_out_mlp: length=65"):
    attention_out_mlp(*clean[:3], 65, *clean[4:], **kw)
  with pytest.raises(ValueError, match="does not fit the GEMV's blocks"):
    attention_out_mlp(*clean, o_block=dict(block_k=32), **kw)
