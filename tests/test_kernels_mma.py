"""The GEMV kernels' tensor-core form (kernels/_gemv.py, gemv="mma"): the weight tile is
WGMMA's A operand and v enters B as two bf16 columns, hi = bf16(v) and lo = bf16(v - hi).

Every product is exact and accumulates in fp32, so the form differs from the fp32
CUDA-core form ("fma") only by v's representation: |v - hi - lo| <= 2^-17 |v| per
element. Tolerance: the fp32 one for the reduction, plus MMA_V = 2^-16 for that
representation (a form that dropped lo would be off by ~2^-9).

Checked against the CUDA-core form and the reference in the HLO interpreter (where XLA
computes the same products), in the Mosaic-GPU interpreter (the real kernel: B built in
SMEM, plgpu.wgmma into the accumulator), compiled on a GPU when there is one, lowered
for CUDA, and in the decode driver (kernel_options {"gemv": {"form": "mma"}}).

int8 weights: the tile is widened to bf16 (exact) and enters the WGMMA from registers.
The Mosaic-GPU interpreter has no WGMMA with A in registers, so there the widened tile
goes through SMEM (kernels._common.mma_a); the register form itself is checked compiled
(the GPU run, and the H100 compile of the lowering tests' CUDA-plugin case).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.testing import assert_rel_close, tol
from kernels import _gemv
from kernels.unfinished import Unfinished

F32, BF16 = jnp.float32, jnp.bfloat16
MMA_V = 2.0 ** -16
EPS = 1e-6
# both interpreters on CPU; on a GPU the compiled kernel alone (real WGMMA: the HLO
# interpreter's cases are CPU CI's, and the GPU stage's minutes are few)
MODES = ["compile"] if jax.default_backend() == "gpu" else ["hlo", "mosaic"]


def _r(seed, *shape, dtype=BF16, scale=1.0):
  return (scale * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def _rtol(K):
  return tol(F32, K) + MMA_V


def _f64(x):
  return np.asarray(x, np.float64)


def _ref_gemv(v, w, g=None, bias=None, resid=None):
  v = v.astype(F32)
  if g is not None:
    v = v * jax.lax.rsqrt(jnp.mean(v * v) + EPS) * g.astype(F32)
  y = jnp.dot(w.astype(F32), v, precision="highest")
  for a in (bias, resid):
    if a is not None:
      y = y + a.astype(F32)
  return y


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("swizzle", [32, 64, 128])
def test_norm_bias_argmax_matches_the_reference(mode, swizzle):
  """RMSNorm prologue, bias epilogue, block argmax (the QKV / LM-head forms); two row
  blocks, two K steps."""
  N, K = 128, 256
  v, g, w, b = _r(0, K), (1 + _r(1, K, scale=0.1)).astype(BF16), _r(2, N, K), _r(3, N)
  y, bmax, barg = _gemv.gemv(v, w, scale_K=g, bias_N=b, eps=EPS, argmax=True,
                             out_dtype=F32, mode=mode, block_n=64, block_k=128,
                             gemv="mma", mma_swizzle=swizzle)
  ref = _ref_gemv(v, w, g, bias=b)
  assert_rel_close(_f64(y), _f64(ref), rtol=_rtol(K), name=f"mma {mode} {swizzle}")
  assert int(barg[jnp.argmax(bmax)]) == int(jnp.argmax(y))


@pytest.mark.parametrize("mode", MODES)
def test_split_k_with_residual_matches_the_fma_form(mode):
  """split_k = 2 (the raw partials and the XLA epilogue) with a residual: the same
  result as the CUDA-core form within the representation error of v."""
  N, K = 128, 512
  v, w, res = _r(4, K), _r(5, N, K, scale=K ** -0.5), _r(6, N)
  kw = dict(resid_N=res, out_dtype=F32, mode=mode, block_k=128, split_k=2)
  fma = _gemv.gemv(v, w, **kw)
  mma = _gemv.gemv(v, w, gemv="mma", **kw)
  assert_rel_close(_f64(mma), _f64(fma), rtol=_rtol(K), name=f"split-K {mode}")
  assert_rel_close(_f64(mma), _f64(_ref_gemv(v, w, resid=res)), rtol=_rtol(K), name="ref")


@pytest.mark.parametrize("mode", MODES)
def test_unfinished_vector_and_store_match_the_fma_form(mode):
  """The chained form: v = bf16(base + sum of fp32 rows), finished block by block in the
  ROW layout the mma form reads it in, and stored by the n = 0 CTAs."""
  N, K = 128, 256
  xu = Unfinished(_r(7, K), (_r(8, 2, K, dtype=F32, scale=0.1),))
  g, w = (1 + _r(9, K, scale=0.1)).astype(BF16), _r(10, N, K)
  kw = dict(scale_K=g, mode=mode, block_k=128, split_k=2, store_x=True)
  part_f, ss_f, x_f = _gemv.gemv_partials(xu, w, **kw)
  part_m, ss_m, x_m = _gemv.gemv_partials(xu, w, gemv="mma", **kw)
  np.testing.assert_array_equal(np.asarray(x_m), np.asarray(x_f))
  np.testing.assert_allclose(np.asarray(ss_m), np.asarray(ss_f), rtol=tol(F32, K))
  assert_rel_close(_f64(part_m), _f64(part_f), rtol=_rtol(K), name=f"partials {mode}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("Hq,split", [(8, 2), (16, 2)])
def test_merged_attention_vector_matches_the_fma_form(mode, Hq, split):
  """The O-projection form: v is the merge of split-K attention partials, computed in
  the ROW layout (one empty split included: m = -inf, l = 0 weighs nothing). 4 heads per
  K slice: the merge weights as scalars per step; 8: as vectors, once per CTA
  (_gemv.vector_weights). Both forms also match the merge in XLA (at bf16 rounding of
  the merged vector, which both kernels round as the unfused op does)."""
  from kernels.decode_attention.reference import merge_splits
  P, Dh, N = 3, 64, 128
  assert _gemv.vector_weights(Hq // split) == (Hq // split == 8)
  o = _r(11, P, Hq, Dh, dtype=F32)
  m = _r(12, P, Hq, dtype=F32).at[2].set(-jnp.inf)
  l = jnp.abs(_r(13, P, Hq, dtype=F32)) + 1.0
  l, o = l.at[2].set(0.0), o.at[2].set(0.0)
  w = _r(14, N, Hq * Dh)
  kw = dict(dtype=BF16, mode=mode, block_k=128, split_k=split)
  fma = _gemv.gemv_partials_merged(o, m, l, w, **kw)
  mma = _gemv.gemv_partials_merged(o, m, l, w, gemv="mma", **kw)
  assert_rel_close(_f64(mma), _f64(fma), rtol=_rtol(Hq * Dh), name=f"merged {mode}")
  v = merge_splits(o[:, None], m[:, None], l[:, None]).reshape(-1).astype(BF16)
  ref = _ref_gemv(v, w)
  assert_rel_close(_f64(fma).reshape(split, N).sum(0), _f64(ref), rtol=2.0 ** -8,
                   name=f"merged vs XLA {mode}")


@pytest.mark.parametrize("mode", MODES)
def test_swiglu_vector_matches_the_fma_form(mode):
  """The MLP's down GEMV: v = bf16(silu(gate) * up), finished from the gate / up GEMV's
  unfinished partials."""
  D, F = 128, 256
  x, g = _r(15, D), (1 + _r(16, D, scale=0.1)).astype(BF16)
  gu, wdt = _r(17, 2 * F, D, scale=D ** -0.5), _r(18, D, F, scale=F ** -0.5)
  part, ss = _gemv.gemv_partials(x, gu, scale_K=g, mode="hlo", block_k=64, split_k=2)
  kw = dict(norm_size=D, eps=EPS, dtype=BF16, mode=mode, block_n=64, block_k=128)
  fma = _gemv.gemv_partials_swiglu(part, ss, wdt, **kw)
  mma = _gemv.gemv_partials_swiglu(part, ss, wdt, gemv="mma", **kw)
  assert_rel_close(_f64(mma), _f64(fma), rtol=_rtol(F), name=f"swiglu {mode}")


def test_choices_are_checked():
  v, w = _r(0, 256), _r(1, 128, 256)
  kw = dict(mode="hlo")
  with pytest.raises(ValueError, match="unknown gemv='wmma'"):
    _gemv.gemv(v, w, gemv="wmma", **kw)
  with pytest.raises(ValueError, match="mma_swizzle=64 needs gemv='mma'"):
    _gemv.gemv(v, w, mma_swizzle=64, **kw)
  with pytest.raises(ValueError, match="mma_swizzle=16 must be one of"):
    _gemv.gemv(v, w, gemv="mma", mma_swizzle=16, **kw)
  with pytest.raises(ValueError, match="needs bf16 or int8 weights .got float32"):
    _gemv.gemv(v, w.astype(F32), gemv="mma", **kw)
  with pytest.raises(ValueError, match="block for K: 96 must be a positive multiple of 64"):
    _gemv.gemv(_r(0, 192), _r(1, 128, 192), gemv="mma", block_k=96, **kw)


def _int8(w, axis):
  from kernels.quant import quantize_int8
  return quantize_int8(w.astype(F32), axis=axis)


def _deq(q, s, axis):
  from kernels.quant import dequantize_int8
  return dequantize_int8(q, s, axis=axis)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("swizzle,xdtype", [(32, BF16), (64, F32), (128, BF16)])
def test_int8_gemv_matches_the_fma_form(mode, swizzle, xdtype):
  """int8 W^T on the tensor cores: the QKV / LM-head form (RMSNorm prologue, row scale,
  bias, block argmax) against the CUDA-core form and against the fp32 GEMV of the
  dequantized weights; two row blocks, two K steps (bf16 and fp32 activations)."""
  N, K = 128, 256
  v, g, b = _r(40, K, dtype=xdtype), (1 + _r(41, K, scale=0.1)).astype(BF16), _r(42, N)
  q, sc = _int8(_r(43, N, K, dtype=F32), axis=1)
  kw = dict(scale_K=g, w_scale_N=sc, bias_N=b, eps=EPS, argmax=True, out_dtype=F32,
            mode=mode, block_n=64, block_k=128)
  y_f, _, _ = _gemv.gemv(v, q, **kw)
  y, bmax, barg = _gemv.gemv(v, q, gemv="mma", mma_swizzle=swizzle, **kw)
  name = f"int8 mma {mode} {swizzle} {jnp.dtype(xdtype).name}"
  assert_rel_close(_f64(y), _f64(y_f), rtol=_rtol(K), name=name)
  assert_rel_close(_f64(y), _f64(_ref_gemv(v, _deq(q, sc, 1), g, bias=b)), rtol=_rtol(K),
                   name="ref")
  assert int(barg[jnp.argmax(bmax)]) == int(jnp.argmax(y))


@pytest.mark.parametrize("mode", MODES)
def test_int8_split_k_and_merged_vector_match_the_fma_form(mode):
  """int8 W^T with split-K partials and an unfinished vector (the chained QKV), and the
  O-projection's merged attention vector."""
  from kernels.decode_attention.reference import merge_splits
  N, K = 128, 256
  xu = Unfinished(_r(44, K), (_r(45, 2, K, dtype=F32, scale=0.1),))
  q, _ = _int8(_r(46, N, K, dtype=F32), axis=1)
  kw = dict(mode=mode, block_k=128, split_k=2)
  part_f, _ = _gemv.gemv_partials(xu, q, **kw)
  part_m, _ = _gemv.gemv_partials(xu, q, gemv="mma", **kw)
  assert_rel_close(_f64(part_m), _f64(part_f), rtol=_rtol(K), name=f"int8 partials {mode}")
  P, Hq, Dh = 2, 4, 64
  o, m = _r(47, P, Hq, Dh, dtype=F32), _r(48, P, Hq, dtype=F32)
  l = jnp.abs(_r(49, P, Hq, dtype=F32)) + 1.0
  qo, _ = _int8(_r(50, N, Hq * Dh, dtype=F32), axis=1)
  kw = dict(dtype=BF16, mode=mode, block_k=128, split_k=2)
  mma = _gemv.gemv_partials_merged(o, m, l, qo, gemv="mma", **kw)
  fma = _gemv.gemv_partials_merged(o, m, l, qo, **kw)
  assert_rel_close(_f64(mma), _f64(fma), rtol=_rtol(Hq * Dh), name=f"int8 merged {mode}")
  v = merge_splits(o[:, None], m[:, None], l[:, None]).reshape(-1).astype(BF16)
  assert_rel_close(_f64(mma).reshape(2, N).sum(0), _f64(_ref_gemv(v, qo)), rtol=2.0 ** -8,
                   name=f"int8 merged vs XLA {mode}")


PROMPT = [3, 17, 42, 7, 99, 256, 1]


def _tiny_bf16():
  from jaxlab.bench.decode import CONFIGS
  from jaxlab.models import LM, ModelConfig
  cfg = ModelConfig(**dict(CONFIGS["tiny"][0], param_dtype="bfloat16", d_model=128, head_dim=64,
                           n_heads=2, n_kv_heads=1, ffn_dim=256))
  return LM(cfg, rngs=nnx.Rngs(3))


@pytest.mark.slow   # ~13 s each: a tiny LM decoding through every GEMV kernel, interpreted
@pytest.mark.parametrize("mlp,attn", [("1k", None), ("2k", None), ("2k", "mma-pv")])
def test_decoder_with_mma_gemvs_matches_xla(mlp, attn):
  """kernel_options {"gemv": {"form": "mma"}} reaches every GEMV kernel of the step (the
  _gemv kernels and the one-kernel MLP), and with attention's scores "mma-pv" (the
  pallas-mma-attn bench variant) every product of the step is on the tensor cores: a
  tiny bf16 LM decodes 32 greedy tokens as the XLA step does."""
  from jaxlab.models.decode import decode_greedy
  model = _tiny_bf16()
  layout = {"layout": {"mlp": mlp}}
  want = decode_greedy(model, PROMPT, 32, impl="xla", kernel_options=layout)
  assert len(set(np.asarray(want).tolist())) >= 8, "degenerate continuation: test is too weak"
  opts = dict(layout, gemv={"form": "mma"})
  if attn:
    opts["decode_attention"] = {"scores": attn}
  got = decode_greedy(model, PROMPT, 32, impl="pallas", kernel_options=opts)
  np.testing.assert_array_equal(got, want)


@pytest.mark.slow   # ~15 s each
@pytest.mark.parametrize("w_down", ["FD", "DF"])
def test_int8_decoder_with_mma_gemvs_matches_xla(w_down):
  """quantize="int8" with the gemv group's "mma" form (pallas-int8-mma with W_down^T):
  a tiny bf16 LM decodes 32 greedy tokens as the XLA int8 step does."""
  from jaxlab.models.decode import decode_greedy
  model = _tiny_bf16()
  layout = {"layout": {"w_down": w_down}}
  want = decode_greedy(model, PROMPT, 32, impl="xla", quantize="int8", kernel_options=layout)
  assert len(set(np.asarray(want).tolist())) >= 8, "degenerate continuation: test is too weak"
  got = decode_greedy(model, PROMPT, 32, impl="pallas", quantize="int8",
                      kernel_options=dict(layout, gemv={"form": "mma"}))
  np.testing.assert_array_equal(got, want)


def test_decoder_gemv_group_is_checked():
  from jaxlab.models.decode import make_decoder
  model = _tiny_bf16()
  for bad in ({"form": "tensor"}, {"form": "fma", "swizzle": 64}, {"form": "mma", "swizzle": 8},
              {"form": "mma", "width": 16}):
    with pytest.raises(ValueError, match=r"kernel_options\['gemv'\]"):
      make_decoder(model, "pallas", 64, kernel_options={"gemv": bad}, interpret="hlo")


def test_gemv_group_fills_the_gemv_ops_only():
  """The group's form goes to the GEMV ops (into both of the two-kernel MLP's blocks),
  an op's own choice wins, and neither the attention ops nor the XLA step see it."""
  from jaxlab.models.decode import _Spec
  from kernels._common import freeze
  opts = {"gemv": {"form": "mma", "swizzle": 32}, "rmsnorm_qkv": {"gemv": "fma"},
          "rmsnorm_swiglu_2k": {"down_block": {"split_k": 8}}}
  frozen = tuple(sorted((k, freeze(v)) for k, v in opts.items()))
  spec = lambda impl: _Spec(n_layers=1, n_heads=1, n_kv=1, head_dim=64, eps=EPS,
                            use_rope=(True,), inv_freq=(), attn_factor=1.0, max_len=8,
                            cache_len=64, impl=impl, layers="unrolled", interpret="hlo",
                            options=frozen, kinds=("attention",))
  s = spec("pallas")
  mma = {"gemv": "mma", "mma_swizzle": 32}
  assert s.opts("rmsnorm_qkv") == {"gemv": "fma"}
  assert s.opts("lm_head_argmax") == mma and s.opts("out_proj_residual") == mma
  assert s.opts("rmsnorm_swiglu_2k") == {"gate_up_block": mma,
                                         "down_block": dict(mma, split_k=8)}
  assert s.opts("rmsnorm_swiglu") == mma
  assert s.opts("decode_attention") == {} and s.opts("rope_append") == {}
  assert spec("xla").opts("lm_head_argmax") == {}


def _kernels_with_wgmma(lowered, form: bytes = b"") -> dict[str, bool]:
  """{kernel name: whether its Mosaic module issues wgmma.mma_async (of the given form:
  b".s32.s8.s8" for int8 WGMMA)} of a lowered step."""
  from jax._src.lib.mlir import ir

  from jaxlab.bench.kernels import _walk, mosaic_launch
  out = {}
  for op in _walk(lowered.compiler_ir("stablehlo").operation):
    if op.name == "stablehlo.custom_call" and "mosaic_gpu" in str(
        op.attributes["call_target_name"]):
      data = bytes(ir.StringAttr(op.attributes["mhlo.backend_config"]["module"]).value_bytes)
      name = mosaic_launch(data).name
      out[name] = out.get(name, False) or b"wgmma.mma_async" + form in data
  return out


@pytest.mark.slow   # ~15 s each: a whole 1B layer lowered
# lowering only: checked on CPU; the GPU run (scripts/gpu_session.sh) spends its pytest
# budget on the compiled cases
@pytest.mark.skipif(jax.default_backend() == "gpu", reason="lowering only (CPU checks it)")
@pytest.mark.parametrize("form,mlp,attn,quantize", [
    ("fma", "2k", None, None), ("mma", "2k", None, None), ("mma", "1k", None, None),
    ("mma", "2k", "mma-pv", None), ("mma", "1k", None, "int8"),
    ("mma-s8", "1k", None, "int8")])
def test_bench_step_lowers_with_its_gemvs_on_the_tensor_cores(form, mlp, attn, quantize):
  """One llama-1b-bench layer lowered for CUDA (two-kernel MLP, chained; or the default
  one-kernel MLP, fused with the O-projection): with the gemv group's "mma" form every
  GEMV kernel (QKV, O-projection, the MLP kernels, LM head) issues WGMMA and the
  attention kernels do not, unless decode_attention's scores are "mma-pv"; with "fma"
  none does. int8 weights (the one-kernel MLP with W_down^T, pallas-int8-mma): the same,
  each tile widened through the packed s8 -> bf16 conversion; with "mma-s8" (pallas-int8-s8)
  the same kernels issue WGMMA on the int8 tiles themselves, with no widening anywhere."""
  from jaxlab.bench.decode import CONFIGS
  from jaxlab.models import LM, ModelConfig
  from jaxlab.models.decode import init_state, prepare_weights, step_function
  SD = jax.ShapeDtypeStruct
  cfg = ModelConfig(**dict(CONFIGS["llama-1b-bench"][0], n_layers=1))
  opts = {"layout": {"mlp": mlp}, "gemv": {"form": form}}
  if attn:   # pallas-mma-attn: attention's two products on the tensor cores too
    opts["decode_attention"] = {"scores": attn}
  w_down = "DF" if mlp == "2k" or quantize else "FD"
  if w_down == "DF":
    opts["layout"]["w_down"] = "DF"
  weights = jax.eval_shape(lambda: prepare_weights(LM(cfg, rngs=nnx.Rngs(0)), quantize,
                                                   w_down=w_down, mlp=mlp))
  step, S = step_function(cfg, "pallas", 1100, interpret=False, kernel_options=opts)
  state = jax.eval_shape(lambda: init_state(cfg, S))
  lowered = step.trace(weights, state, SD((), jnp.int32)).lower(lowering_platforms=("cuda",))
  kernels = _kernels_with_wgmma(lowered)
  gemvs = {"rmsnorm_qkv", "out_proj_residual", "lm_head_argmax"} | (
      {"mlp_gate_up", "mlp_down"} if mlp == "2k" else {"rmsnorm_swiglu"})
  assert gemvs < set(kernels), sorted(kernels)
  assert {k for k, mma in kernels.items() if mma} == (
      (gemvs if form != "fma" else set()) | ({"decode_attention"} if attn else set()))
  text = lowered.as_text()
  if quantize and form == "mma":
    assert "sub.bf16x2" in text and "sitofp" not in text
  if form == "mma-s8":   # int8 WGMMA in every GEMV kernel; no tile widened (the readout's
    # int32 -> fp32 conversions are once per step and column)
    assert {k for k, s8 in _kernels_with_wgmma(lowered, b".sync.aligned.m64n8k32.s32.s8.s8")
            .items() if s8} == gemvs
    assert "sub.bf16x2" not in text


def _attention_case(Hq, Dh, S, L, extra, Hkv=2):
  """bf16 q and caches [Hkv, S, Dh] with NaN past the live length L, and the partials'
  keyword arguments: scale, and a score bias or a gate update (extra) with NaN there too."""
  tail = jnp.arange(S)[None, :, None] >= L
  q = _r(20, Hq, Dh)
  kc = jnp.where(tail, jnp.nan, _r(21, Hkv, S, Dh))
  vc = jnp.where(tail, jnp.nan, _r(22, Hkv, S, Dh))
  kw = dict(scale=Dh ** -0.5)
  row = jnp.where(jnp.arange(S) < L, -jnp.abs(_r(23, Hq, S, dtype=F32)), jnp.nan)
  if extra == "bias":
    kw["bias_HS"] = row
  elif extra == "gate":
    kw["gate_g"] = (row, -jnp.abs(_r(24, Hq, dtype=F32)))
  return q, kc, vc, kw


def _merged_matches_reference(parts, q, kc, vc, L, kw, name):
  """The split partials (o, m, l) merged in XLA against the reference attention, whose
  output is rounded to q's dtype (bf16: 2^-9 per element, so 2^-8 of the norm)."""
  from kernels.decode_attention import reference
  o, m, l = parts[:3]
  P, Hkv, G, Dh = o.shape
  merged = reference.merge_splits(o, m, l).reshape(Hkv * G, Dh)
  ref_kw = dict(scale=kw["scale"], bias_HS=kw.get("bias_HS"))
  if "gate_g" in kw:
    ref_kw.update(gate_HS=kw["gate_g"][0], g_H=kw["gate_g"][1])
  want = reference.decode_attention(q, kc, vc, L, **ref_kw)
  want = want[0] if "gate_g" in kw else want
  assert_rel_close(_f64(merged), _f64(want), rtol=2.0 ** -8, name=name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("Dh,extra", [(64, "bias"),
                                      pytest.param(128, None, marks=pytest.mark.slow),
                                      pytest.param(64, "gate", marks=pytest.mark.slow)])
def test_attention_scores_on_the_tensor_cores(mode, Dh, extra):
  """decode attention with scores="mma" (K tile @ B [Dh, 16], the CTA's q heads as B's
  columns) gives the CUDA-core form's split partials (m, l, o, fp32) within fp32 rounding
  (q . K is scaled after the sum instead of q before it); NaN past the live length, a
  score bias and the in-kernel gate update included. Dh 128: two query heads per CTA."""
  from kernels.decode_attention import pallas as attn
  L = 130
  q, kc, vc, kw = _attention_case(8, Dh, 192, L, extra)
  kw.update(mode=mode, block_s=64, num_splits=2)
  fma = attn.partials(q, kc, vc, L, **kw)
  mma = attn.partials(q, kc, vc, L, scores="mma", **kw)
  for name, a, b in zip(("o", "m", "l"), mma[:3], fma[:3]):
    assert_rel_close(_f64(a), _f64(b), rtol=tol(F32, L * Dh), name=f"{name} {mode}")
  _merged_matches_reference(mma, q, kc, vc, L, kw, f"mma merged {mode}")
  if extra == "gate":
    np.testing.assert_array_equal(np.asarray(mma[3])[:, :L], np.asarray(fma[3])[:, :L])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("Dh,extra,splits,Hq", [
    (64, "bias", 4, 8),
    pytest.param(128, None, 2, 8, marks=pytest.mark.slow),
    pytest.param(64, "gate", 2, 6, marks=pytest.mark.slow)])   # 3 heads a CTA: m, l as scalars
def test_attention_on_the_tensor_cores_with_pv(mode, Dh, extra, splits, Hq):
  """scores="mma-pv" (S = q rows @ K^T and o += P @ V, both WGMMAs; rows g and g + 32 hold
  head g, P's in hi and lo bf16) gives the CUDA-core form's split partials: m and l within
  fp32 rounding, o within that plus MMA_V for p's two-part form. NaN past the live length
  (V zeroed in SMEM before the product), a score bias, the in-kernel gate update, splits
  of several blocks (the accumulator rescaled) and an empty one included."""
  from kernels.decode_attention import pallas as attn
  L = 300   # 5 blocks of 64, all live: 4 splits take 2, 2, 1 and 0
  q, kc, vc, kw = _attention_case(Hq, Dh, 320, L, extra)
  kw.update(mode=mode, block_s=64, num_splits=splits)
  fma = attn.partials(q, kc, vc, L, **kw)
  pv = attn.partials(q, kc, vc, L, scores="mma-pv", **kw)
  live = np.isfinite(np.asarray(fma[1]))   # [P, Hkv, G]: False for the empty split's rows
  assert (not live.all()) == (splits == 4)
  np.testing.assert_array_equal(np.isfinite(np.asarray(pv[1])), live)
  for name, a, b, rtol in zip(("o", "m", "l"), pv[:3], fma[:3],
                              (_rtol(L * Dh), tol(F32, Dh), tol(F32, L))):
    assert_rel_close(_f64(a)[live], _f64(b)[live], rtol=rtol, name=f"{name} {mode}")
    np.testing.assert_array_equal(_f64(a)[~live], _f64(b)[~live])
  _merged_matches_reference(pv, q, kc, vc, L, kw, f"mma-pv merged {mode}")
  if extra == "gate":
    np.testing.assert_array_equal(np.asarray(pv[3])[:, :L], np.asarray(fma[3])[:, :L])


def test_attention_score_choices_are_checked():
  from kernels.decode_attention import decode_attention
  from kernels.path_decode_attention import path_decode_attention
  q, kc = _r(0, 8, 64), _r(1, 2, 64, 64)
  kw = dict(scale=1.0, impl="pallas", interpret="hlo")
  with pytest.raises(ValueError, match="unknown scores='tc'"):
    decode_attention(q, kc, kc, 5, scores="tc", **kw)
  with pytest.raises(ValueError, match="scores='mma' needs bf16 q and K .got float32"):
    decode_attention(q.astype(F32), kc.astype(F32), kc, 5, scores="mma", **kw)
  with pytest.raises(ValueError, match="scores='mma' needs"):
    path_decode_attention(q, kc, kc, jnp.ones((2, 64)), jnp.ones(2), 5, scores="mma", **kw)
  with pytest.raises(ValueError, match="head dim in multiples of 64 .got 32"):
    decode_attention(_r(0, 8, 32), _r(1, 2, 64, 32), _r(1, 2, 64, 32), 5, scores="mma", **kw)
  with pytest.raises(ValueError, match="scores='mma-pv' needs bf16 q, K and V .got "
                     "bfloat16, bfloat16, float32"):
    decode_attention(q, kc, kc.astype(F32), 5, scores="mma-pv", **kw)
  with pytest.raises(ValueError, match="at most 32 query heads per CTA .got 64"):
    decode_attention(_r(0, 64, 64), kc[:1], kc[:1], 5, scores="mma-pv", block_g=64, **kw)


def _mlp_case(D, F, seed=30):
  x, g = _r(seed, D), (1 + _r(seed + 1, D, scale=0.1)).astype(BF16)
  ws = [_r(seed + 2 + i, F, D, scale=D ** -0.5) for i in range(2)]
  return x, g, *ws, _r(seed + 4, F, D, scale=F ** -0.5)


def _mlp_x(x, extra, seed):
  """The MLP kernel's x operands: x itself, or ("parts") a residual and the output
  projection's three split-K partial rows to finish it from. (x_in, x_parts, partials)."""
  if extra != "parts":
    return (x,), None, None
  op = _r(seed, 3, x.shape[0], dtype=F32, scale=0.3)
  return (x, op), (3, False), op


# The one-kernel MLP rounds h = silu(gate) * up to bf16 before the down projection, in
# either form; the forms' gate / up sums differ by ~1e-7 (relative), so h may differ by
# one bf16 step in an element close to a rounding boundary, which moves the CTA's
# partial row by ~2^-8 |h_i w_i|. MLP_RTOL allows about one such element in BF = 64;
# a form that dropped x * g's lo column (error 2^-9 in every gate / up sum) moves about
# half of them and fails it by ~4x.
MLP_RTOL = 2.0 ** -8 / 8


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("down_t,swizzle,extra", [(False, 64, None), (True, 64, None),
                                                   (False, 128, "parts"), (True, 32, "once")])
def test_one_kernel_mlp_matches_the_fma_form(mode, down_t, swizzle, extra):
  """kernels/rmsnorm_swiglu with gemv="mma": gate and up tiles against one B of x * g per
  step, and h (exact in bf16) as the down projection's other operand, built once (W_down
  [F, D]: A's row 0 against the tile as B; W_down^T: B's column 0 against the tile as
  A). Partial rows against the CUDA-core form; x also finished from the output
  projection's partials ("parts") and the one-store partial row ("once")."""
  from kernels.rmsnorm_swiglu import pallas as mlp
  D, F = 512, 128
  x, g, wg, wu, wd = _mlp_case(D, F)
  wd = wd.T if down_t else wd
  # W_down [F, D]: D / block_d = 8 accumulator rows, one per step (4 with "parts": the
  # output rows padded to a whole 8-row tile)
  kw = dict(eps=EPS, mode=mode, down_t=down_t, block_f=64, block_k=128,
            block_d=128 if down_t or extra == "parts" else 64, store_once=extra == "once")
  x_in, parts, op = _mlp_x(x, extra, 35)
  run = lambda **f: mlp._call(x_in, parts, g, wg, wu, wd, (None, None, None), **kw, **f)
  fma, mma = run(), run(gemv="mma", mma_swizzle=swizzle)
  assert_rel_close(_f64(mma), _f64(fma), rtol=_rtol(D) + MLP_RTOL,
                   name=f"mlp {mode} down_t={down_t} {extra}")
  # the finished op against the reference, at bf16 output precision (as the 2k MLP's test)
  from kernels.rmsnorm_swiglu import reference
  xf = mlp.finish_x(x, op) if extra == "parts" else x
  down = dict(w_down_t_DF=wd) if down_t else dict(w_down_FD=wd)
  ref = reference.rmsnorm_swiglu(xf, g, wg, wu, eps=EPS, **down)
  assert_rel_close(_f64(mlp._finish(xf, mma)), _f64(ref), rtol=2.0 ** -8,
                   name=f"mlp {mode} vs reference")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("down_t,xdtype,extra", [(False, BF16, None), (True, BF16, "parts"),
                                                  (True, F32, None)])
def test_int8_one_kernel_mlp_matches_the_fma_form(mode, down_t, xdtype, extra):
  """kernels/rmsnorm_swiglu with int8 weights and gemv="mma": the gate / up tiles widened
  to bf16 as A operands; the down tiles too with W_down^T (h's hi / lo columns as B: h is
  rounded to the activations' dtype, so fp32 activations need the lo column), while
  W_down [F, D] keeps the down phase on the CUDA cores. Partial rows against the
  CUDA-core form, and the finished op against the fp32 MLP of the dequantized weights."""
  from kernels.rmsnorm_swiglu import pallas as mlp
  from kernels.rmsnorm_swiglu import reference
  D, F = 512, 128
  x, g, wg, wu, wd = _mlp_case(D, F, seed=60)
  x = x.astype(xdtype)
  (qg, sg), (qu, su) = _int8(wg, 1), _int8(wu, 1)
  qd, sd = _int8(wd.T, 1) if down_t else _int8(wd, 0)
  kw = dict(eps=EPS, mode=mode, down_t=down_t, block_f=64, block_k=128,
            block_d=128 if down_t else 64)
  x_in, parts, op = _mlp_x(x, extra, 61)
  run = lambda **f: mlp._call(x_in, parts, g, qg, qu, qd, (sg, su, sd), **kw, **f)
  fma, mma = run(), run(gemv="mma", mma_swizzle=64)
  name = f"int8 mlp {mode} down_t={down_t} {jnp.dtype(xdtype).name} {extra}"
  # The forms differ by x * g's hi / lo representation in the gate / up sums (over D).
  # bf16 x: h is rounded to bf16 in both, so that may move one bf16 step of h (MLP_RTOL).
  # fp32 x: h stays fp32 and enters the down sum (over F) as hi / lo columns too.
  rtol = _rtol(D) + (MLP_RTOL if xdtype == BF16 else _rtol(F))
  assert_rel_close(_f64(mma), _f64(fma), rtol=rtol, name=name)
  xf = mlp.finish_x(x, op) if extra == "parts" else x
  down = dict(w_down_t_DF=_deq(qd, sd, 1)) if down_t else dict(w_down_FD=_deq(qd, sd, 0))
  ref = reference.rmsnorm_swiglu(xf, g, _deq(qg, sg, 1), _deq(qu, su, 1), eps=EPS, **down)
  # the finished output is rounded to x's dtype: bf16's 2^-8, or fp32's (both sums)
  rtol = 2.0 ** -8 if xdtype == BF16 else _rtol(D) + _rtol(F)
  assert_rel_close(_f64(mlp._finish(xf, mma)), _f64(ref), rtol=rtol, name=name + " ref")


def test_one_kernel_mlp_choices_are_checked():
  from kernels.rmsnorm_swiglu import rmsnorm_swiglu
  x, g, wg, wu, wd = _mlp_case(512, 128)
  kw = dict(eps=EPS, impl="pallas", interpret="hlo", gemv="mma")
  with pytest.raises(ValueError, match="rmsnorm_swiglu: gemv='mma' needs bf16 or int8 weights"):
    rmsnorm_swiglu(x, g, wg.astype(F32), wu.astype(F32), wd.astype(F32), **kw)
  with pytest.raises(ValueError, match="block for D: 96 must be a positive multiple of 64"):
    rmsnorm_swiglu(x[:384], g[:384], wg[:, :384], wu[:, :384], w_down_t_DF=wd[:, :384].T,
                   block_k=96, **kw)
  with pytest.raises(ValueError, match="block_d=512 must be at most 256"):
    rmsnorm_swiglu(x, g, wg, wu, wd, block_d=512, **kw)
  with pytest.raises(ValueError, match=r"at most 64 blocks \(D / block_d = 128\)"):
    big = lambda w: jnp.tile(w, (1, 16))
    rmsnorm_swiglu(big(x[None])[0], big(g[None])[0], big(wg), big(wu), big(wd), block_d=64,
                   **kw)
