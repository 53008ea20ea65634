"""Int8 weight-only GEMVs (kernels.quant; issue 7's "int8 weight-only is a plus").

The quantizer's error bound; every GEMV op with int8 weights, Pallas (interpreted)
against its XLA reference and both against an independent oracle (the same op on the
dequantized fp32 weights); the decode driver with quantize="int8": 64 greedy tokens
identical to generate() of the model whose weights were replaced by their dequantized
values (so prefill, the reference and the int8 step all see the same numbers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.models import LM, ModelConfig
from jaxlab.models.decode import decode_greedy, make_decoder, prepare_weights
from jaxlab.models.generate import generate
from jaxlab.testing import assert_rel_close, tol
from kernels.attention_out_mlp import attention_out_mlp
from kernels.lm_head_argmax import lm_head_argmax
from kernels.out_proj_mlp import out_proj_mlp
from kernels.out_proj_residual import out_proj_residual
from kernels.quant import QMAX, dequantize_int8, quantize_int8
from kernels.qkv_rope_append import qkv_rope_append
from kernels.rmsnorm_qkv import rmsnorm_qkv
from kernels.rmsnorm_swiglu import rmsnorm_swiglu

F32, BF16 = jnp.float32, jnp.bfloat16
EPS = 1e-6


def _r(seed, *shape):
  return jax.random.normal(jax.random.key(seed), shape)


def _close(out, ref, dtype, reduction, name):
  assert_rel_close(np.asarray(out, np.float64), np.asarray(ref, np.float64),
                   rtol=tol(dtype, reduction), name=name)


@pytest.mark.parametrize("axis", [0, 1])
def test_quantize_int8_error_bound(axis):
  w = _r(0, 48, 80) * jnp.linspace(0.01, 3.0, 80)   # channels of very different ranges
  w = w.at[5].set(0.0) if axis == 1 else w.at[:, 5].set(0.0)   # one all-zero channel
  q, s = quantize_int8(w, axis=axis)
  assert q.dtype == jnp.int8 and s.dtype == F32 and s.shape == (w.shape[1 - axis],)
  deq = dequantize_int8(q, s, axis=axis)
  # Round to nearest: |w - q s| <= s / 2 (+ the fp32 rounding of w / s and q * s).
  bound = jnp.expand_dims(s, axis) * (0.5 + 4 * np.finfo(np.float32).eps * QMAX)
  assert bool(jnp.all(jnp.abs(w - deq) <= bound))
  qa = np.abs(np.asarray(q, np.int32))
  assert qa.max() <= QMAX
  np.testing.assert_array_equal(qa.max(axis=axis)[np.arange(qa.shape[1 - axis]) != 5], QMAX)
  assert float(s[5]) == 1.0 and not np.any(np.take(qa, 5, axis=1 - axis))
  # Quantizing the dequantized weights gives back the same int8 weights.
  np.testing.assert_array_equal(np.asarray(quantize_int8(deq, axis=axis)[0]), np.asarray(q))


def _gemv_cases(dt):
  """op name -> (call(impl, weights, scales, **block), float weights, (scale kw, axis) per
  weight, reduction length of the largest dot product)."""
  D, N, M, F, V = 128, 192, 192, 256, 320
  x = (2.0 * _r(1, D)).astype(dt)
  g = (1.0 + 0.2 * _r(2, D)).astype(dt)
  o = _r(3, M).astype(dt)
  w = lambda seed, *shape: _r(seed, *shape) / np.sqrt(shape[-1])
  return {
      "rmsnorm_qkv": (
          lambda impl, ws, sc, **b: rmsnorm_qkv(x, g, ws[0], _r(4, N), eps=EPS, impl=impl,
                                                w_scale_N=sc[0], **b),
          [w(5, N, D)], [("w_scale_N", 1)], D),
      "out_proj_residual": (
          lambda impl, ws, sc, **b: out_proj_residual(o, ws[0], x, impl=impl, w_scale_D=sc[0],
                                                      **b),
          [w(6, D, M)], [("w_scale_D", 1)], M),
      "rmsnorm_swiglu": (
          lambda impl, ws, sc, **b: rmsnorm_swiglu(x, g, *ws, eps=EPS, impl=impl,
                                                   w_gate_scale_F=sc[0], w_up_scale_F=sc[1],
                                                   w_down_scale_D=sc[2], **b),
          [w(7, F, D), w(8, F, D), w(9, F, D) * np.sqrt(D / F)],
          [("w_gate_scale_F", 1), ("w_up_scale_F", 1), ("w_down_scale_D", 0)], F),
      "rmsnorm_swiglu w_down_t_DF": (
          lambda impl, ws, sc, **b: rmsnorm_swiglu(x, g, ws[0], ws[1], w_down_t_DF=ws[2],
                                                   eps=EPS, impl=impl, w_gate_scale_F=sc[0],
                                                   w_up_scale_F=sc[1], w_down_scale_D=sc[2], **b),
          [w(7, F, D), w(8, F, D), w(9, D, F)],
          [("w_gate_scale_F", 1), ("w_up_scale_F", 1), ("w_down_scale_D", 1)], F),
      "lm_head_argmax": (
          lambda impl, ws, sc, **b: lm_head_argmax(x, g, ws[0], eps=EPS, impl=impl,
                                                   w_scale_V=sc[0], **b),
          [w(10, V, D)], [("w_scale_V", 1)], D),
      # The fused ops: Hq = 4, Hkv = 2, Dh = 32 -> N = 256 (q output compared).
      "qkv_rope_append": (
          lambda impl, ws, sc, **b: qkv_rope_append(
              x, g, ws[0], _r(11, 256).astype(dt), _r(12, 32), _r(13, 32),
              _r(14, 2, 64, 32).astype(dt), _r(15, 2, 64, 32).astype(dt), 5, eps=EPS,
              n_heads=4, n_kv_heads=2, impl=impl, w_scale_N=sc[0], **b),
          [w(16, 256, D)], [("w_scale_N", 1)], D),
      "out_proj_mlp": (
          lambda impl, ws, sc, **b: out_proj_mlp(
              o, ws[0], x, g, *ws[1:], eps=EPS, impl=impl, w_o_scale_D=sc[0],
              w_gate_scale_F=sc[1], w_up_scale_F=sc[2], w_down_scale_D=sc[3], **b),
          [w(6, D, M), w(7, F, D), w(8, F, D), w(9, F, D) * np.sqrt(D / F)],
          [("w_o_scale_D", 1), ("w_gate_scale_F", 1), ("w_up_scale_F", 1),
           ("w_down_scale_D", 0)], M + F),
      # Hq = 6, Hkv = 2, Dh = 32 (M = 192), 40 live slots of 64.
      "attention_out_mlp": (
          lambda impl, ws, sc, **b: attention_out_mlp(
              _r(17, 6, 32).astype(dt), _r(18, 2, 64, 32).astype(dt),
              _r(19, 2, 64, 32).astype(dt), 40, ws[0], x, g, *ws[1:], scale=32 ** -0.5,
              eps=EPS, impl=impl, w_o_scale_D=sc[0], w_gate_scale_F=sc[1],
              w_up_scale_F=sc[2], w_down_scale_D=sc[3], **b),
          [w(6, D, M), w(7, F, D), w(8, F, D), w(9, F, D) * np.sqrt(D / F)],
          [("w_o_scale_D", 1), ("w_gate_scale_F", 1), ("w_up_scale_F", 1),
           ("w_down_scale_D", 0)], 40 + M + F),
  }


BLOCKS = {"rmsnorm_qkv": [dict(split_k=1), dict(split_k=2), dict()],
          "out_proj_residual": [dict(split_k=1), dict(split_k=3)],
          "rmsnorm_swiglu": [dict(store_once=False), dict(store_once=True)],
          "rmsnorm_swiglu w_down_t_DF": [dict(store_once=False), dict(store_once=True)],
          "lm_head_argmax": [dict()],
          "qkv_rope_append": [dict(split_k=1), dict(split_k=2)],
          "out_proj_mlp": [dict(o_block=dict(block_n=64, block_k=64, split_k=1)),
                           dict(o_block=dict(block_n=64, block_k=64, split_k=3),
                                store_once=True)],
          "attention_out_mlp": [dict(o_block=dict(block_n=64, block_k=64, split_k=3),
                                     attn_block=dict(num_splits=2))]}
SMALL = {"rmsnorm_swiglu": dict(block_f=64, block_k=64, block_d=64),
         "rmsnorm_swiglu w_down_t_DF": dict(block_f=64, block_k=64, block_d=64),
         "out_proj_mlp": dict(block_f=64, block_k=64, block_d=64),
         "attention_out_mlp": dict(block_f=64, block_k=64, block_d=64)}


def _quantized(ws, spec):
  qs = [quantize_int8(w, axis=axis) for w, (_, axis) in zip(ws, spec)]
  return [q for q, _ in qs], [s for _, s in qs]


@pytest.mark.parametrize("op", list(BLOCKS))
def test_int8_ops_match_reference_and_dequantized_oracle(op):
  call, ws, spec, n = _gemv_cases(F32)[op]
  qs, ss = _quantized(ws, spec)
  ref = call("xla", qs, ss)
  # Independent oracle: the same op, unquantized, on fp32 weights equal to q * scale.
  deq = [dequantize_int8(q, s, axis=axis) for q, s, (_, axis) in zip(qs, ss, spec)]
  oracle = call("xla", deq, [None] * len(deq))
  # fp32 throughout: the oracle's products carry one rounding of q * s more.
  _close(jax.tree.leaves(ref)[0], jax.tree.leaves(oracle)[0], F32, n, f"{op} xla vs oracle")
  block = SMALL.get(op, dict(block_n=64, block_k=64))
  for b in BLOCKS[op]:
    out = jax.jit(lambda qs, ss: call("pallas", qs, ss, **block, **b))(qs, ss)
    _close(jax.tree.leaves(out)[0], jax.tree.leaves(ref)[0], F32, n, f"{op} pallas {b}")
    if op == "lm_head_argmax":
      assert int(out[1]) == int(ref[1]) == int(jnp.argmax(ref[0]))


@pytest.mark.parametrize("op", list(BLOCKS))
def test_int8_ops_in_bf16(op):
  """bf16 activations (the bench models): the reference converts q to bf16 (exact for
  |q| <= 127) and rounds the normalized activation to bf16; the kernels keep it in fp32.
  Both accumulate in fp32 and round the output to bf16 once. Three roundings of 2^-9
  (relative) apart: the activation's (its effect on y is ~2^-9 ||y|| for random signs)
  and each side's output rounding, so ||out - ref|| <= 3 * 2^-9 ||ref||. (tol(bf16, n)
  would allow ~50% here, a check that could not fail.)"""
  call, ws, spec, n = _gemv_cases(BF16)[op]
  qs, ss = _quantized(ws, spec)
  ref = jax.tree.leaves(call("xla", qs, ss))[0]
  out = jax.tree.leaves(call("pallas", qs, ss, **SMALL.get(op, dict(block_n=64, block_k=64))))[0]
  assert out.dtype == ref.dtype
  assert_rel_close(np.asarray(out, np.float64), np.asarray(ref, np.float64), rtol=3 * 2.0 ** -9,
                   name=f"{op} bf16")


def test_int8_scale_arguments_are_checked():
  x, g = jnp.ones(64), jnp.ones(64)
  q, s = quantize_int8(_r(0, 64, 64), axis=1)
  with pytest.raises(ValueError, match="w_scale_N .*required"):
    rmsnorm_qkv(x, g, q, eps=EPS, impl="xla")
  with pytest.raises(ValueError, match=r"w_scale_N \(32,\) must be \[64\]"):
    rmsnorm_qkv(x, g, q, eps=EPS, impl="pallas", w_scale_N=s[:32])
  with pytest.raises(ValueError, match="w_scale_D is only for int8"):
    out_proj_residual(x, jnp.ones((64, 64)), x, impl="xla", w_scale_D=s)
  with pytest.raises(ValueError, match="all three weights to int8 or none"):
    rmsnorm_swiglu(x, g, q, q, jnp.ones((64, 64)), eps=EPS, impl="xla", w_gate_scale_F=s,
                   w_up_scale_F=s)
  with pytest.raises(ValueError, match="w_scale_V"):
    lm_head_argmax(x, g, q, eps=EPS, impl="pallas")


# ------------------------------------------------------------------- decode driver

CFG = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=32,
                  ffn_dim=256, init_std=0.3, tie_embeddings=False)
PROMPT = [3, 17, 42, 7, 99, 256, 1]
N = 64


def _dequantized_model():
  """The tiny LM with every GEMV weight replaced by its int8 dequantization, per output
  channel as the decoder quantizes it (kernels are [in, out]: reduce over axis 0)."""
  model = LM(CFG, rngs=nnx.Rngs(0))

  def dq(p, axis):
    q, s = quantize_int8(p[...], axis=axis)
    p[...] = dequantize_int8(q, s, axis=axis, dtype=p[...].dtype)

  for blk in model.layers:
    for lin in (blk.mixer.q_proj, blk.mixer.k_proj, blk.mixer.v_proj, blk.mixer.o_proj,
                blk.mlp.gate_proj, blk.mlp.up_proj, blk.mlp.down_proj):
      dq(lin.kernel, 0)
  dq(model.lm_head.kernel, 0)
  return model


@pytest.fixture(scope="module")
def dq_model():
  return _dequantized_model()


@pytest.mark.parametrize("impl,layers", [("pallas", "unrolled"), ("xla", "unrolled"),
                                         # the scanned XLA step: slow (CI runs it)
                                         pytest.param("xla", "scan", marks=pytest.mark.slow)])
def test_int8_decoder_greedy_64_tokens(dq_model, impl, layers):
  ref = np.asarray(generate(dq_model, np.array([PROMPT]), max_new_tokens=N)["tokens"][0])
  assert len(set(ref.tolist())) >= 16, "degenerate continuation: test is too weak"
  toks = decode_greedy(dq_model, PROMPT, N, impl=impl, layers=layers, quantize="int8")
  np.testing.assert_array_equal(toks, ref)


def test_int8_decoder_stores_int8_and_scales(dq_model):
  w = prepare_weights(dq_model, "int8")
  lw = w["layers"][0]
  for name in ("w_qkv_t", "w_o_t", "w_gate_t", "w_up_t", "w_down"):
    assert lw[name].dtype == jnp.int8, name
  assert w["w_head_t"].dtype == jnp.int8 and w["w_head_scale"].shape == (CFG.vocab_size,)
  assert lw["w_down_scale"].shape == (CFG.d_model,) and lw["w_qkv_scale"].shape == (
      (CFG.n_heads + 2 * CFG.kv_heads) * CFG.dim_per_head,)
  assert w["embed"].dtype == jnp.float32   # the lookup table stays as it is
  # One step from the same state: the int8 step's logits equal the fp32 step's on the
  # dequantized weights (they compute the same products, up to fp32 rounding).
  outs = []
  for quantize in (None, "int8"):
    dec = make_decoder(dq_model, "xla", 16, quantize=quantize)
    _, st = dec.prefill(PROMPT)
    outs.append(np.asarray(dec.step(st, 5)[0]))
  _close(outs[1], outs[0], F32, CFG.hidden_dim, "int8 vs dequantized step")
  with pytest.raises(ValueError, match="unknown quantize 'int4'"):
    make_decoder(dq_model, "xla", 16, quantize="int4")
