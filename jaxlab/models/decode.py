"""Batch-1 decode driver built from the kernels/ ops (issue 7, FlashFormer).

One decode step of the jaxlab LM, op by op, each behind an explicit impl:

  x = embed[token]
  per layer:  qkv = rmsnorm_qkv(x)            (fused RMSNorm + QKV GEMV, + bias)
              q, K, V = rope_append(qkv, pos)  (RoPE on q and k, cache row write)
              o = decode_attention(q, K, V, pos + 1)   (split-K GQA, (m, l, o) merge)
              x = out_proj_residual(o, x)
              x = rmsnorm_swiglu(x)            (fused RMSNorm + SwiGLU + residual)
  logits, token = lm_head_argmax(x)            (final norm + LM head + argmax)

impl="xla" runs the XLA references of the same ops (fp32 norms, softmax and
accumulation; operands in the weights' dtype: a plain-XLA decode step),
impl="pallas" the Mosaic-GPU kernels (interpreted on CPU), by default fused across
op boundaries (FUSIONS below): an attention layer is qkv_rope_append (QKV GEMV, then
RoPE + in-place cache append) and attention_out_mlp (attention, the O-projection GEMV
with the split-K merge inside, the MLP), five kernels and one XLA reduction.

Usage (what `jaxlab generate --impl pallas` does):

    dec = make_decoder(model, impl="pallas", max_len=len(prompt) + n)
    logits, state = dec.prefill(prompt)             # logits [V] fp32
    tok = int(jnp.argmax(logits))
    for _ in range(n - 1):
      logits, greedy, state = dec.step(state, tok)  # greedy: int32 argmax of logits
      tok = int(greedy)                             # or sample from logits

Greedy decoding with every buffer kept from step to step (no command-buffer update
between steps on a GPU; see StepFn):

    slots = dec.inplace_slots(state, tok)
    for _ in range(n - 1):
      slots = dec.step_inplace(slots)               # slots["token"], slots["logits"]
      out.append(int(slots["token"]))               # read before the next step

make_decoder(..., quantize="int8") stores the GEMV weights (QKV, O, MLP, LM head) as
int8 with one fp32 scale per output channel (kernels.quant) for either impl.

`DecodeStreamer` wraps this in the interface of jaxlab.models.generate.Streamer
(for the CLI). Prefill runs the model's own `extend` (XLA) and converts its
cache to the head-major layout [Hkv, S, Dh] the kernels stream.

Other token mixers (per layer, in the same step):
  PaTH ("path"): the mixer's own projections (XLA), then
              K, V = append(k, v)
              o, K = path_decode_attention(q, K, V, w, beta, pos + 1)
                     (one pass: older keys through H_t, then attention)
              x = out_proj_residual(o, x);  MLP as above
  PaTH-FoX ("path_fox") / FoX ("fox"): the same, with the forget gate as a score bias,
              updated inside the attention pass (one read and write of the row):
              gate <- gate + g_t (older slots), 0 (new slot)      [Hq, S] = G_t - G_j
              path_decode_attention / decode_attention(..., gate_HS=gate, g_H=g_t):
              scores + scale * gate; returns the new gate too
              (FoX has no transitions: its keys are appended, never rewritten)
  log-linear Mamba-2 / Gated DeltaNet: the mixer's own projections and output
              (XLA) around log_linear_state_update (the O(log T) level states).
Their caches: PaTH / FoX keys fp32 [Hkv, S, Dh] (as the model's PathCache), values in the
model dtype, the w conv state and the gate [Hq, S] fp32; log-linear level states
[H, L, K, V] and the conv state.

Positions: the cache has `max_len` usable slots. `Decoder.step` raises
ValueError naming the position when the state is full; the jitted
`Decoder.step_fn` (traced positions) cannot raise, so it returns NaN logits,
token -1 and leaves the cache untouched instead (no silent wrap or clamp).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels._common import Frozen, freeze, thaw
from kernels.unfinished import finish
from jaxlab.models.config import ModelConfig
from jaxlab.models.rope import rope_cos_sin, rope_frequencies

IMPLS = ("xla", "pallas")
LAYER_MODES = ("unrolled", "scan")
QUANTIZE = (None, "int8")
# GEMV weight -> (its scale's key, the reduction axis): int8 weight-only quantization,
# one fp32 scale per output channel (kernels.quant).
INT8_SCALES = {"w_qkv_t": ("w_qkv_scale", 1), "w_o_t": ("w_o_scale", 1),
               "w_gate_t": ("w_gate_scale", 1), "w_up_t": ("w_up_scale", 1),
               "w_down": ("w_down_scale", 0), "w_down_t": ("w_down_scale", 1),
               "w_head_t": ("w_head_scale", 1)}
# Where the MLP's down weight lives in the decode weights: "FD" (W_down [F, D], "w_down",
# the default) or "DF" (W_down^T [D, F], "w_down_t": the Pallas MLP then reduces each down
# block along rows; kernel_options={"layout": {"w_down": "DF"}}, to be timed).
DOWN_LAYOUTS = ("FD", "DF")
# How the MLP block runs: "1k", one fused kernel (kernels.rmsnorm_swiglu, the default), or
# "2k", two GEMV kernels over more CTAs (kernels.rmsnorm_swiglu_2k: the weights hold
# [W_gate^T; W_up^T] "w_gate_up_t" and W_down^T "w_down_t"; float weights, unrolled
# layers; kernel_options={"layout": {"mlp": "2k"}}, to be timed).
MLP_LAYOUTS = ("1k", "2k")
SLOT_MULTIPLE = 64   # physical cache slots are rounded up to a multiple of this


# mixer -> how the decode step runs its layer
LAYER_KINDS = {"attention": "attention", "nope": "attention", "path": "path",
               "path_fox": "path", "fox": "path",
               "log_linear_mamba2": "levels", "log_linear_gated_deltanet": "levels",
               "mamba2": "levels", "gated_deltanet": "levels"}


def layer_kinds(cfg: ModelConfig) -> tuple[str, ...]:
  """Per layer: "attention" (softmax, RoPE or NoPE), "path" (PaTH, PaTH-FoX, FoX) or
  "levels" (log-linear)."""
  kinds = []
  for i in range(cfg.n_layers):
    name = cfg.layer_mixer(i)
    if name not in LAYER_KINDS:
      raise ValueError(f"make_decoder: layer {i} uses mixer {name!r}: no batch-1 decode "
                       f"kernel exists for it (supported: {', '.join(LAYER_KINDS)})")
    kinds.append(LAYER_KINDS[name])
  return tuple(kinds)


def _check_model(cfg: ModelConfig):
  layer_kinds(cfg)
  if cfg.qk_norm:
    raise ValueError("make_decoder: ModelConfig.qk_norm=True is not supported by the batch-1 "
                     "decode kernels")
  if cfg.mlp_bias:
    raise ValueError("make_decoder: ModelConfig.mlp_bias=True is not supported by the batch-1 "
                     "decode kernels")
  if cfg.dim_per_head % 2:
    raise ValueError(f"make_decoder: head_dim={cfg.dim_per_head} must be even (RoPE)")


def _check_args(impl: str, max_len: int, layers: str):
  if impl not in IMPLS:
    raise ValueError(f"make_decoder: unknown impl {impl!r} (known: {', '.join(IMPLS)})")
  if layers not in LAYER_MODES:
    raise ValueError(f"make_decoder: unknown layers {layers!r} (known: {', '.join(LAYER_MODES)})")
  if layers == "scan" and impl != "xla":
    raise ValueError("make_decoder: layers='scan' is only supported with impl='xla'")
  if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
    raise ValueError(f"make_decoder: max_len must be a positive integer, got {max_len!r}")


def prepare_weights(model, quantize: str | None = None, w_down: str = "FD",
                    mlp: str = "1k") -> dict[str, Any]:
  """Decode-layout copies of the model's parameters (done once per decoder).

  GEMV weights are stored [out, in] so each output is one contiguous row;
  Q, K and V are concatenated into one matrix (one GEMV); the down projection
  keeps its natural [F, D] layout (the MLP kernel splits over F), or with w_down="DF"
  is stored transposed as "w_down_t" [D, F]. mlp="2k" (MLP_LAYOUTS) stores the gate and
  up weights stacked, "w_gate_up_t" [2F, D], and "w_down_t" [D, F] (float weights only).
  quantize="int8": the kernels' GEMV weights (QKV, output projection, MLP, LM head)
  become int8 with one fp32 scale per output channel (INT8_SCALES); norms, the
  embedding lookup and the PaTH / log-linear mixers' own projections stay as they are.
  """
  if quantize not in QUANTIZE:
    raise ValueError(f"unknown quantize {quantize!r} (known: None, 'int8')")
  if w_down not in DOWN_LAYOUTS:
    raise ValueError(f"unknown w_down layout {w_down!r} (known: {', '.join(DOWN_LAYOUTS)})")
  if mlp not in MLP_LAYOUTS:
    raise ValueError(f"unknown mlp layout {mlp!r} (known: {', '.join(MLP_LAYOUTS)})")
  if mlp == "2k" and quantize is not None:
    raise ValueError(f"mlp layout '2k' (two-kernel MLP) takes float weights, not quantize="
                     f"{quantize!r}")
  cfg: ModelConfig = model.cfg
  kinds = layer_kinds(cfg)
  _check_model(cfg)
  layers = []
  for blk, kind in zip(model.layers, kinds):
    att, ffn = blk.mixer, blk.mlp
    lw = dict(attn_norm=blk.input_norm.scale[...], mlp_norm=blk.post_norm.scale[...])
    w_gate_t, w_up_t = ffn.gate_proj.kernel[...].T, ffn.up_proj.kernel[...].T
    if mlp == "2k":
      lw["w_gate_up_t"] = jnp.concatenate([w_gate_t, w_up_t])
    else:
      lw.update(w_gate_t=jnp.asarray(w_gate_t), w_up_t=jnp.asarray(w_up_t))
    if w_down == "FD" and mlp == "1k":
      lw["w_down"] = ffn.down_proj.kernel[...]
    else:
      lw["w_down_t"] = jnp.asarray(ffn.down_proj.kernel[...].T)
    if kind != "attention":   # the mixer's own parameters drive its projections
      lw["mixer"] = nnx.state(att)
      if kind == "path":
        lw["w_o_t"] = jnp.asarray(att.o_proj.kernel[...].T)
      layers.append(lw)
      continue
    w_qkv = jnp.concatenate([att.q_proj.kernel[...], att.k_proj.kernel[...],
                             att.v_proj.kernel[...]], axis=1)
    lw.update(w_qkv_t=jnp.asarray(w_qkv.T), w_o_t=jnp.asarray(att.o_proj.kernel[...].T))
    if att.q_proj.bias is not None:
      lw["b_qkv"] = jnp.concatenate([att.q_proj.bias[...], att.k_proj.bias[...],
                                     att.v_proj.bias[...]])
    layers.append(lw)
  head = (model.embed.embedding[...] if model.lm_head is None
          else jnp.asarray(model.lm_head.kernel[...].T))
  out = dict(layers=layers, embed=model.embed.embedding[...],
             final_norm=model.final_norm.scale[...], w_head_t=head)
  return out if quantize is None else _quantize(out)


def _quantize(weights: dict) -> dict:
  from kernels.quant import quantize_int8

  def q(d: dict) -> dict:
    d = dict(d)
    for name, (scale_name, axis) in INT8_SCALES.items():
      if name in d:
        d[name], d[scale_name] = quantize_int8(d[name], axis=axis)
    return d

  return dict(q(weights), layers=[q(lw) for lw in weights["layers"]])


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static facts of one decoder (hashable: closed over by the jitted steps)."""
  n_layers: int
  n_heads: int
  n_kv: int
  head_dim: int
  eps: float
  use_rope: tuple[bool, ...]
  inv_freq: tuple[float, ...]
  attn_factor: float
  max_len: int
  cache_len: int
  impl: str
  layers: str
  interpret: Any
  options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
  kinds: tuple[str, ...] = ()
  cfg: ModelConfig | None = None   # builds the non-attention mixers' graphdefs
  share_layers: bool = False

  def opts(self, op: str) -> dict:
    """kernel_options[op], with the "gemv" group's form filled in for the GEMV kernels
    (an op that names its own `gemv` keeps its options as they are)."""
    o = thaw(dict(self.options).get(op, Frozen()))
    group = thaw(dict(self.options).get("gemv", Frozen()))
    if op not in GEMV_OPS or not group or self.impl != "pallas":
      return o
    kw = {"gemv": group["form"]}
    if "swizzle" in group:
      kw["mma_swizzle"] = group["swizzle"]
    fill = lambda d: d if "gemv" in d else {**kw, **d}   # the op's own form, as a whole
    if not GEMV_OPS[op]:
      return fill(o)
    return dict(o, **{k: fill(dict(o.get(k) or {})) for k in GEMV_OPS[op]})


# The ops with a GEMV form (kernels/_gemv.py, and the one-kernel MLP's own loops), which
# kernel_options {"gemv": {...}} reaches: op -> its GEMVs' option dicts (() : the op's
# own options).
GEMV_OPS = {"rmsnorm_qkv": (), "out_proj_residual": (), "lm_head_argmax": (),
            "rmsnorm_swiglu": (), "rmsnorm_swiglu_2k": ("gate_up_block", "down_block")}


def _ops():
  from kernels.decode_attention import decode_attention
  from kernels.lm_head_argmax import lm_head_argmax
  from kernels.out_proj_residual import out_proj_residual
  from kernels.rmsnorm_qkv import rmsnorm_qkv
  from kernels.rmsnorm_swiglu import rmsnorm_swiglu
  from kernels.rope_append import rope_append
  return rmsnorm_qkv, rope_append, decode_attention, out_proj_residual, rmsnorm_swiglu, \
      lm_head_argmax


def _rope(spec: _Spec, pos):
  cos, sin = rope_cos_sin(jnp.reshape(pos, (1, 1)), np.asarray(spec.inv_freq), spec.attn_factor)
  return cos[0, 0], sin[0, 0]


# Pallas fusions across op boundaries (kernel_options={"fuse": {name: bool}}; all on by
# default): each removes the XLA kernels between two ops.
#   qkv_rope: rmsnorm_qkv + rope_append -> qkv_rope_append (the QKV partials finished by
#             the RoPE / append kernel); off when rope_append's write is "select" /
#             "scatter", and on GPU for shapes its register tile does not fit
#             (kernels.qkv_rope_append.pallas.layout_ok).
#   out_mlp:  out_proj_residual + rmsnorm_swiglu -> out_proj_mlp (the O-projection
#             partials finished inside the MLP kernel).
#   attn_out: with out_mlp, attention layers run decode_attention + out_proj_mlp as
#             attention_out_mlp (the attention's split-K merge inside the O-projection
#             GEMV); on GPU only where the GEMV's K slices hold >= 4 whole heads
#             (kernels._gemv.merge_ok).
#   chain:    with layout mlp "2k", attention layers hand the residual stream on
#             unfinished (kernels.unfinished): the two-kernel MLP leaves its partial rows
#             for the next layer's QKV GEMV (or the LM head) to add up as it streams x,
#             and attention + O-projection (kernels.attention_out_proj) leave theirs for
#             the MLP's gate / up GEMV, which stores the finished residual. No XLA kernel
#             runs between an attention layer's Mosaic kernels.
FUSIONS = ("qkv_rope", "out_mlp", "attn_out", "chain")


def _fused(spec: _Spec, name: str) -> bool:
  return spec.impl == "pallas" and bool(spec.opts("fuse").get(name, True))


def _qkv_rope_fused(spec: _Spec, dtype) -> bool:
  from kernels.qkv_rope_append.pallas import layout_ok
  if not _fused(spec, "qkv_rope") or spec.opts("rope_append").get("write") in ("select",
                                                                                "scatter"):
    return False
  return spec.interpret != "compile" or layout_ok(spec.n_heads, spec.n_kv, spec.head_dim, dtype)


def _layer(spec: _Spec, use_rope: bool, lw, x, k, v, pos, cos, sin):
  """One decoder block for one token. k, v: this layer's cache [Hkv, S, Dh]. x: [D], or
  Unfinished (kernels.unfinished) from a chained layer; chained layers return it so."""
  rmsnorm_qkv, rope_append, decode_attention, _, _, _ = _ops()
  kw = _kernel_kw(spec)
  chain = _chained(spec, lw)
  if not (chain and _qkv_rope_fused(spec, x.dtype)):
    x = finish(x)
  if not use_rope:   # "nope" layers: identity rotation
    cos, sin = jnp.ones_like(cos), jnp.zeros_like(sin)
  # Past max_len the write goes to slot cache_len, which the writes ignore: a full
  # cache is never modified (the head turns the step's logits into NaN).
  wpos = jnp.where(pos < spec.max_len, pos, spec.cache_len)
  heads = dict(n_heads=spec.n_heads, n_kv_heads=spec.n_kv)
  if _qkv_rope_fused(spec, x.dtype):
    from kernels.qkv_rope_append import qkv_rope_append
    q, k, v = qkv_rope_append(x, lw["attn_norm"], lw["w_qkv_t"], lw.get("b_qkv"), cos, sin, k,
                              v, wpos, eps=spec.eps, w_scale_N=lw.get("w_qkv_scale"), **heads,
                              **kw, **spec.opts("rmsnorm_qkv"))
  else:
    qkv = rmsnorm_qkv(x, lw["attn_norm"], lw["w_qkv_t"], lw.get("b_qkv"), eps=spec.eps,
                      w_scale_N=lw.get("w_qkv_scale"), **kw, **spec.opts("rmsnorm_qkv"))
    q, k, v = rope_append(qkv, cos, sin, k, v, wpos, **heads, **kw, **spec.opts("rope_append"))
  length = jnp.minimum(pos + 1, spec.cache_len)
  scale = spec.head_dim ** -0.5
  if chain:
    if _merge_ok(spec, lw):
      from kernels.attention_out_proj import attention_out_proj
      x = attention_out_proj(q, k, v, length, lw["w_o_t"], x, scale=scale, **kw,
                             attn_block=spec.opts("decode_attention"),
                             o_block=spec.opts("out_proj_residual"))
    else:
      o = decode_attention(q, k, v, length, scale=scale, **kw, **spec.opts("decode_attention"))
      x = _out_proj(spec, lw, o, finish(x), kw)
    return _mlp(spec, lw, x, kw, finish_out=False), k, v
  if _attn_out_fused(spec, lw):
    from kernels.attention_out_mlp import attention_out_mlp
    y = attention_out_mlp(q, k, v, length, lw["w_o_t"], x, lw["mlp_norm"], lw["w_gate_t"],
                          lw["w_up_t"], lw.get("w_down"), w_down_t_DF=lw.get("w_down_t"),
                          scale=scale, eps=spec.eps,
                          w_o_scale_D=lw.get("w_o_scale"), **_mlp_scales(lw),
                          attn_block=spec.opts("decode_attention"),
                          o_block=spec.opts("out_proj_residual"), **kw,
                          **spec.opts("rmsnorm_swiglu"))
    return y, k, v
  o = decode_attention(q, k, v, length, scale=scale, **kw,
                       **spec.opts("decode_attention"))
  return _out_mlp(spec, lw, o, x, kw), k, v


def _chained(spec: _Spec, lw) -> bool:
  return _fused(spec, "chain") and "w_gate_up_t" in lw


def _attn_out_fused(spec: _Spec, lw) -> bool:
  if not (_fused(spec, "attn_out") and _fused(spec, "out_mlp")) or "w_gate_up_t" in lw:
    return False
  return _merge_ok(spec, lw)


def _merge_ok(spec: _Spec, lw) -> bool:
  """Whether the attention merge can run inside the O-projection GEMV at this layer."""
  from kernels._gemv import merge_ok
  D, M = lw["w_o_t"].shape
  o = spec.opts("out_proj_residual")
  return merge_ok(spec.n_heads, spec.head_dim, D, M, mode=spec.interpret,
                  w_dtype=lw["w_o_t"].dtype,
                  **{k: o[k] for k in ("block_n", "block_k", "split_k", "gemv", "mma_swizzle")
                     if k in o})


def _out_mlp(spec: _Spec, lw, o, x, kw):
  """x + attention output projection, then the MLP block (fused when out_mlp is on)."""
  if not _fused(spec, "out_mlp") or "w_gate_up_t" in lw:   # ("2k": no fused form)
    return _mlp(spec, lw, _out_proj(spec, lw, o, x, kw), kw)
  from kernels.out_proj_mlp import out_proj_mlp
  return out_proj_mlp(o.reshape(-1), lw["w_o_t"], x, lw["mlp_norm"], lw["w_gate_t"],
                      lw["w_up_t"], lw.get("w_down"), w_down_t_DF=lw.get("w_down_t"),
                      eps=spec.eps, w_o_scale_D=lw.get("w_o_scale"),
                      **_mlp_scales(lw), o_block=spec.opts("out_proj_residual"), **kw,
                      **spec.opts("rmsnorm_swiglu"))


@functools.lru_cache(maxsize=64)
def _block_fn(spec: _Spec, block, static):
  """block(spec, static, *args) as its own jitted function, called inside the step: the
  layers of one kind and shape share a single lowering of the whole block. Since the
  kernels' own traces are shared (kernels._common.inference_only), the inlined step
  lowers as fast, and XLA compiles both to the same program (for an H100, JAX 0.10.2);
  the 1B step measured 14% slower shared on an H200 in the sixth session, before that
  change (docs/kernels.md). Caches still update in place, no copies."""
  return jax.jit(functools.partial(block, spec, static))


@functools.lru_cache(maxsize=64)
def _abstract_mixer(cfg: ModelConfig, layer: int):
  """Layer `layer`'s mixer with abstract parameters (its structure, options and shapes)."""
  from jaxlab.models.mixers.base import get_mixer_factory
  return nnx.eval_shape(
      lambda: get_mixer_factory(cfg.layer_mixer(layer))(cfg, layer, rngs=nnx.Rngs(0)))


def _mixer_graphdef(cfg: ModelConfig, layer: int):
  return nnx.graphdef(_abstract_mixer(cfg, layer))


def _norm(x, scale, eps):
  from kernels.rmsnorm_qkv.reference import rms_scale
  return (x.astype(jnp.float32) * rms_scale(x, eps) * scale.astype(jnp.float32)).astype(x.dtype)


def _mlp_scales(lw) -> dict:
  """The MLP op's int8 scale keywords (None for float weights)."""
  return dict(w_gate_scale_F=lw.get("w_gate_scale"), w_up_scale_F=lw.get("w_up_scale"),
              w_down_scale_D=lw.get("w_down_scale"))


def _mlp(spec: _Spec, lw, x, kw, finish_out: bool = True):
  if "w_gate_up_t" in lw:   # kernel_options layout mlp "2k"
    from kernels.rmsnorm_swiglu_2k import rmsnorm_swiglu_2k
    return rmsnorm_swiglu_2k(x, lw["mlp_norm"], lw["w_gate_up_t"], lw["w_down_t"],
                             eps=spec.eps, finish=finish_out, **kw,
                             **spec.opts("rmsnorm_swiglu_2k"))
  *_, rmsnorm_swiglu, _ = _ops()
  return rmsnorm_swiglu(x, lw["mlp_norm"], lw["w_gate_t"], lw["w_up_t"], lw.get("w_down"),
                        w_down_t_DF=lw.get("w_down_t"),
                        eps=spec.eps, **_mlp_scales(lw), **kw, **spec.opts("rmsnorm_swiglu"))


def _out_proj(spec: _Spec, lw, o, x, kw):
  out_proj_residual = _ops()[3]
  return out_proj_residual(o.reshape(-1), lw["w_o_t"], x, w_scale_D=lw.get("w_o_scale"), **kw,
                           **spec.opts("out_proj_residual"))


def _pdl(spec: _Spec):
  """The Pallas kernels' launch (kernel_options={"launch": {"pdl": ...}}; off by default)."""
  return spec.opts("launch").get("pdl") if spec.impl == "pallas" else None


def _kernel_kw(spec: _Spec):
  kw = dict(impl=spec.impl)
  if spec.impl == "pallas":
    kw.update(interpret=spec.interpret, pdl=_pdl(spec))
  return kw


def _path_layer(spec: _Spec, graphdef, lw, x, k, v, conv, gate, pos):
  """A PaTH / PaTH-FoX / FoX block for one token. k, v: caches [Hkv, S, Dh] (fp32 keys,
  carried to pos - 1); gate: [Hq, S] fp32 G_{pos-1} - G_j (None without a forget gate)."""
  from kernels.decode_attention import decode_attention
  from kernels.path_decode_attention import path_decode_attention
  from kernels.rope_append.reference import write_slot
  kw = _kernel_kw(spec)
  m = nnx.merge(graphdef, lw["mixer"])
  xn = _norm(x, lw["attn_norm"], spec.eps)
  q, kt, vt, w, beta, g, new_conv = m.decode_inputs(xn[None, None], conv)
  ok = pos < spec.max_len

  # The row write as attention's ("kernel", the RoPE kernel's own write, has no PaTH twin).
  write = spec.opts("rope_append").get("write") or "select"
  write = "select" if write == "kernel" else write

  # A full cache is never modified (the head turns the step's logits into NaN): the row
  # write goes to no slot and the kernels write K and the gate back unchanged (commit). No
  # lax.cond: on the GPU a conditional copies its predicate to the host and blocks until
  # the stream drains, once per layer and step.
  S = k.shape[1]
  wpos = jnp.where(ok, pos, S)
  k, v = write_slot(k, kt[0, 0], wpos, write=write), write_slot(v, vt[0, 0], wpos, write=write)
  length = jnp.minimum(pos + 1, S)
  # the gate row (older slots += g_t, the new slot 0, as PathCache.gate) is updated inside
  # the attention pass
  gkw = {} if gate is None else dict(gate_HS=gate, g_H=g[0, 0])
  if w is None:          # FoX: no transitions, keys stay as appended
    out = decode_attention(q[0, 0], k, v, length, scale=m.scale, commit=ok, **gkw, **kw,
                           **spec.opts("decode_attention"))
    o, gate = out if gate is not None else (out, None)
  else:                  # one pass over K: older keys through H_t, then attention
    out = path_decode_attention(q[0, 0], k, v, w[0, 0], beta[0, 0], length, scale=m.scale,
                                commit=ok, **gkw, **kw, **spec.opts("path_decode_attention"))
    (o, k), gate = (out[:2], out[2]) if gate is not None else (out, None)
  o = jnp.where(ok, o, jnp.nan)
  conv = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_conv, conv)
  return _out_mlp(spec, lw, o, x, kw), k, v, conv, gate


def _levels_layer(spec: _Spec, graphdef, lw, x, levels, conv, pos):
  """A log-linear block for one token: the mixer's own projections around the level-state
  kernel. levels [H, L, K, V] fp32 hold tokens 0..pos-1."""
  from jaxlab.models.mixers.mamba2 import LevelKernel
  from jaxlab.ops.log_linear import LogLinearState
  kw = _kernel_kw(spec)
  m = nnx.merge(graphdef, lw["mixer"])
  xn = _norm(x, lw["attn_norm"], spec.eps)
  cache = dict(state=LogLinearState(levels[None], jnp.reshape(pos, (1,)).astype(jnp.int32)),
               conv=conv)
  kern = LevelKernel(spec.impl, spec.interpret, _pdl(spec))
  ok = pos < spec.max_len

  # A full state is never modified (the head turns the step's logits into NaN): past the
  # end the token is a padded row, whose state, count and conv the mixer keeps (the level
  # kernel writes the old tiles back). No lax.cond: on the GPU a conditional copies its
  # predicate to the host and blocks until the stream drains, once per layer and step.
  y, new = m.extend(xn[None, None], cache, mask_BT=jnp.reshape(ok, (1, 1)), level_kernel=kern)
  x = x + jnp.where(ok, y[0, 0], jnp.nan).astype(x.dtype)
  return _mlp(spec, lw, x, kw), new["state"].levels[0], new["conv"]


def _head(spec: _Spec, weights, x, pos):
  *_, lm_head_argmax = _ops()
  kw = _kernel_kw(spec)
  logits, tok = lm_head_argmax(x, weights["final_norm"], weights["w_head_t"], eps=spec.eps,
                               w_scale_V=weights.get("w_head_scale"), **kw,
                               **spec.opts("lm_head_argmax"))
  ok = pos < spec.max_len
  return jnp.where(ok, logits, jnp.nan), jnp.where(ok, tok, -1).astype(jnp.int32)


def _block(spec: _Spec, block, static):
  """One layer's block: shared per kind (_block_fn) or inlined into the step."""
  if spec.share_layers:
    return _block_fn(spec, block, static)
  return functools.partial(block, spec, static)


def _step_unrolled(spec: _Spec, weights, state, token):
  pos = state["pos"]
  x = weights["embed"][token]
  cos, sin = _rope(spec, pos)
  ks, vs, convs, levels, gates = (list(state[n]) for n in ("k", "v", "conv", "levels", "gate"))
  for l, lw in enumerate(weights["layers"]):
    kind = spec.kinds[l]
    if kind != "attention":   # (only attention layers take x unfinished)
      x = finish(x)
    if kind == "attention":
      fn = _block(spec, _layer, spec.use_rope[l])
      x, ks[l], vs[l] = fn(lw, x, ks[l], vs[l], pos, cos, sin)
    elif kind == "path":
      fn = _block(spec, _path_layer, _mixer_graphdef(spec.cfg, l))
      x, ks[l], vs[l], convs[l], gates[l] = fn(lw, x, ks[l], vs[l], convs[l], gates[l], pos)
    else:
      fn = _block(spec, _levels_layer, _mixer_graphdef(spec.cfg, l))
      x, levels[l], convs[l] = fn(lw, x, levels[l], convs[l], pos)
  logits, tok = _head(spec, weights, x, pos)
  return logits, tok, dict(k=tuple(ks), v=tuple(vs), conv=tuple(convs), levels=tuple(levels),
                           gate=tuple(gates), pos=pos + 1)


def _step_scan(spec: _Spec, weights, state, token):
  """Plain-XLA step over stacked layers: the cache row is written in place into the
  stacked carry, and attention reads layer l's slab by dynamic slice (fused by XLA)."""
  from kernels.decode_attention.reference import decode_attention
  from kernels.out_proj_residual.reference import out_proj_residual
  from kernels.rmsnorm_qkv.reference import rmsnorm_qkv
  from kernels.rmsnorm_swiglu.reference import rmsnorm_swiglu
  from kernels.rope_append.reference import rotate, split_qkv
  if set(spec.kinds) != {"attention"} or len(set(spec.use_rope)) > 1:
    raise ValueError("layers='scan' needs the same mixer (attention or nope) in every layer")
  pos = state["pos"]
  x = weights["embed"][token]
  cos, sin = _rope(spec, pos)
  if not spec.use_rope[0]:
    cos, sin = jnp.ones_like(cos), jnp.zeros_like(sin)
  ok = pos < spec.max_len
  at = jnp.minimum(pos, spec.cache_len - 1)
  length = jnp.minimum(pos + 1, spec.cache_len)

  def body(carry, lw):
    x, K, V, l = carry
    qkv = rmsnorm_qkv(x, lw["attn_norm"], lw["w_qkv_t"], lw.get("b_qkv"), eps=spec.eps,
                      w_scale_N=lw.get("w_qkv_scale"))
    q, k, v = split_qkv(qkv, spec.n_heads, spec.n_kv)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    old_k = jax.lax.dynamic_slice(K, (l, 0, at, 0), (1, spec.n_kv, 1, spec.head_dim))
    old_v = jax.lax.dynamic_slice(V, (l, 0, at, 0), (1, spec.n_kv, 1, spec.head_dim))
    k = jnp.where(ok, k.astype(K.dtype)[None, :, None], old_k)
    v = jnp.where(ok, v.astype(V.dtype)[None, :, None], old_v)
    K = jax.lax.dynamic_update_slice(K, k, (l, 0, at, 0))
    V = jax.lax.dynamic_update_slice(V, v, (l, 0, at, 0))
    o = decode_attention(q, K[l], V[l], length, scale=spec.head_dim ** -0.5)
    x = out_proj_residual(o.reshape(-1), lw["w_o_t"], x, lw.get("w_o_scale"))
    x = rmsnorm_swiglu(x, lw["mlp_norm"], lw["w_gate_t"], lw["w_up_t"], lw.get("w_down"),
                       w_down_t_DF=lw.get("w_down_t"),
                       eps=spec.eps, **_mlp_scales(lw))
    return (x, K, V, l + 1), None

  (x, K, V, _), _ = jax.lax.scan(body, (x, state["k"], state["v"], jnp.int32(0)),
                                 weights["layers"])
  logits, tok = _head(dataclasses.replace(spec, impl="xla"), weights, x, pos)
  return logits, tok, dict(state, k=K, v=V, pos=pos + 1)


@dataclasses.dataclass
class Decoder:
  """Jitted batch-1 prefill and decode step bound to prepared weights.

  prefill(tokens) -> (logits [V] fp32, state)
  step(state, token) -> (logits [V] fp32, greedy token int32, state)   (state donated)
  inplace_slots(state, token) -> slots;  step_inplace(slots) -> slots: the same step with
    its token and logits in donated slots ("token", "logits"), so that no buffer of the
    step is new from step to step (StepFn.inplace; the faster loop on a GPU);
    decode_inplace(slots, n) -> (slots, tokens [n]): n of them in one call (StepFn.loop)
  prefill_fn(model_state, tokens_T), step_fn(weights, state, token),
  step_fn.inplace(weights, slots): the raw jitted functions (no host-side position
  check; see the module docstring).
  """
  impl: str
  max_len: int
  cache_len: int
  layers: str
  weights: dict
  model_state: Any
  prefill_fn: Callable
  step_fn: Callable

  def prefill(self, tokens: Sequence[int] | jax.Array):
    toks = jnp.asarray(tokens, jnp.int32).reshape(-1)
    if toks.shape[0] == 0:
      raise ValueError("prefill: empty prompt")
    if toks.shape[0] > self.max_len:
      raise ValueError(f"prefill: prompt of {toks.shape[0]} tokens does not fit max_len="
                       f"{self.max_len}")
    return self.prefill_fn(self.model_state, toks)

  def step(self, state, token):
    self._check_pos(state)
    return self.step_fn(self.weights, state, jnp.asarray(token, jnp.int32))

  def inplace_slots(self, state, token) -> dict:
    """The state of `step_inplace`: `state` plus the token to read next and a logits slot."""
    if not isinstance(state, Mapping) or any(k in state for k in INPLACE_SLOTS):
      raise ValueError("inplace_slots: expects a decode state from prefill or step "
                       f"(a dict without {' / '.join(INPLACE_SLOTS)})")
    V = self.weights["w_head_t"].shape[0]   # [V, D]
    return dict(state, token=jnp.asarray(token, jnp.int32).reshape(()),
                logits=jnp.zeros((V,), jnp.float32))

  def step_inplace(self, slots):
    """One step on `inplace_slots` state: reads slots["token"], writes the step's logits
    and greedy token into slots["logits"] / slots["token"] (the input slots are donated)."""
    self._check_pos(slots)
    return self.step_fn.inplace(self.weights, slots)

  def decode_inplace(self, slots, n: int):
    """n greedy steps on the device in one call (StepFn.loop) from `inplace_slots` state:
    -> (slots, tokens int32 [n]); the slots hold the last step's logits and token. n is
    static: each new n compiles the loop once."""
    if n < 1:
      raise ValueError(f"decode_inplace: n must be >= 1, got {n}")
    self._check_pos(slots, n)
    return self.step_fn.loop(self.weights, slots, n)

  def _check_pos(self, state, n: int = 1):
    pos = int(state["pos"]) + n - 1   # the last step's position
    if not 0 <= pos < self.max_len:
      raise ValueError(f"decode step: position {pos} is past the end of the KV cache "
                       f"(max_len={self.max_len}); make a decoder with a larger max_len")


def make_decoder(model, impl: str, max_len: int, *, layers: str = "unrolled",
                 interpret: bool | str | None = None,
                 kernel_options: Mapping[str, Mapping[str, Any]] | None = None,
                 quantize: str | None = None, share_layers: bool = False) -> Decoder:
  """Batch-1 decoder for a jaxlab LM (attention, PaTH and log-linear layers).

  impl: "xla" (reference ops) or "pallas" (Mosaic-GPU kernels; interpreted on
  CPU, see kernels/_common.resolve_interpret for `interpret`).
  layers: "unrolled" (per-layer weights and caches, both impls) or "scan"
  (stacked layers, impl="xla" only: a Pallas kernel inside a scan would get a
  copied per-layer slice as its operand).
  kernel_options: per-op options, e.g. {"decode_attention": {"num_splits": 8}} (Pallas
  block options) or {"rope_append": {"write": "scatter"}} (the cache row write, both impls);
  {"fuse": {name: bool}} (FUSIONS); {"layout": {"w_down": "DF"}} (W_down^T in the weights,
  DOWN_LAYOUTS); {"layout": {"mlp": "2k"}} (the MLP as two GEMV kernels, MLP_LAYOUTS;
  float weights, unrolled layers); {"launch": {"pdl": "wait" | "prefetch"}}
  (Programmatic Dependent Launch of every Pallas kernel, kernels/_common.PDL_MODES; needs
  JAX >= 0.11 to take effect, not yet timed, off by default); {"gemv": {"form": "mma"}}
  (the GEMV kernels' inner product on the tensor cores, bf16 weights, GEMV_OPS;
  "swizzle": 32 | 64 | 128 sets B's width; not yet timed, "fma" by default).
  quantize: None, or "int8" for int8 weight-only GEMVs in the decode step (per-output
  fp32 scales; both impls; see prepare_weights). Prefill runs the model's own weights.
  share_layers: False (default) inlines every layer into one flat program, the fastest
  step measured; True lowers each layer kind once and calls it per layer. Both now lower
  each Pallas kernel once per step (the inlined 8B step, lowered for an H100 on a 2-core
  CPU: 70 s -> 8 s), and XLA compiles both to the same program. Same numbers either way.
  """
  cfg: ModelConfig = model.cfg
  step_fn, cache_len = step_function(cfg, impl, max_len, layers=layers, interpret=interpret,
                                     kernel_options=kernel_options, share_layers=share_layers)
  layout = dict((kernel_options or {}).get("layout", {}))
  weights = prepare_weights(model, quantize, w_down=layout.get("w_down", "FD"),
                            mlp=layout.get("mlp", "1k"))
  if layers == "scan":
    weights = dict(weights, layers=jax.tree.map(lambda *a: jnp.stack(a), *weights["layers"]))
  graphdef, mstate = nnx.split(model)
  return Decoder(impl=impl, max_len=max_len, cache_len=cache_len, layers=layers, weights=weights,
                 model_state=mstate, prefill_fn=_prefill_fn(graphdef, cache_len, layers),
                 step_fn=step_fn)


def step_function(cfg: ModelConfig, impl: str, max_len: int, *, layers: str = "unrolled",
                  interpret: bool | str | None = None,
                  kernel_options: Mapping[str, Mapping[str, Any]] | None = None,
                  share_layers: bool = False):
  """(step_fn(weights, state, token) -> (logits, token, state), cache_len): a StepFn,
  with the in-place form as `step_fn.inplace`.

  Usable on abstract inputs, e.g. to lower the step for another platform."""
  _check_args(impl, max_len, layers)
  _check_model(cfg)
  bad = set(dict((kernel_options or {}).get("fuse", {}))) - set(FUSIONS)
  if bad:
    raise ValueError(f"kernel_options['fuse']: unknown fusion(s) {', '.join(sorted(bad))} "
                     f"(known: {', '.join(FUSIONS)})")
  layout = dict((kernel_options or {}).get("layout", {}))
  if (set(layout) - {"w_down", "mlp"} or layout.get("w_down", "FD") not in DOWN_LAYOUTS
          or layout.get("mlp", "1k") not in MLP_LAYOUTS):
    raise ValueError(f"kernel_options['layout']: {layout} (known: w_down in "
                     f"{', '.join(DOWN_LAYOUTS)}, mlp in {', '.join(MLP_LAYOUTS)})")
  if layout.get("mlp") == "2k" and (layers == "scan" or layout.get("w_down") == "FD"):
    raise ValueError(f"kernel_options['layout']: mlp '2k' stores W_down^T and runs unrolled "
                     f"layers (got {layout}, layers={layers!r})")
  launch = dict((kernel_options or {}).get("launch", {}))
  from kernels._common import PDL_MODES
  if set(launch) - {"pdl"} or launch.get("pdl") not in (None, *PDL_MODES):
    raise ValueError(f"kernel_options['launch']: {launch} (known: pdl in "
                     f"{', '.join(PDL_MODES)})")
  _check_gemv_group(dict((kernel_options or {}).get("gemv", {})))
  kinds = layer_kinds(cfg)
  if layers == "scan" and set(kinds) != {"attention"}:
    raise ValueError("make_decoder: layers='scan' supports attention layers only "
                     f"(this model's layers: {', '.join(sorted(set(kinds)))})")
  _check_capacity(cfg, kinds, max_len)
  inv_freq, attn_factor = rope_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
  cache_len = -(-max_len // SLOT_MULTIPLE) * SLOT_MULTIPLE
  from kernels._common import resolve_interpret
  spec = _Spec(
      n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv=cfg.kv_heads, head_dim=cfg.dim_per_head,
      eps=cfg.norm_eps, use_rope=tuple(cfg.layer_mixer(i) == "attention"
                                       for i in range(cfg.n_layers)),
      inv_freq=tuple(float(f) for f in inv_freq), attn_factor=float(attn_factor),
      max_len=max_len, cache_len=cache_len, impl=impl, layers=layers,
      interpret=resolve_interpret(interpret) if impl == "pallas" else None,
      options=tuple(sorted((op, freeze(dict(o), f"kernel_options[{op!r}]"))
                           for op, o in (kernel_options or {}).items())),
      kinds=kinds, cfg=None if set(kinds) == {"attention"} else cfg,
      share_layers=bool(share_layers))
  return _step_fn(spec), cache_len


def _check_gemv_group(group: dict):
  """kernel_options["gemv"]: {"form": "fma" | "mma" | "mma-s8" (int8 weights), "swizzle":
  32 | 64 | 128 (mma)}."""
  from kernels._gemv import GEMV_FORMS, MMA_SWIZZLES
  if not group:
    return
  if (set(group) - {"form", "swizzle"} or group.get("form") not in GEMV_FORMS
          or ("swizzle" in group and (group["form"] != "mma"
                                      or group["swizzle"] not in MMA_SWIZZLES))):
    raise ValueError(f"kernel_options['gemv']: {group} (known: form in "
                     f"{', '.join(GEMV_FORMS)}; swizzle in {MMA_SWIZZLES}, with form 'mma')")


def _check_capacity(cfg: ModelConfig, kinds, max_len: int):
  """Log-linear layers hold at most 2^(L-1) tokens: say so at construction (the plain
  Mamba-2 / GDN state has no limit)."""
  from jaxlab.models.mixers.mamba2 import check_levels
  for l, kind in enumerate(kinds):
    opts = _abstract_mixer(cfg, l).opts if kind == "levels" else None
    if opts is not None and opts.log_linear:
      check_levels(opts.num_levels, max_len, f"layer {l} ({cfg.layer_mixer(l)})")



def init_state(cfg: ModelConfig, cache_len: int, *, layers: str = "unrolled", pos: int = 0):
  """An empty decode state: dict(k, v, conv, levels, gate, pos), one entry per layer in
  each tuple (None where a layer has no such cache). Attention: k, v [Hkv, S, Dh] in the
  parameter dtype (stacked for layers='scan'); PaTH / FoX: k fp32, v in the parameter
  dtype, the w conv state (PaTH) and the gate [Hq, S] fp32 (forget-gated layers);
  log-linear: levels [H, L, K, V] fp32 and the conv state."""
  kinds = layer_kinds(cfg)
  shape = (cfg.kv_heads, cache_len, cfg.dim_per_head)
  dt = jnp.dtype(cfg.param_dtype)
  ks, vs, convs, levels, gates = [], [], [], [], []
  for l, kind in enumerate(kinds):
    k = v = conv = lev = gate = None
    if kind == "attention":
      k, v = jnp.zeros(shape, dt), jnp.zeros(shape, dt)
    else:
      m = _abstract_mixer(cfg, l)
      c = jax.eval_shape(lambda: m.init_cache(1, 1))
      conv = None if c["conv"] is None else jnp.zeros(c["conv"].shape[1:], jnp.float32)[None]
      if kind == "path":   # as PathCache: fp32 keys (rewritten every step), values in dt
        k, v = jnp.zeros(shape, jnp.float32), jnp.zeros(shape, dt)
        if m.opts.use_gate:
          gate = jnp.zeros((cfg.n_heads, cache_len), jnp.float32)
      else:
        lev = jnp.zeros(c["state"].levels.shape[1:], jnp.float32)
    ks.append(k)
    vs.append(v)
    convs.append(conv)
    levels.append(lev)
    gates.append(gate)
  ks, vs = tuple(ks), tuple(vs)
  if layers == "scan":
    ks, vs = jnp.stack(ks), jnp.stack(vs)
  return dict(k=ks, v=vs, conv=tuple(convs), levels=tuple(levels), gate=tuple(gates),
              pos=jnp.int32(pos))


@functools.lru_cache(maxsize=32)
def _prefill_fn(graphdef, cache_len: int, layers: str):
  """Jitted prefill through the model's own `extend` (XLA); cached per model
  structure so that decoders of the same model share compilations."""

  @jax.jit
  def prefill_fn(model_state, tokens_T):
    m = nnx.merge(graphdef, model_state)
    T = tokens_T.shape[0]
    # Log-linear layers get a capacity-sized cache (their slots do not depend on length).
    cache = dict(layers=tuple(
        blk.mixer.init_cache(1, cache_len if kind != "levels" else 1, m._dtype())
        for blk, kind in zip(m.layers, layer_kinds(m.cfg))),
        next_pos=jnp.zeros((1,), jnp.int32))
    logits, cache = m.extend(tokens_T[None], cache)
    ks, vs, convs, levels, gates = [], [], [], [], []
    for c, kind in zip(cache["layers"], layer_kinds(m.cfg)):
      kv = c if kind == "attention" else c.get("attn")
      head_major = lambda a: jnp.transpose(a[0], (1, 0, 2))
      ks.append(None if kv is None else head_major(kv["k"] if kind == "attention" else kv.k))
      vs.append(None if kv is None else head_major(kv["v"] if kind == "attention" else kv.v))
      convs.append(c.get("conv"))
      levels.append(c["state"].levels[0] if kind == "levels" else None)
      gates.append(None if kind != "path" or kv.gate is None else kv.gate[0].T)   # [Hq, S]
    ks, vs = tuple(ks), tuple(vs)
    if layers == "scan":
      ks, vs = jnp.stack(ks), jnp.stack(vs)
    return logits[0, -1], dict(k=ks, v=vs, conv=tuple(convs), levels=tuple(levels),
                               gate=tuple(gates), pos=jnp.int32(T))

  return prefill_fn


# The in-place step's own slots in its state (see StepFn.inplace).
INPLACE_SLOTS = ("logits", "token")


def _named(fn, name: str):
  fn.__name__ = fn.__qualname__ = name   # the jitted module's name in dumps and profiles
  return fn


def _state_first(step_impl, spec: _Spec):
  def step(weights, state, token):
    logits, tok, new = step_impl(spec, weights, state, token)
    return new, logits, tok
  return _named(step, step_impl.__name__)


def _inplace(step_impl, spec: _Spec):
  def step(weights, slots):
    state = {k: v for k, v in slots.items() if k not in INPLACE_SLOTS}
    logits, tok, new = step_impl(spec, weights, state, slots["token"])
    return dict(new, logits=logits.astype(slots["logits"].dtype), token=tok)
  return _named(step, step_impl.__name__ + "_inplace")


def _on_device(step_impl, spec: _Spec):
  one = _inplace(step_impl, spec)

  def steps(weights, slots, n: int):
    def body(i, carry):
      slots, tokens = carry
      slots = one(weights, slots)
      return slots, tokens.at[i].set(slots["token"])
    return jax.lax.fori_loop(0, n, body, (slots, jnp.zeros((n,), jnp.int32)))
  return _named(steps, step_impl.__name__ + "_loop")


class StepFn:
  """The jitted decode step: `step(weights, state, token) -> (logits, token, state)`,
  state donated.

  JAX pairs each donated input with the first result of the same shape and dtype. With
  the token first among the results, the int32 position went to the token, and the new
  position came back in a new buffer every step. On a GPU a buffer address that changes
  between steps makes XLA update its command buffer (CUDA graph) and trace every Mosaic
  kernel reading that buffer again on the host, each step. So the jitted function
  (`.jitted`; `trace` / `lower` are its own) returns the state first, and every state
  leaf keeps its buffer.

  `.inplace(weights, slots) -> slots`: the same step with the token it reads and the
  logits and token it writes held in the state too ("token" int32 [], "logits" [V] fp32;
  Decoder.inplace_slots builds them), all donated. No buffer of the step is new, so a
  step's addresses stay put from step to step, as in a replayed CUDA graph with static
  buffers (gpt-fast). Read a slot before the next step: that step reuses its buffer.

  `.loop(weights, slots, n) -> (slots, tokens [n])`: n in-place greedy steps in one
  call (a fori_loop on the device, n static): no host work between steps at all."""

  def __init__(self, spec: _Spec):
    step_impl = _step_scan if spec.layers == "scan" else _step_unrolled
    self.jitted = jax.jit(_state_first(step_impl, spec), donate_argnums=(1,))
    self.inplace = jax.jit(_inplace(step_impl, spec), donate_argnums=(1,),
                           keep_unused=True)   # the logits slot is only written
    self.loop = jax.jit(_on_device(step_impl, spec), static_argnums=(2,), donate_argnums=(1,),
                        keep_unused=True)

  def __call__(self, weights, state, token):
    new, logits, tok = self.jitted(weights, state, token)
    return logits, tok, new

  def trace(self, *args, **kwargs):
    return self.jitted.trace(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self.jitted.lower(*args, **kwargs)


@functools.lru_cache(maxsize=32)
def _step_fn(spec: _Spec) -> StepFn:
  return StepFn(spec)


def decode_greedy(model, prompt_tokens: Sequence[int], n: int, *, impl: str,
                  max_len: int | None = None, interpret: bool | str | None = None,
                  layers: str = "unrolled", quantize: str | None = None,
                  share_layers: bool = False,
                  kernel_options: Mapping[str, Mapping[str, Any]] | None = None) -> np.ndarray:
  """Greedy batch-1 decoding: the n tokens after the prompt (int32 [n]), the steps in
  one call (Decoder.decode_inplace); the options are make_decoder's."""
  if n < 1:
    raise ValueError(f"decode_greedy: n must be >= 1, got {n}")
  max_len = len(prompt_tokens) + n if max_len is None else max_len
  dec = make_decoder(model, impl, max_len, layers=layers, interpret=interpret,
                     quantize=quantize, share_layers=share_layers, kernel_options=kernel_options)
  logits, state = dec.prefill(prompt_tokens)
  tok = jnp.argmax(logits).astype(jnp.int32)
  if n == 1:
    return np.asarray(tok).reshape(1)
  # the n - 1 steps in one call, on the device (Decoder.decode_inplace)
  _, tokens = dec.decode_inplace(dec.inplace_slots(state, tok), n - 1)
  return np.concatenate([np.asarray(tok).reshape(1), np.asarray(tokens)])


class DecodeStreamer:
  """Token streaming on the decode driver, with the interface of
  jaxlab.models.generate.Streamer (what `jaxlab generate --impl NAME` loads):
  `DecodeStreamer(model, *, max_len, sampling, seed)`, `.stream(prompt_ids,
  max_new_tokens, eos_ids)` yields token ids. Batch 1; impl="pallas" by default.

  It has no `.state` attribute on purpose: the CLI's streamer cache then builds a
  new one per model (cheap: the jitted steps are cached per decoder shape). Its decoder
  inlines its layers, the fastest step measured; each kernel is still lowered once per
  step, so the compile stays short. Greedy decoding runs the in-place step
  (Decoder.step_inplace: its own argmax token, no buffer new per step); sampling reads the
  logits of Decoder.step."""

  def __init__(self, model, *, max_len: int, sampling=None, seed: int = 0, impl: str = "pallas",
               interpret: bool | str | None = None, quantize: str | None = None):
    from jaxlab.models.sampling import SamplingConfig
    self.dec = make_decoder(model, impl, max_len, interpret=interpret, quantize=quantize)
    self.max_len = max_len
    self.sampling = SamplingConfig() if sampling is None else sampling
    self.rng = jax.random.key(seed)

  def stream(self, prompt: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = ()):
    from jaxlab.models.sampling import sample_logits
    if len(prompt) == 0:
      raise ValueError("empty prompt")
    if len(prompt) + max_new_tokens > self.max_len:
      raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds "
                       f"max_len={self.max_len}")
    logits, state = self.dec.prefill(list(prompt))
    greedy, slots = self.sampling.greedy, None   # greedy: the in-place step's own token
    for i in range(max_new_tokens):
      if slots is not None:
        t = int(slots["token"])
      elif greedy:
        t = int(jnp.argmax(logits))
      else:
        self.rng, sub = jax.random.split(self.rng)
        t = int(sample_logits(logits[None], sub, self.sampling)[0])
      yield t
      if t in eos_ids or i == max_new_tokens - 1:
        return
      if greedy:
        slots = self.dec.step_inplace(self.dec.inplace_slots(state, t) if slots is None
                                      else slots)
      else:
        logits, _, state = self.dec.step(state, t)


class XLADecodeStreamer(DecodeStreamer):
  """DecodeStreamer on the XLA reference ops (the same step, impl="xla")."""

  def __init__(self, model, *, max_len: int, sampling=None, seed: int = 0):
    super().__init__(model, max_len=max_len, sampling=sampling, seed=seed, impl="xla")


class Int8DecodeStreamer(DecodeStreamer):
  """DecodeStreamer with int8 weight-only GEMVs (`jaxlab generate --impl pallas-int8`)."""

  def __init__(self, model, *, max_len: int, sampling=None, seed: int = 0):
    super().__init__(model, max_len=max_len, sampling=sampling, seed=seed, impl="pallas",
                     quantize="int8")
