"""Mamba-2 and log-linear Mamba-2 token mixers (papers.md section 1).

Parameterization (Mamba-2 / hattention):
  [z, xBC, dt, dl] = in_proj(x)         widths d_inner, d_inner + 2 G N, H, H L (log-linear only)
  xBC = SiLU(causal depthwise conv_W(xBC) + bias);  x, B, C = split(xBC)
  dt = softplus(dt + dt_bias);  g = -exp(A_log) dt;  v = x dt;  q = C, k = B (G groups)
  lambda = softplus(level_scale[h, l] * dl[h, l])   (level_scale init 1; log-linear only)
  y = op(q, k, v, g[, lambda]) + D x;  out = out_proj(RMSNorm(y * SiLU(z)))
The op is jaxlab.ops.log_linear (chunked for T > 1, the recurrent state for T = 1).

Options (ModelConfig.mixer_options): expand (2), state_size (N, 64), n_groups (G, 1),
ssm_heads (H, default n_heads), conv_width (4), num_levels (default
ceil(log2 max_seq_len) + 1), impl ("chunked").

Parameters without weight decay in the papers (A_log, dt_bias, D, level_scale) are
1-D, so the trainer's ndim >= 2 decay mask skips them; level_scale is stored flat
[H * L] for that reason.

Padding: tokens with mask_BT False are removed before anything runs (each row's
real tokens are gathered to the front, in order, and results scattered back), so
they change neither the conv windows, the Fenwick positions nor the cache; their
outputs are 0. Cache: {"state": LogLinearState (count = real tokens seen, per
row), "conv": the last conv_width - 1 pre-conv inputs, fp32}.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab.models.config import ModelConfig
from jaxlab.models.layers import Linear, RMSNorm
from jaxlab.models.mixers.base import register_mixer
from jaxlab.ops import log_linear as ll

F32 = jnp.float32


# ------------------------------------------------------------------ shared helpers


def compact(x_BT_, mask_BT):
  """Gather each row's real tokens to the front (stable). Returns (x, n_B, inverse perm)."""
  if mask_BT is None:
    b, t = x_BT_.shape[:2]
    return x_BT_, jnp.full((b,), t, jnp.int32), None
  m = mask_BT.astype(bool)
  perm = jnp.argsort(~m, axis=1, stable=True)
  inv = jnp.argsort(perm, axis=1)
  xs = jnp.take_along_axis(x_BT_, perm.reshape(perm.shape + (1,) * (x_BT_.ndim - 2)), axis=1)
  return xs, jnp.sum(m, axis=1, dtype=jnp.int32), inv


def uncompact(y_BT_, n_B, inv):
  """Inverse of compact for outputs: real tokens back in place, padded slots 0."""
  t = y_BT_.shape[1]
  live = (jnp.arange(t)[None, :] < n_B[:, None]).reshape((-1, t) + (1,) * (y_BT_.ndim - 2))
  y = jnp.where(live, y_BT_, jnp.zeros((), y_BT_.dtype))
  if inv is None:
    return y
  return jnp.take_along_axis(y, inv.reshape(inv.shape + (1,) * (y.ndim - 2)), axis=1)


def causal_conv(x_BTC, kernel_WC, bias_C, state_BSC, n_B):
  """Depthwise causal conv over [state, x] (state = previous W-1 inputs).

  Returns (out [B,T,C], new state): the W-1 inputs before the row's next token,
  i.e. the last W-1 entries of [state, x[:n_B]].
  """
  w = kernel_WC.shape[0]
  b, t, c = x_BTC.shape
  window = jnp.concatenate([state_BSC.astype(x_BTC.dtype), x_BTC], axis=1)
  kern = kernel_WC.astype(x_BTC.dtype)
  out = sum(window[:, i:i + t] * kern[i] for i in range(w))
  if bias_C is not None:
    out = out + bias_C.astype(x_BTC.dtype)
  idx = n_B[:, None] + jnp.arange(w - 1)[None, :]                     # [B, W-1]
  new_state = jnp.take_along_axis(window, idx[..., None], axis=1).astype(F32)
  return out, new_state


def inv_softplus(x):
  return x + jnp.log(-jnp.expm1(-x))


def dt_bias_init(key, n, dt_min=1e-3, dt_max=0.1, floor=1e-4):
  """Mamba's dt bias: softplus(dt_bias) log-uniform in [dt_min, dt_max]."""
  u = jax.random.uniform(key, (n,), F32)
  dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
  return inv_softplus(jnp.maximum(dt, floor))


def check_levels(num_levels: int, max_len: int, where: str):
  cap = 2 ** (num_levels - 1)
  if max_len > cap:
    raise ValueError(f"max_len: {max_len} tokens exceed the {num_levels}-level state capacity "
                     f"{cap} of {where} (raise mixer option num_levels)")


def _opt_int(cfg, key, default, minimum=1):
  v = cfg.option(key, default)
  if not (isinstance(v, int) and not isinstance(v, bool) and v >= minimum):
    raise ValueError(f"ModelConfig.mixer_options[{key!r}]: must be an integer >= {minimum}, "
                     f"got {v!r}")
  return v


def _opt_impl(cfg):
  impl = cfg.option("impl", "chunked")
  if impl not in ll.IMPLS:
    raise ValueError(f"ModelConfig.mixer_options['impl']: unknown implementation {impl!r} "
                     f"(known: {', '.join(ll.IMPLS)})")
  return impl


@dataclasses.dataclass(frozen=True)
class LevelKernel:
  """Run the one-token state update of a Mamba-2 / GDN mixer (log-linear: the Fenwick
  levels; plain: its one state) with the batch-1 decode op kernels/log_linear_state
  (impl "xla" | "pallas"; `interpret` as in kernels/). Passed as
  `extend(..., level_kernel=...)` by the decode driver (jaxlab/models/decode.py)."""
  impl: str
  interpret: Any = None
  pdl: str | None = None   # the Pallas kernel's launch (kernels/_common.PDL_MODES)


def _level_kernel_step(kern: LevelKernel, q, k, v, g, beta, lam, state, n, fenwick=True):
  """T = 1 through kernels/log_linear_state, one batch row at a time (the op is batch-1).

  q, k [B,1,G,K]; v [B,1,H,V]; g, beta [B,1,H]; lam [B,1,H,L]; state a LogLinearState.
  A row with n = 0 (padding) keeps its state and count. fenwick=False: the plain
  recurrence (one level)."""
  from kernels.log_linear_state import log_linear_state_update
  rep = v.shape[2] // q.shape[2]
  f32 = jnp.float32
  qh = jnp.repeat(q[:, 0].astype(f32), rep, axis=1)
  kh = jnp.repeat(k[:, 0].astype(f32), rep, axis=1)
  variant = "mamba2" if beta is None else "gdn"
  outs, levels = [], []
  for b in range(v.shape[0]):
    # A padded row (n = 0) keeps its state: the kernel writes the old tiles back (no
    # select over the state after it, no branch around it).
    o, new = log_linear_state_update(
        state.levels[b], state.count[b], qh[b], kh[b], v[b, 0].astype(f32), lam[b, 0].astype(f32),
        g[b, 0].astype(f32), None if beta is None else beta[b, 0].astype(f32), variant=variant,
        impl=kern.impl, fenwick=fenwick, commit=n[b] > 0, interpret=kern.interpret,
        pdl=kern.pdl)
    outs.append(o)
    levels.append(new)
  y = jnp.stack(outs)[:, None].astype(v.dtype)
  return y, ll.LogLinearState(jnp.stack(levels), state.count + n)


class StateMixer(nnx.Module):
  """Shared mixer-interface plumbing of the recurrent-state mixers (Mamba-2, GDN).

  A subclass sets `opts` (with `impl`, `log_linear`, `num_levels`, `heads`, `conv_width`),
  `conv_dim`, `log_linear_name` (for errors), `state_dims()` -> (K, V) and
  `_run(x, state, conv_state, mask, impl) -> (y, new_state, new_conv)`.
  """

  log_linear_name = ""

  def state_dims(self) -> tuple[int, int]:
    raise NotImplementedError

  def __call__(self, x_BTD, *, positions_BT=None, mask_BT=None):
    del positions_BT  # positions come from the token order (and the cache's count)
    return self._run(x_BTD, None, None, mask_BT, self.opts.impl)[0]

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
    del dtype  # the state is fp32
    o = self.opts
    nl = o.num_levels if o.log_linear else 1
    if o.log_linear:
      check_levels(nl, max_len, self.log_linear_name)
    return dict(state=ll.init_state(batch_size, o.heads, nl, *self.state_dims()),
                conv=jnp.zeros((batch_size, o.conv_width - 1, self.conv_dim), F32))

  def extend(self, x_BTD, cache, *, positions_BT=None, mask_BT=None,
             level_kernel: LevelKernel | None = None):
    """level_kernel: run this one-token step's state update with kernels/log_linear_state
    (T = 1 only; see LevelKernel)."""
    del positions_BT
    if level_kernel is not None:
      if x_BTD.shape[1] != 1:
        raise ValueError(f"extend: level_kernel needs one token (T = 1); got T={x_BTD.shape[1]}")
      impl = level_kernel
    else:
      impl = "recurrent" if x_BTD.shape[1] == 1 else self.opts.impl
    out, state, conv = self._run(x_BTD, cache["state"], cache["conv"], mask_BT, impl)
    return out, dict(state=state, conv=conv)

  def _op(self, q, k, v, g, beta, lam, *, scale, impl, state, n):
    """(y, new state or None): the log-linear op, or the decode kernel for a LevelKernel."""
    if isinstance(impl, LevelKernel):
      if lam is None:   # plain recurrence: one state, the score scale as its level weight
        lam = jnp.full(v.shape[:3] + (1,), scale, F32)
        return _level_kernel_step(impl, q, k, v, g, beta, lam, state, n, fenwick=False)
      assert scale == 1.0, scale   # the log-linear mixers fold any score scale into lambda
      return _level_kernel_step(impl, q, k, v, g, beta, lam, state, n)
    res = ll._run(q, k, v, g, beta, lam, scale=scale, impl=impl, initial_state=state,
                  return_state=state is not None, lengths=n)
    return res if state is not None else (res, None)


# ---------------------------------------------------------------------------- Mamba-2


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mamba2Options:
  """Mamba-2 shape; see the module docstring for the option keys."""
  log_linear: bool = False
  expand: int = 2
  state_size: int = 64
  n_groups: int = 1
  heads: int = 4
  conv_width: int = 4
  num_levels: int = 12
  impl: str = "chunked"

  @classmethod
  def from_config(cls, cfg: ModelConfig, log_linear: bool):
    heads = _opt_int(cfg, "ssm_heads", cfg.n_heads)
    expand = _opt_int(cfg, "expand", 2)
    groups = _opt_int(cfg, "n_groups", 1)
    if (expand * cfg.d_model) % heads:
      raise ValueError(f"ModelConfig.mixer_options['ssm_heads']: {heads} heads do not divide "
                       f"d_inner = expand * d_model = {expand * cfg.d_model}")
    if heads % groups:
      raise ValueError(f"ModelConfig.mixer_options['n_groups']: {groups} groups do not divide "
                       f"{heads} heads")
    return cls(log_linear=log_linear, expand=expand, state_size=_opt_int(cfg, "state_size", 64),
               n_groups=groups, heads=heads, conv_width=_opt_int(cfg, "conv_width", 4),
               num_levels=_opt_int(cfg, "num_levels", ll.num_levels(cfg.max_seq_len)),
               impl=_opt_impl(cfg))


class Mamba2(StateMixer):
  """Mamba-2 (SSD) mixer; log_linear=True gives log-linear Mamba-2."""

  log_linear_name = "log_linear_mamba2"

  def __init__(self, cfg: ModelConfig, layer_idx: int = 0, *, rngs: nnx.Rngs,
               opts: Mamba2Options):
    self.opts = o = opts
    d = cfg.d_model
    self.d_inner = o.expand * d
    self.head_dim = self.d_inner // o.heads
    self.conv_dim = self.d_inner + 2 * o.n_groups * o.state_size
    nl = o.num_levels if o.log_linear else 0
    kw = dict(init_std=cfg.init_std, param_dtype=cfg.param_dtype, rngs=rngs)
    pdt = jnp.dtype(cfg.param_dtype)
    self.in_proj = Linear(d, self.d_inner + self.conv_dim + o.heads + o.heads * nl,
                          axes=("embed", "heads"), **kw)
    bound = o.conv_width ** -0.5
    self.conv_kernel = nnx.Param(
        jax.random.uniform(rngs.params(), (o.conv_width, self.conv_dim), F32, -bound,
                           bound).astype(pdt), logical_axes=(None, "heads"))
    self.conv_bias = nnx.Param(jnp.zeros((self.conv_dim,), pdt), logical_axes=("heads",))
    self.dt_bias = nnx.Param(dt_bias_init(rngs.params(), o.heads).astype(pdt),
                             logical_axes=(None,))
    a = jax.random.uniform(rngs.params(), (o.heads,), F32, 1.0, 16.0)
    self.A_log = nnx.Param(jnp.log(a).astype(pdt), logical_axes=(None,))
    self.D = nnx.Param(jnp.ones((o.heads,), pdt), logical_axes=(None,))
    if o.log_linear:
      self.level_scale = nnx.Param(jnp.ones((o.heads * nl,), pdt), logical_axes=(None,))
    else:
      self.level_scale = None
    self.norm = RMSNorm(self.d_inner, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    self.out_proj = Linear(self.d_inner, d, axes=("heads", "embed"), **kw)

  def _run(self, x_BTD, state, conv_state, mask_BT, impl):
    o = self.opts
    b, t, _ = x_BTD.shape
    xs, n, inv = compact(x_BTD, mask_BT)
    proj = self.in_proj(xs)
    h, p, g, nstate = o.heads, self.head_dim, o.n_groups, o.state_size
    z, xbc, dt, dl = jnp.split(
        proj, [self.d_inner, self.d_inner + self.conv_dim, self.d_inner + self.conv_dim + h],
        axis=-1)
    if conv_state is None:
      conv_state = jnp.zeros((b, o.conv_width - 1, self.conv_dim), F32)
    xbc, new_conv = causal_conv(xbc, self.conv_kernel[...], self.conv_bias[...], conv_state, n)
    xbc = jax.nn.silu(xbc)
    xh, bk, cq = jnp.split(xbc, [self.d_inner, self.d_inner + g * nstate], axis=-1)
    xh = xh.reshape(b, t, h, p)
    dt = jax.nn.softplus(dt.astype(F32) + self.dt_bias[...].astype(F32))     # [B,T,H]
    gdec = -jnp.exp(self.A_log[...].astype(F32)) * dt
    v = xh.astype(F32) * dt[..., None]
    q, k = cq.reshape(b, t, g, nstate), bk.reshape(b, t, g, nstate)
    if o.log_linear:
      lscale = self.level_scale[...].astype(F32).reshape(h, o.num_levels)
      lam = jax.nn.softplus(lscale * dl.astype(F32).reshape(b, t, h, o.num_levels))
    else:
      lam = None
    y, new_state = self._op(q, k, v, gdec, None, lam, scale=1.0, impl=impl, state=state, n=n)
    y = y + self.D[...].astype(F32)[:, None] * xh.astype(F32)
    y = y.reshape(b, t, self.d_inner).astype(x_BTD.dtype)
    y = self.norm(y * jax.nn.silu(z))
    out = uncompact(self.out_proj(y), n, inv)
    return out, new_state, new_conv

  def state_dims(self):
    return self.opts.state_size, self.head_dim


@register_mixer("mamba2")
def _make_mamba2(cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
  return Mamba2(cfg, layer_idx, rngs=rngs, opts=Mamba2Options.from_config(cfg, False))


@register_mixer("log_linear_mamba2")
def _make_ll_mamba2(cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
  return Mamba2(cfg, layer_idx, rngs=rngs, opts=Mamba2Options.from_config(cfg, True))
