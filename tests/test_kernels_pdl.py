"""Programmatic Dependent Launch (`pdl=`, kernels/_common.PDL_MODES) for every Pallas
decode kernel.

With PDL a kernel may start while the previous one still runs, so what it reads before
griddepcontrol.wait must not be anything that kernel writes. No CPU interpreter runs
griddepcontrol, and a race would not show on CPU anyway, so the ordering is checked on
the kernels' jaxprs as traced for the GPU: in every kernel of a decode step, the only
GMEM reads before the wait are weight tiles ("prefetch"), or none ("wait"), and the
next kernel is released (launch_dependents) right after the wait. The prefetch copies
themselves run in the Mosaic-GPU interpreter (out-of-bounds reads raise there)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.bench.decode import CONFIGS
from jaxlab.models import LM, ModelConfig
from jaxlab.models.decode import init_state, prepare_weights, step_function
from jaxlab.testing import assert_rel_close, tol
from kernels import _common as C

SD = jax.ShapeDtypeStruct
EPS = 1e-6


def _kernel_jaxprs(jaxpr):
  """The bodies of the Mosaic-GPU kernels (plgpu.kernel / GMEM pallas_call) in a jaxpr."""
  out = []

  def subs(eqn):
    for p in eqn.params.values():
      for q in (p if isinstance(p, (tuple, list)) else (p,)):
        j = getattr(q, "jaxpr", q)
        if hasattr(j, "eqns"):
          yield j

  def walk(j):
    for e in j.eqns:
      if e.primitive.name in ("mpmd_map", "pallas_call"):
        out.extend(subs(e))
      else:
        for s in subs(e):
          walk(s)

  walk(jaxpr)
  return out


def _eqns(jaxpr):
  """Every equation of a kernel body, nested ones included, in program order."""
  for e in jaxpr.eqns:
    yield e
    for p in e.params.values():
      for q in (p if isinstance(p, (tuple, list)) else (p,)):
        sub = getattr(q, "jaxpr", q)
        if hasattr(sub, "eqns"):
          yield from _eqns(sub)


def _events(kernel):
  """The kernel's GMEM reads and griddepcontrol calls in program order: ("read", aval
  of the GMEM ref read), ("wait",), ("launch",)."""
  ev = []
  for e in _eqns(kernel):
    name = e.primitive.name
    if name == "griddepcontrol_wait":
      ev.append(("wait",))
    elif name == "griddepcontrol_launch_dependents":
      ev.append(("launch",))
    elif name in ("copy_gmem_to_smem", "get") and "gmem" in str(e.invars[0].aval):
      ev.append(("read", e.invars[0].aval))
  return ev


def _weight_avals(weights):
  return {(tuple(a.shape), jnp.dtype(a.dtype)) for a in jax.tree.leaves(weights) if a.ndim == 2}


def _check_order(kernels, weights, pdl):
  """Every kernel: one wait, launch right after it; before the wait only weight reads
  ("prefetch"; at least one in some kernel) or nothing ("wait"); no griddepcontrol at
  all without pdl."""
  wset = _weight_avals(weights)
  assert kernels
  prefetched = 0
  for k in kernels:
    ev = _events(k)
    kinds = [e[0] for e in ev]
    if pdl is None:
      assert "wait" not in kinds and "launch" not in kinds
      continue
    assert kinds.count("wait") == 1 and kinds.count("launch") == 1, kinds
    i = kinds.index("wait")
    assert kinds[i + 1] == "launch", kinds
    before = [e[1] for e in ev[:i]]
    for aval in before:
      assert (tuple(aval.shape), jnp.dtype(aval.dtype)) in wset, \
          f"a kernel reads {aval} before griddepcontrol.wait"
    assert pdl == "prefetch" or not before
    prefetched += len(before)
  assert (prefetched > 0) == (pdl == "prefetch")


def _step_kernels(name, pdl, quantize=None, mlp="1k"):
  kw = dict(CONFIGS[name][0])
  if "tiny" not in name:   # one layer; two chained ones for mlp "2k" (the QKV GEMV then
    # finishes the previous layer's down rows)
    kw["n_layers"] = 2 if mlp == "2k" else len(kw.get("mixer_pattern") or (1,))
  cfg = ModelConfig(**kw)
  weights = jax.eval_shape(lambda: prepare_weights(LM(cfg, rngs=nnx.Rngs(0)), quantize,
                                                   mlp=mlp))
  opts = {"layout": {"mlp": mlp}} if mlp == "2k" else {}
  if pdl is not None:
    opts["launch"] = {"pdl": pdl}
  step, S = step_function(cfg, "pallas", 1100, interpret=False, kernel_options=opts)
  state = jax.eval_shape(lambda: init_state(cfg, S))
  jaxpr = jax.make_jaxpr(step)(weights, state, SD((), jnp.int32))
  return _kernel_jaxprs(jaxpr.jaxpr), weights, (step, state)


@pytest.mark.parametrize("name,quantize,mlp", [
    ("llama-1b-bench", None, "1k"), ("llama-1b-bench", "int8", "1k"),
    ("llama-1b-bench", None, "2k"), ("hybrid-tiny", None, "1k"), ("gated-tiny", None, "1k")])
@pytest.mark.parametrize("pdl", [None, "wait", "prefetch"])
def test_step_kernels_wait_before_reading(name, quantize, mlp, pdl):
  """Every kernel of a GPU decode step (fused attention layer; the chained two-kernel-MLP
  layers, whose GEMVs read the previous kernels' partial rows; the tiny models' unfused
  ops; PaTH, log-linear and FoX layers), traced for the GPU."""
  kernels, weights, _ = _step_kernels(name, pdl, quantize, mlp)
  _check_order(kernels, weights, pdl)
  n = {"llama-1b-bench": 13 if mlp == "2k" else 6, "hybrid-tiny": 10, "gated-tiny": 6}[name]
  assert len(kernels) >= n


def _stores(kernel):
  """The kernel's TMA stores and store waits in program order: ("store",) and
  ("wait", wait_read_only)."""
  return [("store",) if e.primitive.name == "copy_smem_to_gmem"
          else ("wait", bool(e.params["wait_read_only"])) for e in _eqns(kernel)
          if e.primitive.name in ("copy_smem_to_gmem", "wait_smem_to_gmem")]


@pytest.mark.parametrize("name,mlp", [("llama-1b-bench", "1k"), ("llama-1b-bench", "2k"),
                                      ("hybrid-tiny", "1k"), ("gated-tiny", "1k")])
def test_stores_land_before_the_kernel_ends(name, mlp):
  """In-loop stores (log-linear levels, PaTH key and gate blocks, MLP partial rows) wait
  only until TMA has read their SMEM copy (no GMEM round trip per iteration), so every
  kernel that stores must end with one full wait: the next kernel (with PDL, right after
  griddepcontrol.wait) reads what it wrote."""
  kernels, _, _ = _step_kernels(name, None, None, mlp)
  read_only = 0
  for k in kernels:
    ev = _stores(k)
    if not any(e == ("store",) for e in ev):
      continue
    assert ev[-1] == ("wait", False), ev[-3:]
    read_only += sum(e == ("wait", True) for e in ev)
  assert read_only > 0   # the cheap in-loop waits are in use


def test_pdl_step_lowers_for_cuda():
  """The Mosaic lowering takes the griddepcontrol calls and the prefetch copies (weight
  tiles into swizzled SMEM) at the bench shapes."""
  kernels, weights, (step, state) = _step_kernels("llama-1b-bench", "prefetch")
  text = step.trace(weights, state, SD((), jnp.int32)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_begin_is_required():
  """A kernel body without ctx.begin() is an error at trace time, and with pdl set a GMEM
  helper before begin() is too (it could read unfinished data)."""
  x = jnp.arange(128.0)

  def no_begin(x_g, o_g, *, ctx):
    o_g[...] = x_g[...]

  with pytest.raises(RuntimeError, match="never calls ctx.begin"):
    C.mosaic_kernel(no_begin, out_type=SD((128,), jnp.float32), grid=(1,),
                    grid_names=("one",), mode="hlo", name="t")(x)

  def late_begin(x_g, o_g, *, ctx):
    ctx.store(x_g[...], o_g)
    ctx.begin()

  with pytest.raises(RuntimeError, match="before ctx.begin"):
    C.mosaic_kernel(late_begin, out_type=SD((128,), jnp.float32), grid=(1,),
                    grid_names=("one",), mode="hlo", name="t", pdl="wait")(x)
  out = C.mosaic_kernel(late_begin, out_type=SD((128,), jnp.float32), grid=(1,),
                        grid_names=("one",), mode="hlo", name="t")(x)   # no pdl: fine
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_unknown_pdl_is_an_error():
  from kernels.rmsnorm_qkv import rmsnorm_qkv
  from jaxlab.models.decode import step_function as sf
  x = jnp.ones((128,))
  with pytest.raises(ValueError, match="unknown pdl 'early'"):
    rmsnorm_qkv(x, x, jnp.ones((64, 128)), eps=EPS, impl="pallas", pdl="early")
  cfg = ModelConfig(**CONFIGS["tiny"][0])
  with pytest.raises(ValueError, match=r"kernel_options\['launch'\]"):
    sf(cfg, "pallas", 64, kernel_options={"launch": {"pdl": "early"}})
  with pytest.raises(ValueError, match=r"kernel_options\['launch'\]"):
    sf(cfg, "pallas", 64, kernel_options={"launch": {"pd": "wait"}})


def _r(seed, *shape):
  return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="interpreter test (CPU only)")
def test_prefetch_kernels_mosaic():
  """The prefetching kernels exactly as written (throwaway TMA copies of the first weight
  tiles, then the pipeline) in the Mosaic-GPU interpreter: the GEMV (one pass, split-K,
  argmax), the MLP (both down layouts), the fused QKV + RoPE + append and the attention
  merge inside the O-projection."""
  from kernels.attention_out_mlp import attention_out_mlp
  from kernels.lm_head_argmax import lm_head_argmax
  from kernels.qkv_rope_append import qkv_rope_append
  from kernels.rmsnorm_qkv import rmsnorm_qkv
  from kernels.rmsnorm_swiglu import rmsnorm_swiglu
  M, P = "mosaic", dict(pdl="prefetch")
  close = lambda a, b, n, name: assert_rel_close(np.asarray(a), np.asarray(b),
                                                 rtol=tol(jnp.float32, n), name=name)
  D, N, F, V = 128, 192, 128, 256
  x, g = _r(0, D), 1.0 + 0.1 * _r(1, D)
  w = _r(2, N, D) / 11
  # (split, block_k, prefetch_tiles): 2 tiles per CTA; 1 (fewer than stages); 3 of 4
  for split, bk, tiles in ((1, 64, None), (4, 32, None), (1, 32, 3)):
    close(rmsnorm_qkv(x, g, w, eps=EPS, impl="pallas", interpret=M, block_n=64, block_k=bk,
                      split_k=split, prefetch_tiles=tiles, **P),
          rmsnorm_qkv(x, g, w, eps=EPS, impl="xla"), D, f"qkv split {split} tiles {tiles}")
  wg, wu, wd = _r(6, F, D) / 11, _r(7, F, D) / 11, _r(8, F, D) / 11
  ref = rmsnorm_swiglu(x, g, wg, wu, wd, eps=EPS, impl="xla")
  close(rmsnorm_swiglu(x, g, wg, wu, wd, eps=EPS, impl="pallas", interpret=M, block_f=64,
                       block_k=64, block_d=64, **P), ref, F, "mlp")
  close(rmsnorm_swiglu(x, g, wg, wu, w_down_t_DF=wd.T, eps=EPS, impl="pallas", interpret=M,
                       block_f=64, block_k=64, block_d=64, **P), ref, F, "mlp down_t")
  E = _r(9, V, D) / 11
  lg, tk = lm_head_argmax(x, g, E, eps=EPS, impl="pallas", interpret=M, block_n=64, **P)
  lr, tr = lm_head_argmax(x, g, E, eps=EPS, impl="xla")
  close(lg, lr, D, "logits")
  assert int(tk) == int(tr)
  Hq, Hkv, Dh, S = 8, 2, 64, 128
  Nq = (Hq + 2 * Hkv) * Dh
  kc, vc, cos, sin = _r(2, Hkv, S, Dh), _r(3, Hkv, S, Dh), _r(4, Dh), _r(5, Dh)
  wq = _r(6, Nq, D) / 11
  kw = dict(eps=EPS, n_heads=Hq, n_kv_heads=Hkv)
  out = qkv_rope_append(x, g, wq, None, cos, sin, kc, vc, 77, impl="pallas", interpret=M,
                        block_k=64, split_k=2, **kw, **P)
  ref = qkv_rope_append(x, g, wq, None, cos, sin, kc, vc, 77, impl="xla", **kw)
  for a, b, name in zip(out, ref, "qkv"):
    close(a, b, D, f"qkv_rope_append {name}")
  L = 90
  q, wo = _r(10, Hq, Dh), _r(11, D, Hq * Dh) / 22
  close(attention_out_mlp(q, kc, vc, L, wo, x, g, wg, wu, wd, scale=0.125, eps=EPS,
                          impl="pallas", interpret=M, attn_block=dict(num_splits=2),
                          o_block=dict(block_n=64, block_k=128, split_k=2), block_f=64,
                          block_k=64, block_d=64, **P),
        attention_out_mlp(q, kc, vc, L, wo, x, g, wg, wu, wd, scale=0.125, eps=EPS,
                          impl="xla"), L + Hq * Dh + F, "attention_out_mlp")


def test_prefetch_depth():
  """prefetch_tiles: that many weight tiles per CTA before the wait (GEMV: capped at the
  CTA's K slice; MLP: a gate and an up tile each); too deep for SMEM, or without
  pdl="prefetch", is an error naming the option."""
  from kernels.rmsnorm_qkv import rmsnorm_qkv
  from kernels.rmsnorm_swiglu import rmsnorm_swiglu
  bf = jnp.bfloat16
  x = SD((2048,), bf)

  def before_wait(fn, w):
    (k,) = _kernel_jaxprs(jax.make_jaxpr(fn)(x, x, w).jaxpr)
    kinds = [e[0] for e in _events(k)]
    return kinds.index("wait")

  qkv = lambda t: lambda x, g, w: rmsnorm_qkv(x, g, w, eps=EPS, impl="pallas", interpret=False,
                                              pdl="prefetch", prefetch_tiles=t)
  mlp = lambda t: lambda x, g, w: rmsnorm_swiglu(x, g, w, w, w, eps=EPS, impl="pallas",
                                                 interpret=False, pdl="prefetch",
                                                 prefetch_tiles=t)
  wq, wf = SD((3072, 2048), bf), SD((8192, 2048), bf)
  # QKV: split-K 4 -> a 512-wide K slice, 4 tiles of 128; default depth = stages = 2
  assert [before_wait(qkv(t), wq) for t in (None, 1, 3, 4, 8)] == [2, 1, 3, 4, 4]
  assert [before_wait(mlp(t), wf) for t in (None, 1, 4)] == [4, 2, 8]
  with pytest.raises(ValueError, match="prefetch_tiles=8 must be >= 1 and fit 160 KB"):
    before_wait(mlp(8), wf)   # 8 x (gate + up) 64 x 128 bf16 tiles = 256 KB
  with pytest.raises(ValueError, match="prefetch_tiles=2 needs pdl='prefetch'"):
    jax.make_jaxpr(lambda x, g, w: rmsnorm_qkv(x, g, w, eps=EPS, impl="pallas",
                                               interpret=False, pdl="wait",
                                               prefetch_tiles=2))(x, x, wq)
