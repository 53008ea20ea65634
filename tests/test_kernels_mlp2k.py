"""The two-kernel MLP (kernels/rmsnorm_swiglu_2k): the gate / up GEMV leaves its split-K
partials unfinished and the down GEMV finishes h = silu(gate) * up block by block as it
streams. Checked against its reference (rmsnorm_swiglu's, on the stacked and transposed
weights) in the HLO interpreter across block and split choices, in bf16 against the
one-kernel MLP, in the Mosaic-GPU interpreter, lowered for CUDA at the bench shapes, and
in the decode driver (kernel_options layout mlp "2k"). Tolerances: fp32 with reduction
D + F (the two dot products in a row)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.testing import assert_rel_close, tol
from kernels.rmsnorm_swiglu import rmsnorm_swiglu
from kernels.rmsnorm_swiglu_2k import rmsnorm_swiglu_2k

F32, BF16 = jnp.float32, jnp.bfloat16
EPS = 1e-6
SD = jax.ShapeDtypeStruct


def _r(seed, *shape):
  return jax.random.normal(jax.random.key(seed), shape)


def _case(D, F, dtype=F32):
  x, g = _r(0, D), 1.0 + 0.1 * _r(1, D)
  wg, wu, wd = _r(2, F, D) / np.sqrt(D), _r(3, F, D) / np.sqrt(D), _r(4, F, D) / np.sqrt(F)
  c = lambda a: a.astype(dtype)
  return c(x), c(g), c(wg), c(wu), c(wd)


@pytest.mark.parametrize("D,F,gate_up_block,down_block", [
    (128, 256, None, None),                                            # automatic blocks
    (128, 256, dict(block_k=32, split_k=2), dict(block_k=64, split_k=2)),
    (192, 320, dict(block_k=64, split_k=3), dict(block_k=64, split_k=5)),   # odd splits
    (256, 128, dict(block_n=128, block_k=128), dict(block_k=32, split_k=1)),
])
def test_matches_the_reference(D, F, gate_up_block, down_block):
  x, g, wg, wu, wd = _case(D, F)
  gu, wdt = jnp.concatenate([wg, wu]), wd.T
  ref = rmsnorm_swiglu(x, g, wg, wu, wd, eps=EPS, impl="xla")
  assert_rel_close(np.asarray(rmsnorm_swiglu_2k(x, g, gu, wdt, eps=EPS, impl="xla"), np.float64),
                   np.asarray(ref, np.float64), rtol=tol(F32, D + F), name="2k reference")
  out = rmsnorm_swiglu_2k(x, g, gu, wdt, eps=EPS, impl="pallas", gate_up_block=gate_up_block,
                          down_block=down_block)
  assert_rel_close(np.asarray(out, np.float64), np.asarray(ref, np.float64),
                   rtol=tol(F32, D + F), name=f"2k D={D} F={F}")


def test_bf16_matches_the_one_kernel_mlp():
  """bf16: both forms round h to bf16 and the output to bf16; the gate / up sums run in
  another order (split-K partials), so h may differ by one ulp in a few entries:
  ||2k - 1k|| <= 2^-8 ||1k|| and at most 5% of the entries differ (a missing rounding
  of h makes most of them differ)."""
  D, F = 256, 512
  x, g, wg, wu, wd = _case(D, F, BF16)
  one = rmsnorm_swiglu(x, g, wg, wu, wd, eps=EPS, impl="pallas", block_f=64, block_k=64,
                       block_d=64)
  two = rmsnorm_swiglu_2k(x, g, jnp.concatenate([wg, wu]), wd.T, eps=EPS, impl="pallas",
                          gate_up_block=dict(block_k=64, split_k=2),
                          down_block=dict(block_k=64, split_k=4))
  assert two.dtype == BF16
  assert_rel_close(np.asarray(two, np.float64), np.asarray(one, np.float64), rtol=2.0 ** -8,
                   name="2k bf16")
  frac = float(np.mean(np.asarray(two) != np.asarray(one)))
  assert frac <= 0.05, f"{frac:.1%} of the entries differ"


def test_arguments_are_checked():
  x, g, wg, wu, wd = _case(64, 128)
  gu, wdt = jnp.concatenate([wg, wu]), wd.T
  kw = dict(eps=EPS, impl="pallas")
  with pytest.raises(ValueError, match=r"w_gate_up_t_2FD \(128, 64\) must be \[256, 64\]"):
    rmsnorm_swiglu_2k(x, g, wg, wdt, **kw)
  with pytest.raises(ValueError, match=r"w_down_t_DF \(128, 64\) must be \[64, F\]"):
    rmsnorm_swiglu_2k(x, g, gu, wd, **kw)
  with pytest.raises(ValueError, match="int8 weights are not supported"):
    rmsnorm_swiglu_2k(x, g, gu.astype(jnp.int8), wdt.astype(jnp.int8), **kw)
  with pytest.raises(ValueError, match="unknown impl 'triton'"):
    rmsnorm_swiglu_2k(x, g, gu, wdt, eps=EPS, impl="triton")


@pytest.mark.parametrize("D,F", [(2048, 8192), (4096, 14336)])
def test_lowers_for_cuda(D, F):
  """The bench shapes (llama-1b / 8b), bf16, plain and with PDL prefetch."""
  bf = jnp.bfloat16
  for pdl in (None, "prefetch"):
    f = lambda x, g, gu, wd: rmsnorm_swiglu_2k(x, g, gu, wd, eps=EPS, impl="pallas",
                                               interpret=False, pdl=pdl)
    text = jax.jit(f).trace(SD((D,), bf), SD((D,), bf), SD((2 * F, D), bf),
                            SD((D, F), bf)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 2


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="interpreter test (CPU only)")
def test_mosaic_interpreter():
  """Exactly as written for the GPU (TMA pipelines over the partials' column blocks)."""
  D, F = 128, 256
  x, g, wg, wu, wd = _case(D, F)
  ref = rmsnorm_swiglu(x, g, wg, wu, wd, eps=EPS, impl="xla")
  out = rmsnorm_swiglu_2k(x, g, jnp.concatenate([wg, wu]), wd.T, eps=EPS, impl="pallas",
                          interpret="mosaic", gate_up_block=dict(block_k=32, split_k=2),
                          down_block=dict(block_k=64, split_k=2), pdl="prefetch")
  assert_rel_close(np.asarray(out, np.float64), np.asarray(ref, np.float64),
                   rtol=tol(F32, D + F), name="2k mosaic")


def test_decode_step_with_two_kernel_mlp_lowers_for_cuda():
  """One llama-1b-bench layer with kernel_options layout mlp "2k" (and PDL prefetch):
  the step runs the two MLP kernels per layer and lowers for CUDA."""
  from flax import nnx

  from jaxlab.bench.decode import CONFIGS
  from jaxlab.models import LM, ModelConfig
  from jaxlab.models.decode import init_state, prepare_weights, step_function
  cfg = ModelConfig(**dict(CONFIGS["llama-1b-bench"][0], n_layers=1))
  weights = jax.eval_shape(lambda: prepare_weights(LM(cfg, rngs=nnx.Rngs(0)), mlp="2k"))
  opts = {"layout": {"mlp": "2k"}, "launch": {"pdl": "prefetch"}}
  step, S = step_function(cfg, "pallas", 1100, interpret=False, kernel_options=opts)
  state = jax.eval_shape(lambda: init_state(cfg, S))
  text = step.trace(weights, state, SD((), jnp.int32)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mlp_gate_up" in text and "mlp_down" in text
