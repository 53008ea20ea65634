"""PaTH, PaTH-FoX and FoX token mixers (no RoPE: position enters through the op).

Parameterization (fla `layers/path_attn.py`, papers.md section 2.1):
  w    = l2norm_fp32(SiLU(causal_depthwise_conv_k3(x W_down W_up)))   per KV head
         (low rank hidden -> 32 -> kv_dim; option path_w_rank=0 uses one full projection)
  beta = 2 sigmoid(x U + b)                                            per KV head, fp32
  g    = logsigmoid(x V_g + b_g)                                       per query head, fp32
PaTH-FoX follows fla's convention: the gate sits inside the scale,
logits = scale (q~.k + G_i - G_j). The FoX baseline follows the FoX paper,
logits = scale q.k + G_i - G_j (no transitions), so it passes g / scale to the op.

Options (ModelConfig.mixer_options): path_w_rank (32), path_w_conv (3; 0 = no conv),
path_block_size (64), gate_bias_init (0.0).

Cache: {"attn": PathCache (keys already carried to the latest token), "conv": the last
path_w_conv - 1 pre-conv w activations (fp32)}. extend with T = 1 is the in-place decode
step; T > 1 runs the blockwise op against the cache.

Padding (mask_BT False) is invisible: its key is never attended, its transition is the
identity (beta = 0), its gate is 0, and its w activation enters the conv as 0, so a
left-padded row matches the unpadded one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab.models.config import ModelConfig
from jaxlab.models.layers import Linear, RMSNorm
from jaxlab.models.mixers.base import register_mixer
from jaxlab.ops import path as path_ops

F32 = jnp.float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class PathOptions:
  """What the mixer computes; built from ModelConfig.mixer_options."""
  use_path: bool = True        # Householder transitions (PaTH)
  use_gate: bool = False       # forget gate (FoX)
  gate_in_scale: bool = True   # PaTH-FoX (fla) scales the gate; plain FoX does not
  w_rank: int = 32
  w_conv: int = 3
  block_size: int = 64
  gate_bias_init: float = 0.0

  def __post_init__(self):
    for f in ("w_rank", "w_conv"):
      v = getattr(self, f)
      if not (isinstance(v, int) and v >= 0):
        raise ValueError(f"PathOptions.{f}: must be a non-negative integer, got {v!r}")
    if not (isinstance(self.block_size, int) and self.block_size > 0):
      raise ValueError(f"PathOptions.block_size: must be a positive integer, "
                       f"got {self.block_size!r}")

  @classmethod
  def from_config(cls, cfg: ModelConfig, **kw):
    return cls(w_rank=cfg.option("path_w_rank", 32), w_conv=cfg.option("path_w_conv", 3),
               block_size=cfg.option("path_block_size", 64),
               gate_bias_init=float(cfg.option("gate_bias_init", 0.0)), **kw)


def l2norm_fp32(x, eps: float = 1e-12):
  """x / ||x|| over the last axis in fp32 (a zero row stays zero)."""
  x = x.astype(F32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class PathAttention(nnx.Module):
  """GQA softmax attention with PaTH transitions and/or a forget gate."""

  def __init__(self, cfg: ModelConfig, layer_idx: int = 0, *, rngs: nnx.Rngs,
               opts: PathOptions):
    self.opts = opts
    self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    d, hd = cfg.d_model, self.head_dim
    kv_dim = self.n_kv * hd
    kw = dict(init_std=cfg.init_std, param_dtype=cfg.param_dtype, rngs=rngs)
    self.q_proj = Linear(d, self.n_heads * hd, use_bias=cfg.attn_bias, axes=("embed", "heads"), **kw)
    self.k_proj = Linear(d, kv_dim, use_bias=cfg.attn_bias, axes=("embed", "kv_heads"), **kw)
    self.v_proj = Linear(d, kv_dim, use_bias=cfg.attn_bias, axes=("embed", "kv_heads"), **kw)
    self.o_proj = Linear(self.n_heads * hd, d, axes=("heads", "embed"), **kw)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(hd, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
      self.k_norm = RMSNorm(hd, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    else:
      self.q_norm = self.k_norm = None
    w_down = w_up = w_proj = w_conv = beta_proj = g_proj = None
    if opts.use_path:
      if opts.w_rank:
        w_down = Linear(d, opts.w_rank, axes=("embed", None), **kw)
        w_up = Linear(opts.w_rank, kv_dim, axes=(None, "kv_heads"), **kw)
      else:
        w_proj = Linear(d, kv_dim, axes=("embed", "kv_heads"), **kw)
      if opts.w_conv:
        # Depthwise causal conv, PyTorch Conv1d default init U(-1/sqrt(k), 1/sqrt(k)).
        bound = opts.w_conv ** -0.5
        kern = jax.random.uniform(rngs.params(), (opts.w_conv, kv_dim), F32, -bound, bound)
        w_conv = nnx.Param(kern.astype(jnp.dtype(cfg.param_dtype)),
                           logical_axes=(None, "kv_heads"))
      beta_proj = Linear(d, self.n_kv, use_bias=True, axes=("embed", None), **kw)
    if opts.use_gate:
      g_proj = Linear(d, self.n_heads, use_bias=True, axes=("embed", None), **kw)
      g_proj.bias[...] = jnp.full((self.n_heads,), opts.gate_bias_init, g_proj.bias[...].dtype)
    self.w_down, self.w_up, self.w_proj = nnx.data(w_down), nnx.data(w_up), nnx.data(w_proj)
    self.w_conv, self.beta_proj, self.g_proj = nnx.data(w_conv), nnx.data(beta_proj), nnx.data(g_proj)
    self.scale = hd ** -0.5

  # -------------------------------------------------------------------------- projections

  def _inputs(self, x_BTD, conv_state, mask_BT):
    """q, k, v, w, beta, g for the op and the new conv state."""
    B, T, _ = x_BTD.shape
    hd = self.head_dim
    q = self.q_proj(x_BTD).reshape(B, T, self.n_heads, hd)
    k = self.k_proj(x_BTD).reshape(B, T, self.n_kv, hd)
    v = self.v_proj(x_BTD).reshape(B, T, self.n_kv, hd)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    w = beta = g = None
    new_state = conv_state
    if self.opts.use_path:
      pre = self.w_up(self.w_down(x_BTD)) if self.w_proj is None else self.w_proj(x_BTD)
      if mask_BT is not None:
        pre = jnp.where(mask_BT[..., None], pre, jnp.zeros((), pre.dtype))
      if self.w_conv is not None:
        pre, new_state = self._conv(pre, conv_state)
        pre = jax.nn.silu(pre)
      w = l2norm_fp32(pre.reshape(B, T, self.n_kv, hd))
      beta = 2.0 * jax.nn.sigmoid(self.beta_proj(x_BTD).astype(F32))
    if self.opts.use_gate:
      g = jax.nn.log_sigmoid(self.g_proj(x_BTD).astype(F32))
      if not self.opts.gate_in_scale:
        g = g / self.scale   # the op multiplies the gate by scale; FoX does not
    return q, k, v, w, beta, g, new_state

  def decode_inputs(self, x_BTD, conv_state):
    """(q, k, v, w, beta, g, new conv state) for T unpadded tokens: what a decode driver
    with its own cache layout needs (jaxlab/models/decode.py)."""
    return self._inputs(x_BTD, conv_state, None)

  def _conv(self, pre_BTC, state_BSC):
    """Causal depthwise conv over [state, pre]; returns (out, last w_conv-1 inputs)."""
    ks = self.opts.w_conv
    B, T, C = pre_BTC.shape
    if state_BSC is None:
      state_BSC = jnp.zeros((B, ks - 1, C), F32)
    window = jnp.concatenate([state_BSC.astype(pre_BTC.dtype), pre_BTC], axis=1)
    kern = self.w_conv[...].astype(pre_BTC.dtype)
    out = sum(window[:, i:i + T] * kern[i] for i in range(ks))
    return out, window[:, T:].astype(F32)

  # -------------------------------------------------------------------------- interface

  def __call__(self, x_BTD, *, positions_BT=None, mask_BT=None):
    del positions_BT  # no RoPE
    B, T, _ = x_BTD.shape
    q, k, v, w, beta, g, _ = self._inputs(x_BTD, None, mask_BT)
    o = path_ops._path_attention(q, k, v, w, beta, g, scale=self.scale, impl="blockwise",
                                 kv_mask=mask_BT, block_size=self.opts.block_size,
                                 need_w=self.opts.use_path)
    return self.o_proj(o.reshape(B, T, -1))

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
    attn = path_ops.path_init_cache(batch_size, max_len, num_heads=self.n_kv,
                                    num_q_heads=self.n_heads, head_dim=self.head_dim,
                                    dtype=jnp.float32 if dtype is None else dtype, gate=self.opts.use_gate)
    conv = None
    if self.opts.use_path and self.opts.w_conv:
      conv = jnp.zeros((batch_size, self.opts.w_conv - 1, self.n_kv * self.head_dim), F32)
    return dict(attn=attn, conv=conv)

  def extend(self, x_BTD, cache, *, positions_BT=None, mask_BT=None):
    del positions_BT
    B, T, _ = x_BTD.shape
    q, k, v, w, beta, g, conv = self._inputs(x_BTD, cache["conv"], mask_BT)
    if T == 1:  # decode: update every cached key in place, then attend
      sq = lambda a: None if a is None else a[:, 0]
      o, attn = path_ops._decode_step(cache["attn"], sq(q), sq(k), sq(v), sq(w), sq(beta),
                                      sq(g), scale=self.scale, mask_t=sq(mask_BT))
      o = o[:, None]
    else:
      o, attn = path_ops._extend(cache["attn"], q, k, v, w, beta, g, scale=self.scale,
                                 kv_mask=mask_BT, block_size=self.opts.block_size)
    return self.o_proj(o.reshape(B, T, -1)), dict(attn=attn, conv=conv)


@register_mixer("path")
def _make_path(cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
  return PathAttention(cfg, layer_idx, rngs=rngs, opts=PathOptions.from_config(cfg))


@register_mixer("path_fox")
def _make_path_fox(cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
  return PathAttention(cfg, layer_idx, rngs=rngs,
                       opts=PathOptions.from_config(cfg, use_gate=True))


@register_mixer("fox")
def _make_fox(cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
  return PathAttention(cfg, layer_idx, rngs=rngs,
                       opts=PathOptions.from_config(cfg, use_path=False, use_gate=True,
                                                    gate_in_scale=False))
