"""The "mma-s8" GEMV form (kernels/_gemv.py): int8 weights on the int8 tensor cores
against the vector's base-128 int8 digits.

On CPU both interpreters run it: "hlo" does the same integer products in XLA, "mosaic"
runs the kernel with its WGMMA (B untransposed there: that interpreter takes no
transposed operand). The compiled form (B^T, K-major, as s8 WGMMA needs) is checked by
lowering here and by compiling for an H100 (tests/test_bench_kernels.py, plugin only),
and runs on a GPU in the first stage of scripts/gpu_session.sh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.testing import assert_rel_close, tol
from kernels import _common as C
from kernels import _gemv
from kernels.unfinished import Unfinished

F32, BF16 = jnp.float32, jnp.bfloat16
EPS = 1e-6
# The digits keep each slice to 2^-27 of its max |v| (s8_digits): far below the fp32
# sums' own rounding, so the fp32 tolerance of the reduction stands, with 2^-24 of slack
# for the per-step readout (one more fp32 rounding per step and column).
S8_V = 2.0 ** -24
MODES = ["compile"] if jax.default_backend() == "gpu" else ["hlo", "mosaic"]


def _r(seed, *shape, dtype=BF16, scale=1.0):
  return (scale * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def _rtol(K):
  return tol(F32, K) + S8_V


def _f64(x):
  return np.asarray(x, np.float64)


def _int8(w, axis):
  from kernels.quant import quantize_int8
  return quantize_int8(w.astype(F32), axis=axis)


def _deq(q, s, axis):
  from kernels.quant import dequantize_int8
  return dequantize_int8(q, s, axis=axis)


def _ref_gemv(v, w, g=None, bias=None):
  v = v.astype(F32)
  if g is not None:
    v = v * jax.lax.rsqrt(jnp.mean(v * v) + EPS) * g.astype(F32)
  y = jnp.dot(w.astype(F32), v, precision="highest")
  return y if bias is None else y + bias.astype(F32)


def _digits(v):
  q, w = _gemv.s8_digits(C.Ctx("hlo"), jnp.asarray(v, F32))
  return _f64(q), _f64(w)


@pytest.mark.parametrize("case", ["normal", "outlier", "bf16", "small", "tiny", "huge",
                                  "zeros"])
def test_digits_rebuild_the_vector(case):
  """q: integers in [-64, 64], digit j in column j < 4, zeros after; sum_j w_j q_j is v
  to within 2^-27 of max |v| (bf16 values, whose 8 significant bits lie within 2^-19
  of the max here, exactly); under 2^-100 ("tiny") to within 2^-127 absolute."""
  v = {"normal": _r(1, 256, dtype=F32),
       "outlier": _r(2, 256, dtype=F32).at[7].set(3e4),
       "bf16": _r(3, 256, scale=100.0).astype(F32),
       "small": _r(4, 256, dtype=F32, scale=1e-29),
       "tiny": _r(4, 256, dtype=F32, scale=1e-33),
       "huge": _r(5, 256, dtype=F32, scale=1e36),
       "zeros": jnp.zeros(256, F32)}[case]
  q, w = _digits(v)
  assert q.shape == (256, 8) and w.shape == (8,)
  assert np.all(q == np.round(q)) and np.abs(q).max() <= 64
  assert np.all(q[:, _gemv.S8_DIGITS:] == 0) and np.all(w[_gemv.S8_DIGITS:] == 0)
  got, m = q @ w, np.abs(_f64(v)).max()
  bound = 2.0 ** -127 if case == "tiny" else 2.0 ** -27 * m
  assert np.abs(got - _f64(v)).max() <= bound, case
  if case in ("bf16", "zeros"):
    np.testing.assert_array_equal(got, _f64(v))
  if case == "normal":   # four digits used: three would leave 2^-20 of the max
    assert np.abs(q[:, 3]).max() > 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_digits_carry_a_non_finite_vector_into_the_weights(bad):
  """A NaN or infinite element must not vanish into finite digits: the weights turn NaN,
  so the GEMV's outputs do."""
  _, w = _digits(_r(6, 128, dtype=F32).at[5].set(bad))
  assert np.all(np.isnan(w))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("xdtype", [BF16, F32])
def test_int8_gemv_matches_the_reference(mode, xdtype):
  """The QKV / LM-head form (RMSNorm prologue, row scale, bias, block argmax) against the
  fp32 GEMV of the dequantized weights and against the CUDA-core form; two row blocks,
  two K steps, the second slice scaled 2^10 down (each step has its own digit scale)."""
  N, K = 128, 256
  v = _r(40, K, dtype=F32).at[128:].multiply(2.0 ** -10).astype(xdtype)
  g, b = (1 + _r(41, K, scale=0.1)).astype(BF16), _r(42, N)
  q, sc = _int8(_r(43, N, K, dtype=F32), axis=1)
  kw = dict(scale_K=g, w_scale_N=sc, bias_N=b, eps=EPS, argmax=True, out_dtype=F32,
            mode=mode, block_n=64, block_k=128)
  y, bmax, barg = _gemv.gemv(v, q, gemv="mma-s8", **kw)
  y_f, _, _ = _gemv.gemv(v, q, **kw)
  name = f"s8 {mode} {jnp.dtype(xdtype).name}"
  assert_rel_close(_f64(y), _f64(_ref_gemv(v, _deq(q, sc, 1), g, bias=b)), rtol=_rtol(K),
                   name=name)
  assert_rel_close(_f64(y), _f64(y_f), rtol=_rtol(K), name=name + " vs fma")
  assert int(barg[jnp.argmax(bmax)]) == int(jnp.argmax(y))


@pytest.mark.parametrize("mode", MODES)
def test_int8_partials_merged_and_swiglu_vectors_match_the_fma_form(mode):
  """The vectors a kernel builds before its GEMV (built in the row layout, then moved to
  the digits' layout when compiled): an unfinished x with split-K partials and its store
  (the chained QKV), the O-projection's merged attention vector, and the two-kernel
  MLP's h finished from the gate / up partials."""
  from kernels.decode_attention.reference import merge_splits
  N, K = 128, 256
  xu = Unfinished(_r(44, K), (_r(45, 2, K, dtype=F32, scale=0.1),))
  q, _ = _int8(_r(46, N, K, dtype=F32), axis=1)
  kw = dict(mode=mode, block_k=128, split_k=2, store_x=True)
  part, _, x = _gemv.gemv_partials(xu, q, gemv="mma-s8", **kw)
  part_f, _, x_f = _gemv.gemv_partials(xu, q, **kw)
  assert_rel_close(_f64(part), _f64(part_f), rtol=_rtol(K), name=f"s8 partials {mode}")
  np.testing.assert_array_equal(_f64(x), _f64(x_f))
  P, Hq, Dh = 2, 4, 64
  o, m = _r(47, P, Hq, Dh, dtype=F32), _r(48, P, Hq, dtype=F32)
  l = jnp.abs(_r(49, P, Hq, dtype=F32)) + 1.0
  qo, _ = _int8(_r(50, N, Hq * Dh, dtype=F32), axis=1)
  kw = dict(dtype=BF16, mode=mode, block_k=128, split_k=2)
  s8 = _gemv.gemv_partials_merged(o, m, l, qo, gemv="mma-s8", **kw)
  fma = _gemv.gemv_partials_merged(o, m, l, qo, **kw)
  assert_rel_close(_f64(s8), _f64(fma), rtol=_rtol(Hq * Dh), name=f"s8 merged {mode}")
  v = merge_splits(o[:, None], m[:, None], l[:, None]).reshape(-1).astype(BF16)
  assert_rel_close(_f64(s8).reshape(2, N).sum(0), _f64(_ref_gemv(v, qo)), rtol=2.0 ** -8,
                   name=f"s8 merged vs XLA {mode}")
  F, D = 256, 128
  gu, _ = _int8(_r(51, 2 * F, D, dtype=F32), axis=1)
  gpart, ss = _gemv.gemv_partials(_r(52, D), gu, scale_K=_r(53, D), mode=mode, split_k=1)
  qd, _ = _int8(_r(54, D, F, dtype=F32), axis=1)
  kw = dict(norm_size=D, eps=EPS, dtype=BF16, mode=mode, block_k=128, split_k=1)
  s8 = _gemv.gemv_partials_swiglu(gpart, ss, qd, gemv="mma-s8", **kw)
  fma = _gemv.gemv_partials_swiglu(gpart, ss, qd, **kw)
  assert_rel_close(_f64(s8), _f64(fma), rtol=_rtol(F), name=f"s8 swiglu {mode}")


# h = silu(gate) * up is rounded to the activations' dtype before the down projection,
# in either form; the forms' gate / up sums differ by ~1e-7, so with bf16 x one element
# of h in BF = 64 may land one bf16 step apart (tests/test_kernels_mma.py, MLP_RTOL).
MLP_RTOL = 2.0 ** -8 / 8


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("down_t,xdtype,extra", [(True, BF16, None), (True, F32, "parts"),
                                                  (False, BF16, "parts")])
def test_int8_one_kernel_mlp_matches_the_reference(mode, down_t, xdtype, extra):
  """kernels/rmsnorm_swiglu with gemv="mma-s8": the gate and up tiles against one B^T of
  x * g's digits per step; with W_down^T the down tiles against h's digits (one scale
  for all of h, built once); with W_down [F, D] the down phase on the CUDA cores. x
  itself, or finished from the output projection's partials ("parts")."""
  from kernels.rmsnorm_swiglu import pallas as mlp
  from kernels.rmsnorm_swiglu import reference
  D, F = 512, 128
  x, g = _r(60, D).astype(xdtype), (1 + _r(61, D, scale=0.1)).astype(BF16)
  (qg, sg), (qu, su) = (_int8(_r(62 + i, F, D, scale=D ** -0.5), 1) for i in range(2))
  wd = _r(64, F, D, scale=F ** -0.5)
  qd, sd = _int8(wd.T, 1) if down_t else _int8(wd, 0)
  kw = dict(eps=EPS, mode=mode, down_t=down_t, block_f=64, block_k=256,
            block_d=128 if down_t else 64)
  x_in, parts, op = ((x,), None, None)
  if extra == "parts":
    op = _r(65, 3, D, dtype=F32, scale=0.3)
    x_in, parts = (x, op), (3, False)
  run = lambda **f: mlp._call(x_in, parts, g, qg, qu, qd, (sg, su, sd), **kw, **f)
  s8, fma = run(gemv="mma-s8"), run()
  name = f"s8 mlp {mode} down_t={down_t} {jnp.dtype(xdtype).name} {extra}"
  rtol = _rtol(D) + (MLP_RTOL if xdtype == BF16 else _rtol(F))
  assert_rel_close(_f64(s8), _f64(fma), rtol=rtol, name=name)
  xf = mlp.finish_x(x, op) if extra == "parts" else x
  down = dict(w_down_t_DF=_deq(qd, sd, 1)) if down_t else dict(w_down_FD=_deq(qd, sd, 0))
  ref = reference.rmsnorm_swiglu(xf, g, _deq(qg, sg, 1), _deq(qu, su, 1), eps=EPS, **down)
  rtol = 2.0 ** -8 if xdtype == BF16 else _rtol(D) + _rtol(F)
  assert_rel_close(_f64(mlp._finish(xf, s8)), _f64(ref), rtol=rtol, name=name + " ref")


def test_choices_are_checked():
  from kernels.rmsnorm_swiglu import pallas as mlp
  v, w = _r(0, 256), _r(1, 128, 256)
  q, sc = _int8(w, 1)
  kw = dict(mode="hlo", out_dtype=F32)
  with pytest.raises(ValueError, match="gemv: gemv='mma-s8' needs int8 weights .got bfloat16"):
    _gemv.gemv(v, w, gemv="mma-s8", **kw)
  with pytest.raises(ValueError, match="mma_swizzle=64 needs gemv='mma' .gemv='mma-s8' has"):
    _gemv.gemv(v, q, w_scale_N=sc, gemv="mma-s8", mma_swizzle=64, **kw)
  with pytest.raises(ValueError, match="block for K: 64 must be a positive multiple of 128"):
    _gemv.gemv(v, q, w_scale_N=sc, gemv="mma-s8", block_k=64, **kw)
  D, F = 256, 192
  qg, s = _int8(_r(2, F, D), 1)
  qd, sd = _int8(_r(3, D, F), 1)
  with pytest.raises(ValueError, match="block_f=192 must be 64 or 128 with gemv='mma-s8'"):
    mlp._call((v,), None, v, qg, qg, qd, (s, s, sd), eps=EPS, mode="compile", down_t=True,
              block_f=192, gemv="mma-s8")


PROMPT = [3, 17, 42, 7, 99, 256, 1]


@pytest.mark.slow   # ~15 s each: a tiny LM decoding through every GEMV kernel, interpreted
@pytest.mark.parametrize("w_down", ["FD", "DF"])
def test_int8_decoder_with_s8_gemvs_matches_xla(w_down):
  """quantize="int8" with the gemv group's "mma-s8" form (pallas-int8-s8 with W_down^T):
  a tiny bf16 LM decodes 32 greedy tokens as the XLA int8 step does."""
  from jaxlab.bench.decode import CONFIGS
  from jaxlab.models import LM, ModelConfig
  from jaxlab.models.decode import decode_greedy
  cfg = ModelConfig(**dict(CONFIGS["tiny"][0], param_dtype="bfloat16", d_model=128, head_dim=64,
                           n_heads=2, n_kv_heads=1, ffn_dim=256))
  model = LM(cfg, rngs=nnx.Rngs(3))
  layout = {"layout": {"w_down": w_down}}
  want = decode_greedy(model, PROMPT, 32, impl="xla", quantize="int8", kernel_options=layout)
  assert len(set(np.asarray(want).tolist())) >= 8, "degenerate continuation: test is too weak"
  got = decode_greedy(model, PROMPT, 32, impl="pallas", quantize="int8",
                      kernel_options=dict(layout, gemv={"form": "mma-s8"}))
  np.testing.assert_array_equal(got, want)


def test_bf16_decoder_refuses_the_s8_form():
  """The gemv group's "mma-s8" with bf16 weights: one line naming the form, not a silent
  fallback to another one."""
  from jaxlab.bench.decode import CONFIGS
  from jaxlab.models import LM, ModelConfig
  from jaxlab.models.decode import decode_greedy
  cfg = ModelConfig(**dict(CONFIGS["tiny"][0], param_dtype="bfloat16", d_model=128, head_dim=64,
                           n_heads=2, n_kv_heads=1, ffn_dim=256))
  with pytest.raises(ValueError, match="gemv='mma-s8' needs int8 weights"):
    decode_greedy(LM(cfg, rngs=nnx.Rngs(3)), PROMPT, 2, impl="pallas",
                  kernel_options={"gemv": {"form": "mma-s8"}})
