"""The Pallas decode kernels lower for CUDA (Mosaic GPU, Hopper), checked on CPU.

`jit(...).trace(...).lower(lowering_platforms=("cuda",))` runs the whole
Pallas -> Mosaic-GPU lowering (register layouts, SMEM tiling/swizzle, TMA
shapes) without a GPU, so layout mistakes that neither interpreter sees fail
here. PTX generation and the timings still need the GPU
(scripts/gpu_session.sh).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxlab.bench.decode import CONFIGS
from jaxlab.models import LM, ModelConfig
from jaxlab.models.decode import init_state, prepare_weights, step_function

SD = jax.ShapeDtypeStruct


def _lower(fn, *avals):
  try:
    return jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",))
  except RuntimeError as e:  # pragma: no cover - a jaxlib without the Mosaic GPU dialect
    if "Unknown" in str(e) and "platform" in str(e):
      pytest.skip(f"no CUDA lowering in this jaxlib: {e}")
    raise


@pytest.mark.parametrize("name,quantize,share", [
    ("llama-1b-bench", None, False), ("llama-8b-bench", None, False),
    ("hybrid-1b-bench", None, False), ("tiny", None, False), ("hybrid-tiny", None, False),
    ("llama-1b-bench", "int8", False), ("llama-8b-bench", "int8", False),
    ("hybrid-1b-bench", "int8", False), ("llama-1b-bench", None, True),
    ("hybrid-tiny", None, True), ("llama-1b-bench", "int8", True),
    ("gated-1b-bench", None, False), ("gated-tiny", None, False)])
def test_decode_step_lowers_for_cuda(name, quantize, share):
  """One full Pallas decode step (one layer of the bench shapes, one mixer cycle of the
  hybrid; the tiny test models), with bf16 and with int8 weight-only GEMVs, inlined
  layers and one shared block per layer kind."""
  kw = dict(CONFIGS[name][0])
  if "tiny" not in name:
    kw["n_layers"] = len(kw.get("mixer_pattern") or (1,))
  cfg = ModelConfig(**kw)
  weights = jax.eval_shape(lambda: prepare_weights(LM(cfg, rngs=nnx.Rngs(0)), quantize))
  if quantize:
    assert weights["layers"][0]["w_down"].dtype == jnp.int8
  step, S = step_function(cfg, "pallas", 1100, interpret=False, share_layers=share)
  state = jax.eval_shape(lambda: init_state(cfg, S))
  lowered = step.trace(weights, state, SD((), jnp.int32)).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "mosaic_gpu" in text
  if quantize:
    # int8 weights widen through Mosaic's packed s8 -> bf16 conversion (prmt/and/
    # sub.bf16x2), never one I2F per element (arith.sitofp in a kernel's module).
    assert "sub.bf16x2" in text and "sitofp" not in text


@pytest.mark.parametrize("D,F,down_t,dt", [(2048, 8192, False, jnp.bfloat16),
                                            (4096, 14336, False, jnp.bfloat16),
                                            (2048, 8192, True, jnp.bfloat16),
                                            (4096, 14336, True, jnp.int8)])
def test_mlp_variants_lower_for_cuda(D, F, down_t, dt):
  """The MLP variants the sweep times against the default (`jaxlab bench decode --ops
  --sweep`) lower at the bench shapes: the partial row buffered in SMEM (store_once) and
  W_down^T [D, F] (row-reduced down blocks; bf16 and int8)."""
  from kernels.rmsnorm_swiglu import pallas
  bf, f32 = jnp.bfloat16, jnp.float32
  scales = (SD((F,), f32), SD((F,), f32), SD((D,), f32)) if dt == jnp.int8 else ()
  for once in (False, True):
    lowered = _lower(lambda *a: pallas.rmsnorm_swiglu(*a, eps=1e-6, mode="compile",
                                                      store_once=once, down_t=down_t),
                     SD((D,), bf), SD((D,), bf), SD((F, D), dt), SD((F, D), dt),
                     SD((D, F) if down_t else (F, D), dt), *scales)
    assert "mosaic_gpu" in lowered.as_text()
    if dt == jnp.int8:
      assert "sub.bf16x2" in lowered.as_text() and "sitofp" not in lowered.as_text()


@pytest.mark.parametrize("dk,gdn", [(64, False), (128, True)])
def test_log_linear_lowers_for_cuda(dk, gdn):
  from kernels.log_linear_state import pallas
  f32 = jnp.float32
  H, L = 16, 15
  _lower(lambda *a: pallas.log_linear_state_update(*a, gdn=gdn, mode="compile"),
         SD((H, L, dk, dk), f32), SD((), jnp.int32), SD((H, dk), f32), SD((H, dk), f32),
         SD((H, dk), f32), SD((H, L), f32), SD((H,), f32), SD((H,), f32))


@pytest.mark.parametrize("Dh", [64, 128])
def test_path_key_update_lowers_for_cuda(Dh):
  from kernels.path_key_update import pallas
  bf = jnp.bfloat16
  _lower(lambda k, w, b, n: pallas.path_key_update(k, w, b, n, mode="compile"),
         SD((8, 1024, Dh), bf), SD((8, Dh), jnp.float32), SD((8,), jnp.float32),
         SD((), jnp.int32))


@pytest.mark.parametrize("Dh,vdt", [(64, jnp.bfloat16), (128, jnp.float32)])
def test_path_decode_attention_lowers_for_cuda(Dh, vdt):
  from kernels.decode_attention import pallas
  f32 = jnp.float32
  _lower(lambda q, k, v, w, b, n: pallas.path_decode_attention(q, k, v, w, b, n, scale=0.1,
                                                               mode="compile"),
         SD((32, Dh), vdt), SD((8, 1024, Dh), f32), SD((8, 1024, Dh), vdt), SD((8, Dh), f32),
         SD((8,), f32), SD((), jnp.int32))


@pytest.mark.parametrize("path,Hq,Dh", [(False, 32, 64), (True, 32, 64), (False, 24, 128),
                                         (True, 8, 128)])
@pytest.mark.parametrize("update", [False, True])
def test_gate_bias_lowers_for_cuda(path, Hq, Dh, update):
  """The [Hq, S] score bias of FoX / PaTH-FoX layers (GQA 4 and 3 and 1) streams through
  the attention pipeline for CUDA, with fp32 keys and bf16 values as the driver holds them;
  update: the kernel updates the gate row and stores its [G, BS] blocks."""
  from kernels.decode_attention import pallas
  f32, bf = jnp.float32, jnp.bfloat16
  gkw = lambda bias, g: dict(gate_g=(bias, g)) if update else dict(bias_HS=bias)
  if path:
    fn = lambda q, k, v, bias, g, w, b, n: pallas.path_decode_attention(
        q, k, v, w, b, n, scale=0.1, mode="compile", **gkw(bias, g))
  else:
    fn = lambda q, k, v, bias, g, n: pallas.decode_attention(
        q, k, v, n, scale=0.1, mode="compile", **gkw(bias, g))
  avals = [SD((Hq, Dh), bf), SD((8, 1024, Dh), f32), SD((8, 1024, Dh), bf), SD((Hq, 1024), f32),
           SD((Hq,), f32)]
  if path:
    avals += [SD((8, Dh), f32), SD((8,), f32)]
  text = _lower(fn, *avals, SD((), jnp.int32)).as_text()
  assert "mosaic_gpu" in text


def test_rope_kernel_rejects_shapes_it_cannot_compile():
  from kernels.rope_append import pallas
  with pytest.raises(ValueError, match="multiple of 128"):
    _lower(lambda qkv, c, s, k, v: pallas.rope_append(qkv, c, s, k, v, 0, n_heads=4,
                                                       n_kv_heads=2, mode="compile"),
           SD((8 * 32,), jnp.float32), SD((32,), jnp.float32), SD((32,), jnp.float32),
           SD((2, 64, 32), jnp.float32), SD((2, 64, 32), jnp.float32))


@pytest.mark.parametrize("dtype,pattern", [
    ("float32", ("path", "log_linear_mamba2", "attention", "log_linear_gated_deltanet")),
    ("bfloat16", ("path", "log_linear_mamba2", "attention", "log_linear_gated_deltanet")),
    ("bfloat16", ("path_fox", "log_linear_mamba2", "fox", "log_linear_gated_deltanet")),
    ("bfloat16", ("path_fox", "mamba2", "fox", "gated_deltanet"))])
def test_hybrid_decode_step_lowers_for_cuda(dtype, pattern):
  """The step with PaTH (-FoX), FoX and (log-linear or plain) Mamba-2 / GDN layers (their
  decode kernels, the gate bias, the mixers' own XLA projections, lax.cond guards) lowers
  for CUDA."""
  cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=12, n_kv_heads=4,
                    head_dim=64, ffn_dim=512, max_seq_len=2048, param_dtype=dtype,
                    mixer_pattern=pattern,
                    mixer_options={"state_size": 64, "expand": 1, "ssm_heads": 4})
  weights = jax.eval_shape(lambda: prepare_weights(LM(cfg, rngs=nnx.Rngs(0))))
  step, S = step_function(cfg, "pallas", 1100, interpret=False)
  state = jax.eval_shape(lambda: init_state(cfg, S))
  text = step.trace(weights, state, SD((), jnp.int32)).lower(
      lowering_platforms=("cuda",)).as_text()
  for name in ("path_decode_attention", "log_linear_state_update", "decode_attention"):
    assert name in text, name


def test_rope_kernel_names_the_bf16_shape_it_cannot_compile():
  from kernels.rope_append import pallas
  bf = jnp.bfloat16
  with pytest.raises(ValueError,
                     match="rope kernel: 12 heads x head_dim 64 in bfloat16 \\(n = 384\\)"):
    _lower(lambda qkv, c, s, k, v: pallas.rope_append(qkv, c, s, k, v, 0, n_heads=8,
                                                       n_kv_heads=4, mode="compile"),
           SD((16 * 64,), bf), SD((64,), jnp.float32), SD((64,), jnp.float32),
           SD((4, 64, 64), bf), SD((4, 64, 64), bf))


def test_shared_layers_lower_each_kernel_once():
  """share_layers=True: the two layers of the tiny model share one lowered block, so the
  step holds each Mosaic kernel once; inlined, once per layer (plus the LM head)."""
  cfg = ModelConfig(**CONFIGS["tiny"][0])
  assert cfg.n_layers == 2
  weights = jax.eval_shape(lambda: prepare_weights(LM(cfg, rngs=nnx.Rngs(0))))
  counts = {}
  for share in (False, True):
    step, S = step_function(cfg, "pallas", 1100, interpret=False, share_layers=share)
    state = jax.eval_shape(lambda: init_state(cfg, S))
    text = step.trace(weights, state, SD((), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    counts[share] = text.count("mosaic_gpu")
  assert counts[True] < counts[False], counts


def test_deep_steps_trace_each_kernel_once(monkeypatch):
  """Inlined layers share each kernel's trace (kernels._common.inference_only), so a
  4-layer step builds as many Mosaic kernels as a 1-layer one, and still launches each in
  every layer: the step's lowering time does not grow with its depth."""
  import re

  import kernels._common as C
  built = []
  mosaic_kernel = C.mosaic_kernel
  monkeypatch.setattr(C, "mosaic_kernel", lambda *a, **k: built.append(k["name"]) or
                      mosaic_kernel(*a, **k))
  got = {}
  for layers in (1, 4):
    built.clear()
    jax.clear_caches()   # the launchers' traces too
    cfg = ModelConfig(**{**CONFIGS["tiny"][0], "n_layers": layers})
    weights = jax.eval_shape(lambda: prepare_weights(LM(cfg, rngs=nnx.Rngs(0))))
    step, S = step_function(cfg, "pallas", 1100, interpret=False)
    state = jax.eval_shape(lambda: init_state(cfg, S))
    text = step.trace(weights, state, SD((), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    got[layers] = (sorted(built), len(re.findall(r"custom_call @mosaic_gpu", text)))
  (built1, calls1), (built4, calls4) = got[1], got[4]
  assert built4 == built1 and len(built1) >= 4, got
  assert calls4 - calls1 == 3 * (calls1 - 1), got   # every layer's kernels, one LM head


@pytest.mark.parametrize("name", ["llama-1b-bench", "gated-tiny"])
def test_scatter_row_write_lowers_for_cuda(name):
  """The decode step with kernel_options={"rope_append": {"write": "scatter"}} (one layer
  of the 1B shapes; the PaTH-FoX / FoX tiny model) lowers for CUDA, with a scatter and no
  dynamic-update-slice for the cache rows."""
  kw = dict(CONFIGS[name][0])
  if "tiny" not in name:
    kw["n_layers"] = 1
  cfg = ModelConfig(**kw)
  weights = jax.eval_shape(lambda: prepare_weights(LM(cfg, rngs=nnx.Rngs(0))))
  texts = {}
  for write in ("select", "scatter"):
    step, S = step_function(cfg, "pallas", 1100, interpret=False,
                            kernel_options={"rope_append": {"write": write}})
    state = jax.eval_shape(lambda: init_state(cfg, S))
    texts[write] = step.trace(weights, state, SD((), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
  assert "stablehlo.scatter" in texts["scatter"] and "stablehlo.scatter" not in texts["select"]
  assert "dynamic_update_slice" in texts["select"]


@pytest.mark.parametrize("name,want", [("llama-1b-bench", {"qkv_rope", "attn_out"}),
                                       ("llama-8b-bench", {"qkv_rope", "attn_out"}),
                                       ("tiny", {"out_mlp"})])
def test_fused_step_lowers_for_cuda(name, want, monkeypatch):
  """The Pallas step with its cross-op fusions (the default) and without them
  (kernel_options={"fuse": {...: False}}) lowers for CUDA; on GPU the QKV + RoPE fusion
  is used only where its register tile fits (not the tiny model's 10 x 16 heads), the
  attention merge inside the O-projection only where its K slices hold >= 4 heads (not
  the tiny model's 3; it then runs out_proj_mlp)."""
  import kernels.attention_out_mlp as aom
  import kernels.out_proj_mlp as omlp
  import kernels.qkv_rope_append as qra
  kw = dict(CONFIGS[name][0])
  if "tiny" not in name:
    kw["n_layers"] = 1
  cfg = ModelConfig(**kw)
  weights = jax.eval_shape(lambda: prepare_weights(LM(cfg, rngs=nnx.Rngs(0))))
  used = set()
  for mod, attr, tag in ((qra, "qkv_rope_append", "qkv_rope"), (omlp, "out_proj_mlp", "out_mlp"),
                         (aom, "attention_out_mlp", "attn_out")):
    fn = getattr(mod, attr)
    monkeypatch.setattr(mod, attr, lambda *a, _fn=fn, _tag=tag, **k: used.add(_tag) or _fn(*a, **k))
  for fuse in (True, False):
    used.clear()
    jax.clear_caches()   # trace anew: an earlier test may have traced the same step
    opts = None if fuse else {"fuse": {"qkv_rope": False, "out_mlp": False, "attn_out": False}}
    step, S = step_function(cfg, "pallas", 1100, interpret=False, kernel_options=opts)
    state = jax.eval_shape(lambda: init_state(cfg, S))
    text = step.trace(weights, state, SD((), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert used == (want if fuse else set()), (fuse, used)
  with pytest.raises(ValueError, match="unknown fusion.*qkv"):
    step_function(cfg, "pallas", 64, kernel_options={"fuse": {"qkv": False}})


def test_qkv_rope_kernel_rejects_shapes_it_cannot_compile():
  from kernels.qkv_rope_append import pallas
  f32 = jnp.float32
  with pytest.raises(ValueError, match="qkv_rope_append kernel: .* = 160"):
    _lower(lambda x, g, w, c, s, k, v: pallas.qkv_rope_append(
        x, g, w, None, c, s, k, v, 0, eps=1e-6, n_heads=6, n_kv_heads=2, mode="compile"),
        SD((128,), f32), SD((128,), f32), SD((320, 128), f32), SD((32,), f32), SD((32,), f32),
        SD((2, 64, 32), f32), SD((2, 64, 32), f32))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_transposed_down_step_lowers_for_cuda(quantize):
  """The 1B step with W_down^T in its weights (kernel_options={"layout": {"w_down": "DF"}},
  fused and unfused MLP paths) lowers for CUDA."""
  kw = dict(CONFIGS["llama-1b-bench"][0], n_layers=1)
  cfg = ModelConfig(**kw)
  weights = jax.eval_shape(lambda: prepare_weights(LM(cfg, rngs=nnx.Rngs(0)), quantize, "DF"))
  assert weights["layers"][0]["w_down_t"].shape == (cfg.d_model, cfg.hidden_dim)
  for fuse in (True, False):
    opts = {"layout": {"w_down": "DF"}, "fuse": {"out_mlp": fuse, "attn_out": fuse}}
    step, S = step_function(cfg, "pallas", 1100, interpret=False, kernel_options=opts)
    state = jax.eval_shape(lambda: init_state(cfg, S))
    text = step.trace(weights, state, SD((), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def _primitives(jaxpr) -> set[str]:
  """Every primitive name in a jaxpr, nested jaxprs (jit, custom_vjp, cond branches) included;
  not inside Pallas kernels (their branches run on the device)."""
  names = set()
  for e in jaxpr.eqns:
    names.add(e.primitive.name)
    if e.primitive.name in ("pallas_call", "mpmd_map"):
      continue
    for p in e.params.values():
      for j in p if isinstance(p, (list, tuple)) else (p,):
        j = getattr(j, "jaxpr", j)
        if hasattr(j, "eqns"):
          names |= _primitives(j)
  return names


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("name", ["hybrid-tiny", "gated-tiny", "hybrid-1b-bench", "llama-1b-bench"])
def test_decode_step_has_no_branch(name, impl):
  """No lax.cond in the decode step (attention; PaTH, PaTH-FoX, FoX, log-linear layers): XLA runs
  a conditional on the GPU by copying its predicate to the host and waiting for the
  stream, once per layer and step. Past the end of the cache the kernels write their
  caches back unchanged instead (commit), tested in test_kernels_decode.py."""
  kw = dict(CONFIGS[name][0])
  if "tiny" not in name:
    kw["n_layers"] = len(kw.get("mixer_pattern") or (1, 2))
  cfg = ModelConfig(**kw)
  weights = jax.eval_shape(lambda: prepare_weights(LM(cfg, rngs=nnx.Rngs(0))))
  step, S = step_function(cfg, impl, 100, interpret=False)
  state = jax.eval_shape(lambda: init_state(cfg, S))
  jaxpr = jax.make_jaxpr(step)(weights, state, SD((), jnp.int32)).jaxpr
  names = _primitives(jaxpr)
  assert "cond" not in names and "while" not in names, sorted(names)
  if impl == "pallas":
    assert "pallas_call" in names or "mpmd_map" in names
  # the walker sees a cond where there is one
  branchy = jax.make_jaxpr(lambda p, x: jax.lax.cond(p, jnp.sin, jnp.cos, x))(True, 1.0)
  assert "cond" in _primitives(branchy.jaxpr)


@pytest.mark.parametrize("name", ["llama-1b-bench", "hybrid-tiny", "gated-tiny"])
def test_compiled_kernels_never_use_pallas_call(name):
  """JAX 0.11.2 no longer lowers a Mosaic-GPU `pl.pallas_call` (its GPU rule asserts; seen
  on the H100 on 2026-11-27), so no compiled kernel of a decode step may go through one:
  the in-place cache writers too run as `pl.kernel` (mpmd_map), with ref operands."""
  kw = dict(CONFIGS[name][0])
  if "tiny" not in name:
    kw["n_layers"] = 1
  cfg = ModelConfig(**kw)
  weights = jax.eval_shape(lambda: prepare_weights(LM(cfg, rngs=nnx.Rngs(0))))
  step, S = step_function(cfg, "pallas", 1100, interpret=False)
  state = jax.eval_shape(lambda: init_state(cfg, S))
  jaxpr = jax.make_jaxpr(step)(weights, state, SD((), jnp.int32))
  prims = _primitives(jaxpr.jaxpr)
  assert "pallas_call" not in prims
  assert "mpmd_map" in prims, sorted(prims)


def _aliases(text: str) -> set[tuple[int, int]]:
  """(output index, operand index) of every custom call's output/operand alias."""
  import re
  pairs = re.findall(r"output_operand_alias<output_tuple_indices = \[(\d+)\], "
                     r"operand_index = (\d+)", text)
  return {(int(o), int(i)) for o, i in pairs}


@pytest.mark.parametrize("fused", [False, True])
def test_cache_writers_alias_the_caches_when_compiled(fused):
  """The compiled RoPE + append kernels update the K and V caches in place: their custom
  call aliases outputs 1 and 2 to the two cache operands, and under jit with the caches
  donated nothing copies them."""
  from kernels.qkv_rope_append import qkv_rope_append
  from kernels.rope_append import rope_append
  Hq, Hkv, Dh, S, D = 32, 8, 64, 1152, 2048
  N = (Hq + 2 * Hkv) * Dh
  bf = jnp.bfloat16
  cache = SD((Hkv, S, Dh), bf)
  if fused:
    fn = lambda x, sc, w, c, s, k, v, p: qkv_rope_append(
        x, sc, w, None, c, s, k, v, p, eps=1e-6, n_heads=Hq, n_kv_heads=Hkv, impl="pallas",
        interpret=False)
    avals = (SD((D,), bf), SD((D,), bf), SD((N, D), bf), SD((Dh,), jnp.float32),
             SD((Dh,), jnp.float32), cache, cache, SD((), jnp.int32))
    donate = (5, 6)
  else:
    fn = lambda q, c, s, k, v, p: rope_append(q, c, s, k, v, p, n_heads=Hq, n_kv_heads=Hkv,
                                              impl="pallas", interpret=False)
    avals = (SD((N,), bf), SD((Dh,), jnp.float32), SD((Dh,), jnp.float32), cache, cache,
             SD((), jnp.int32))
    donate = (3, 4)
  text = jax.jit(fn, donate_argnums=donate).trace(*avals).lower(
      lowering_platforms=("cuda",)).as_text()
  # the kernel's call: outputs 1 and 2 (k, v) alias its last two operands (the caches)
  outs = {o for o, _ in _aliases(text)}
  assert outs == {1, 2}, _aliases(text)
  assert "tf.aliasing_output" in text   # the donated caches are the step's outputs


def test_aliased_kernel_arguments_are_checked():
  """A compiled aliased kernel names a bad alias map when built, and an input that cannot
  be its output's buffer when called (before anything is lowered)."""
  from kernels._common import mosaic_kernel
  out = (SD((8,), jnp.float32), SD((4, 8), jnp.float32))
  make = lambda aliases: mosaic_kernel(lambda *r, ctx: None, out_type=out, grid=(1,),
                                       grid_names=("one",), mode="compile", name="k",
                                       input_output_aliases=aliases)
  with pytest.raises(ValueError, match="k: input_output_aliases .* distinct outputs of 2"):
    make({0: 1, 1: 1})
  with pytest.raises(ValueError, match="distinct outputs of 2"):
    make({0: 2})
  kern = make({1: 1})
  with pytest.raises(ValueError, match="k: input 1 cannot alias output 1"):
    kern(jnp.zeros(8), jnp.zeros((4, 4)))
  with pytest.raises(ValueError, match="k: input 1 cannot alias output 1"):
    kern(jnp.zeros(8), jnp.zeros((4, 8), jnp.bfloat16))
