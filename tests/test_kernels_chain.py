"""The residual stream handed between kernels unfinished (kernels/unfinished.py): with the
two-kernel MLP (layout mlp "2k") an attention layer's kernels pass partial rows to each
other instead of summing them in XLA. Checked: every op that takes an Unfinished x_D
against its reference on the finished x (HLO interpreter, fp32 and bf16, several groups
and split-K slices), the finished x the gate / up GEMV stores bit for bit equal to
`finish`, the references' own algebra, errors, the Mosaic-GPU interpreter, CUDA lowering
of a chained 1B step, and the property itself: in the chained step no XLA work depends on
a kernel's output before the LM head (and in the unchained one some does)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.testing import assert_rel_close, tol
from kernels import _gemv
from kernels.attention_out_proj import attention_out_proj
from kernels.decode_attention import decode_attention
from kernels.lm_head_argmax import lm_head_argmax
from kernels.out_proj_residual import out_proj_residual
from kernels.qkv_rope_append import qkv_rope_append
from kernels.rmsnorm_swiglu_2k import rmsnorm_swiglu_2k
from kernels.unfinished import Unfinished, finish

F32, BF16 = jnp.float32, jnp.bfloat16
EPS = 1e-6
SD = jax.ShapeDtypeStruct


def _r(seed, *shape):
  return jax.random.normal(jax.random.key(seed), shape)


def _x(D, dtype, groups=(3, 1)):
  """An Unfinished x: base and fp32 groups of partial rows of the size a GEMV leaves."""
  return Unfinished(_r(0, D).astype(dtype),
                    tuple(_r(10 + i, R, D) * 0.3 for i, R in enumerate(groups)))


def _close(a, b, n, dtype, name):
  assert_rel_close(np.asarray(a, np.float64), np.asarray(b, np.float64),
                   rtol=tol(dtype, n), name=name)


def test_finish_order_and_rounding():
  """finish adds each group's rows in order, then rounds to base's dtype, group by group:
  what the unfused epilogues compute (out_proj_residual's split-K sum + residual)."""
  x = _x(64, BF16)
  want = x.base_D
  for rows in x.rows:
    want = (want.astype(F32) + sum(rows[r] for r in range(rows.shape[0]))).astype(BF16)
  np.testing.assert_array_equal(np.asarray(finish(x), np.float32), np.asarray(want, np.float32))
  one_shot = (x.base_D.astype(F32) + sum(r.sum(0) for r in x.rows)).astype(BF16)
  assert not np.array_equal(np.asarray(finish(x), np.float32),
                            np.asarray(one_shot, np.float32)), "rounding order not exercised"
  a = jnp.ones((8,))
  assert finish(a) is a


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("gate_up_block", [None, dict(block_k=32, split_k=2)])
def test_two_kernel_mlp_takes_and_returns_unfinished(dtype, gate_up_block):
  """rmsnorm_swiglu_2k(Unfinished x): = the reference on finish(x); finish=False returns
  Unfinished(x finished, (down partial rows,)) whose base is finish(x) bit for bit (the
  n = 0 CTAs' store, one per K slice when split) and whose finish is the op's result."""
  D, F = 128, 256
  x = _x(D, dtype)
  g = (1.0 + 0.1 * _r(1, D)).astype(dtype)
  wgu = (_r(2, 2 * F, D) / np.sqrt(D)).astype(dtype)
  wd = (_r(3, D, F) / np.sqrt(F)).astype(dtype)
  kw = dict(eps=EPS, gate_up_block=gate_up_block)
  ref = rmsnorm_swiglu_2k(finish(x), g, wgu, wd, eps=EPS, impl="xla")
  out = rmsnorm_swiglu_2k(x, g, wgu, wd, impl="pallas", **kw)
  part = rmsnorm_swiglu_2k(x, g, wgu, wd, impl="pallas", finish=False, **kw)
  assert isinstance(part, Unfinished) and len(part.rows) == 1 and part.rows[0].dtype == F32
  np.testing.assert_array_equal(np.asarray(part.base_D, np.float32),
                                np.asarray(finish(x), np.float32))
  np.testing.assert_array_equal(np.asarray(finish(part), np.float32),
                                np.asarray(out, np.float32))
  _close(out, ref, D + F, dtype, f"2k unfinished x {dtype.__name__}")
  ref_part = rmsnorm_swiglu_2k(x, g, wgu, wd, eps=EPS, impl="xla", finish=False)
  np.testing.assert_array_equal(np.asarray(finish(ref_part), np.float32),
                                np.asarray(ref, np.float32))


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("split_k", [None, 2])
def test_qkv_rope_append_and_lm_head_take_unfinished(dtype, split_k):
  """The QKV GEMV (then RoPE + append) and the LM head finish x as they stream it: the same
  as the op on finish(x) (reference), and its Pallas form on finish(x) within an ulp."""
  D, Hq, Hkv, Dh, S, V = 128, 4, 2, 32, 64, 256
  x = _x(D, dtype)
  g = (1.0 + 0.1 * _r(1, D)).astype(dtype)
  w = (_r(2, (Hq + 2 * Hkv) * Dh, D) / np.sqrt(D)).astype(dtype)
  ang = _r(3, Dh // 2)
  cos = jnp.concatenate([jnp.cos(ang)] * 2).astype(dtype)
  sin = jnp.concatenate([jnp.sin(ang)] * 2).astype(dtype)
  kc, vc = (_r(4 + i, Hkv, S, Dh).astype(dtype) for i in range(2))
  args = (g, w, None, cos, sin, kc, vc, 5)
  kw = dict(eps=EPS, n_heads=Hq, n_kv_heads=Hkv)
  ref = qkv_rope_append(finish(x), *args, impl="xla", **kw)
  blk = {} if split_k is None else dict(split_k=split_k, block_k=32)
  out = qkv_rope_append(x, *args, impl="pallas", **blk, **kw)
  for a, b, name in zip(out, ref, ("q", "k", "v")):
    _close(a, b, D, dtype, f"qkv {name} unfinished x")
  wh = (_r(6, V, D) / np.sqrt(D)).astype(dtype)
  ref_l, ref_t = lm_head_argmax(finish(x), g, wh, eps=EPS, impl="xla")
  out_l, out_t = lm_head_argmax(x, g, wh, eps=EPS, impl="pallas")
  _close(out_l, ref_l, D, dtype, "lm head unfinished x")
  assert int(out_t) == int(jnp.argmax(out_l))


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("resid", ["array", "unfinished"])
def test_attention_out_proj(dtype, resid):
  """attention_out_proj leaves the O-projection as one more group of rows: finished, it is
  out_proj_residual(decode_attention(...)) (its reference exactly, by construction; the
  Pallas form within tolerance), over a length that is not a multiple of the block, with
  NaN past it."""
  D, Hq, Hkv, Dh, S, n = 256, 8, 2, 32, 128, 77
  q = _r(1, Hq, Dh).astype(dtype)
  tail = jnp.arange(S)[None, :, None] >= n
  kc, vc = (jnp.where(tail, jnp.nan, _r(2 + i, Hkv, S, Dh)).astype(dtype) for i in range(2))
  wo = (_r(4, D, Hq * Dh) / np.sqrt(Hq * Dh)).astype(dtype)
  x = _x(D, dtype) if resid == "unfinished" else _r(0, D).astype(dtype)
  scale = Dh ** -0.5
  ref = attention_out_proj(q, kc, vc, n, wo, x, scale=scale, impl="xla")
  out = attention_out_proj(q, kc, vc, n, wo, x, scale=scale, impl="pallas",
                           attn_block=dict(num_splits=2), o_block=dict(split_k=2, block_k=64))
  n_groups = (len(x.rows) if isinstance(x, Unfinished) else 0) + 1
  assert len(out.rows) == len(ref.rows) == n_groups and out.rows[-1].shape == (2, D)
  o = decode_attention(q, kc, vc, n, scale=scale, impl="xla").reshape(-1)
  np.testing.assert_array_equal(
      np.asarray(finish(ref), np.float32),
      np.asarray(out_proj_residual(o, wo, finish(x), impl="xla"), np.float32))
  got = np.asarray(finish(out), np.float64)
  assert np.isfinite(got).all()
  _close(got, finish(ref), Hq * Dh, dtype, "attention_out_proj")


def test_errors_name_the_culprit():
  D = 128
  bad = Unfinished(jnp.ones((D,)), (jnp.ones((2, D + 1)),))
  g = jnp.ones((D,))
  with pytest.raises(ValueError, match="lm_head_argmax: unfinished x_D rows"):
    lm_head_argmax(bad, g, jnp.ones((256, D)), eps=EPS, impl="pallas")
  with pytest.raises(ValueError, match="rmsnorm_swiglu_2k: unfinished x_D rows .*fp32"):
    rmsnorm_swiglu_2k(Unfinished(g, (jnp.ones((2, D), BF16),)), g, jnp.ones((512, D)),
                      jnp.ones((D, 256)), eps=EPS, impl="xla")
  with pytest.raises(ValueError, match="store_x needs an Unfinished"):
    _gemv.gemv_partials(g, jnp.ones((64, D)), mode="hlo", store_x=True)
  q, kc = jnp.ones((4, 32)), jnp.ones((2, 64, 32))
  with pytest.raises(ValueError, match=r"attention_out_proj: w_o_t_DM \(128, 64\)"):
    attention_out_proj(q, kc, kc, 3, jnp.ones((D, 64)), g, scale=1.0, impl="xla")
  with pytest.raises(ValueError, match="attention_out_proj: int8"):
    attention_out_proj(q, kc, kc, 3, jnp.ones((D, 128), jnp.int8), g, scale=1.0, impl="xla")


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="interpreter test (CPU only)")
def test_mosaic_interpreter():
  """Exactly as written for the GPU: the Unfinished vector's TMA column blocks, the finished
  x collected in SMEM and stored by the n = 0 CTAs (split-K: one slice each)."""
  D, F = 128, 256
  x = _x(D, F32)
  g = 1.0 + 0.1 * _r(1, D)
  wgu, wd = _r(2, 2 * F, D) / np.sqrt(D), _r(3, D, F) / np.sqrt(F)
  part = rmsnorm_swiglu_2k(x, g, wgu, wd, eps=EPS, impl="pallas", interpret="mosaic",
                           finish=False, gate_up_block=dict(block_k=32, split_k=2),
                           down_block=dict(block_k=64, split_k=2), pdl="prefetch")
  np.testing.assert_array_equal(np.asarray(part.base_D), np.asarray(finish(x)))
  ref = rmsnorm_swiglu_2k(x, g, wgu, wd, eps=EPS, impl="xla")
  _close(finish(part), ref, D + F, F32, "2k mosaic unfinished")


# --- the decode step -------------------------------------------------------------------

# Free on a GPU (no kernel): views and scalar bookkeeping.
_FREE = {"reshape", "squeeze", "expand_dims", "copy_p", "pjit", "closed_call"}


def _xla_after_kernels(jaxpr):
  """The names of the XLA ops (non-scalar outputs) that depend on a Mosaic kernel's output
  and run before the step's last kernel (the LM head), in program order."""
  seq, found = [0], []

  def subjaxpr(e):
    for p in e.params.values():
      j = getattr(p, "jaxpr", p)
      if hasattr(j, "eqns") and len(j.invars) == len(e.invars):
        return j
    return None

  def walk(j, tainted_in):
    env = {v: t for v, t in zip(j.invars, tainted_in)}
    env.update({v: False for v in j.constvars})
    taint = lambda v: not hasattr(v, "val") and env.get(v, False)   # (literals: untainted)
    for e in j.eqns:
      name = e.primitive.name
      ins = [taint(v) for v in e.invars]
      if name in ("pallas_call", "mpmd_map"):
        seq[0] += 1
        found.append(("kernel", seq[0]))
        outs = [True] * len(e.outvars)
      elif (sub := subjaxpr(e)) is not None:
        outs = walk(sub, ins)
        outs = (outs + [any(ins)] * len(e.outvars))[:len(e.outvars)]
      else:
        outs = [any(ins)] * len(e.outvars)
        big = any(np.prod(v.aval.shape) > 1 for v in e.outvars)
        if any(ins) and big and name not in _FREE:
          found.append((name, seq[0]))
      env.update(zip(e.outvars, outs))
    return [taint(v) for v in j.outvars]

  walk(jaxpr, [False] * len(jaxpr.invars))
  last = max(n for k, n in found if k == "kernel")
  return [k for k, n in found if k != "kernel" and n < last]


def _step_jaxpr(chain: bool, pdl: str | None = None, config: str = "llama-1b-bench"):
  from jaxlab.bench.decode import CONFIGS
  from jaxlab.models import LM, ModelConfig
  from jaxlab.models.decode import init_state, prepare_weights, step_function
  cfg = ModelConfig(**dict(CONFIGS[config][0], n_layers=2))
  weights = jax.eval_shape(lambda: prepare_weights(LM(cfg, rngs=nnx.Rngs(0)), mlp="2k"))
  opts = {"layout": {"mlp": "2k"}, "fuse": {"chain": chain}, "launch": {"pdl": pdl}}
  step, S = step_function(cfg, "pallas", 1100, interpret=False, kernel_options=opts)
  state = jax.eval_shape(lambda: init_state(cfg, S))
  token = SD((), jnp.int32)
  return step, (weights, state, token), jax.make_jaxpr(step)(weights, state, token).jaxpr


def test_chained_step_runs_no_xla_between_kernels():
  """Two llama-1b-bench layers traced for the GPU: chained, nothing XLA computes from a
  kernel's output until the LM head; unchained (fuse chain off), the split-K sums of the
  O-projection and the MLP do (so the check can fail)."""
  assert _xla_after_kernels(_step_jaxpr(True)[2]) == []
  unchained = _xla_after_kernels(_step_jaxpr(False)[2])
  assert "reduce_sum" in unchained or "add" in unchained, unchained


@pytest.mark.parametrize("config", ["llama-1b-bench", "llama-8b-bench"])
def test_chained_step_lowers_for_cuda(config):
  """The chained step at the 1B and 8B shapes (two layers: the second QKV GEMV and the
  LM head finish the previous MLP's rows) lowers for CUDA, with PDL prefetch, and is
  chained there too (no XLA between the kernels)."""
  step, args, jaxpr = _step_jaxpr(True, pdl="prefetch", config=config)
  assert _xla_after_kernels(jaxpr) == []
  text = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu") >= 2 * 6 + 1
