"""Gated DeltaNet and log-linear Gated DeltaNet token mixers (papers.md section 1).

Parameterization (fla ``layers/gated_deltanet.py``, hattention's log-linear GDN):
  q, k = l2norm(SiLU(conv_W(x Wq))), l2norm(SiLU(conv_W(x Wk)))   G groups of dk
  v    = SiLU(conv_W(x Wv))                                       H heads of dv
  beta = sigmoid(x Wb);  g = -exp(A_log) softplus(x Wa + dt_bias)  per head
  plain:      o = GDN(q, k, v, g, beta) with scale dk^-1/2
  log-linear: lambda = softplus(level_scale[h, l] * (x Wl)[h, l]), and as in
              hattention lambda is pre-divided by the scale while q carries it, so
              the effective readout is lambda * l2norm(q)^T S (scale 1 here)
  out = o_proj(RMSNorm_per_head(o) * SiLU(x Wgate))
The op is jaxlab.ops.log_linear (chunked for T > 1, the recurrent state for T = 1).

Options (ModelConfig.mixer_options): head_k_dim (dk, default head_dim of the
config), expand_v (dv = expand_v * dk, 2), qk_heads (G, default n_heads; H must
be a multiple), conv_width (4), num_levels (default ceil(log2 max_seq_len) + 1),
impl ("chunked").

Padding and cache as in mamba2.py (real tokens are compacted; cache =
{"state": LogLinearState, "conv": last conv_width - 1 pre-conv q|k|v inputs}).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab.models.config import ModelConfig
from jaxlab.models.layers import Linear, RMSNorm
from jaxlab.models.mixers.base import register_mixer
from jaxlab.models.mixers.mamba2 import (StateMixer, _opt_impl, _opt_int, causal_conv, compact,
                                         dt_bias_init, uncompact)
from jaxlab.ops import log_linear as ll

F32 = jnp.float32


def l2norm_fp32(x, eps: float = 1e-6):
  """x / ||x|| over the last axis in fp32 (fla's l2norm eps)."""
  x = x.astype(F32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GDNOptions:
  """Gated DeltaNet shape; see the module docstring for the option keys."""
  log_linear: bool = False
  heads: int = 4
  qk_heads: int = 4
  head_k_dim: int = 32
  head_v_dim: int = 64
  conv_width: int = 4
  num_levels: int = 12
  impl: str = "chunked"

  @classmethod
  def from_config(cls, cfg: ModelConfig, log_linear: bool):
    h = cfg.n_heads
    g = _opt_int(cfg, "qk_heads", h)
    if h % g:
      raise ValueError(f"ModelConfig.mixer_options['qk_heads']: {g} q/k heads do not divide "
                       f"n_heads={h}")
    dk = _opt_int(cfg, "head_k_dim", cfg.dim_per_head)
    return cls(log_linear=log_linear, heads=h, qk_heads=g, head_k_dim=dk,
               head_v_dim=_opt_int(cfg, "expand_v", 2) * dk,
               conv_width=_opt_int(cfg, "conv_width", 4),
               num_levels=_opt_int(cfg, "num_levels", ll.num_levels(cfg.max_seq_len)),
               impl=_opt_impl(cfg))


class GatedDeltaNet(StateMixer):
  """Gated DeltaNet mixer; log_linear=True gives log-linear Gated DeltaNet."""

  log_linear_name = "log_linear_gated_deltanet"

  def __init__(self, cfg: ModelConfig, layer_idx: int = 0, *, rngs: nnx.Rngs, opts: GDNOptions):
    self.opts = o = opts
    d = cfg.d_model
    self.key_dim = o.qk_heads * o.head_k_dim
    self.value_dim = o.heads * o.head_v_dim
    self.conv_dim = 2 * self.key_dim + self.value_dim
    kw = dict(init_std=cfg.init_std, param_dtype=cfg.param_dtype, rngs=rngs)
    pdt = jnp.dtype(cfg.param_dtype)
    self.q_proj = Linear(d, self.key_dim, axes=("embed", "heads"), **kw)
    self.k_proj = Linear(d, self.key_dim, axes=("embed", "heads"), **kw)
    self.v_proj = Linear(d, self.value_dim, axes=("embed", "heads"), **kw)
    self.a_proj = Linear(d, o.heads, axes=("embed", None), **kw)
    self.b_proj = Linear(d, o.heads, axes=("embed", None), **kw)
    self.g_proj = Linear(d, self.value_dim, axes=("embed", "heads"), **kw)
    self.o_proj = Linear(self.value_dim, d, axes=("heads", "embed"), **kw)
    bound = o.conv_width ** -0.5
    self.conv_kernel = nnx.Param(
        jax.random.uniform(rngs.params(), (o.conv_width, self.conv_dim), F32, -bound,
                           bound).astype(pdt), logical_axes=(None, "heads"))
    a = jax.random.uniform(rngs.params(), (o.heads,), F32, 1e-4, 16.0)
    self.A_log = nnx.Param(jnp.log(a).astype(pdt), logical_axes=(None,))
    self.dt_bias = nnx.Param(dt_bias_init(rngs.params(), o.heads).astype(pdt),
                             logical_axes=(None,))
    if o.log_linear:
      self.l_proj = Linear(d, o.heads * o.num_levels, axes=("embed", None), **kw)
      self.level_scale = nnx.Param(jnp.ones((o.heads * o.num_levels,), pdt),
                                   logical_axes=(None,))
    else:
      self.l_proj = self.level_scale = None
    self.o_norm = RMSNorm(o.head_v_dim, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    self.scale = o.head_k_dim ** -0.5

  def _run(self, x_BTD, state, conv_state, mask_BT, impl):
    o = self.opts
    b, t, _ = x_BTD.shape
    xs, n, inv = compact(x_BTD, mask_BT)
    pre = jnp.concatenate([self.q_proj(xs), self.k_proj(xs), self.v_proj(xs)], axis=-1)
    if conv_state is None:
      conv_state = jnp.zeros((b, o.conv_width - 1, self.conv_dim), F32)
    pre, new_conv = causal_conv(pre, self.conv_kernel[...], None, conv_state, n)
    q, k, v = jnp.split(jax.nn.silu(pre), [self.key_dim, 2 * self.key_dim], axis=-1)
    q = l2norm_fp32(q.reshape(b, t, o.qk_heads, o.head_k_dim))
    k = l2norm_fp32(k.reshape(b, t, o.qk_heads, o.head_k_dim))
    v = v.reshape(b, t, o.heads, o.head_v_dim).astype(F32)
    beta = jax.nn.sigmoid(self.b_proj(xs).astype(F32))
    dt = jax.nn.softplus(self.a_proj(xs).astype(F32) + self.dt_bias[...].astype(F32))
    g = -jnp.exp(self.A_log[...].astype(F32)) * dt
    if o.log_linear:
      lscale = self.level_scale[...].astype(F32).reshape(o.heads, o.num_levels)
      dl = self.l_proj(xs).astype(F32).reshape(b, t, o.heads, o.num_levels)
      lam, scale = jax.nn.softplus(lscale * dl), 1.0
    else:
      lam, scale = None, self.scale
    y, new_state = self._op(q, k, v, g, beta, lam, scale=scale, impl=impl, state=state, n=n)
    y = self.o_norm(y.astype(x_BTD.dtype))
    gate = self.g_proj(xs).reshape(b, t, o.heads, o.head_v_dim)
    y = (y * jax.nn.silu(gate)).reshape(b, t, self.value_dim)
    return uncompact(self.o_proj(y), n, inv), new_state, new_conv

  def state_dims(self):
    return self.opts.head_k_dim, self.opts.head_v_dim


@register_mixer("gated_deltanet")
def _make_gdn(cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
  return GatedDeltaNet(cfg, layer_idx, rngs=rngs, opts=GDNOptions.from_config(cfg, False))


@register_mixer("log_linear_gated_deltanet")
def _make_ll_gdn(cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
  return GatedDeltaNet(cfg, layer_idx, rngs=rngs, opts=GDNOptions.from_config(cfg, True))
