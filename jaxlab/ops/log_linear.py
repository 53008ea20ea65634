"""Log-linear attention (Guo et al., arXiv 2506.04761): Mamba-2 and Gated DeltaNet
with a Fenwick tree of states instead of one state.

A query at time t reads the prefix [0, t] split into O(log t) buckets: source s
sits at level ``l(t, s) = bit_length(t XOR s)`` (0 for s = t) and the query
weights each level with its own non-negative scale ``lambda_t^(l)``:

    o_t = scale * sum_{s<=t} lambda_t^(l(t,s)) * (q_t^T P(t,s) k_s) * b_s * v_s

where ``P(t,s)`` is the product of the transitions of tokens s+1..t:
``exp(g_r)`` for Mamba-2 (b_s = 1) and ``exp(g_r)(I - beta_r k_r k_r^T)`` for
Gated DeltaNet (b_s = beta_s). With every lambda equal the levels sum back to
the base model (``linear_attention`` / ``gated_delta_rule`` below).

Shapes (as fla's ``naive_log_linear_attn``): q, k [B,T,G,K] (G query/key groups
shared by H/G value heads; head h uses group h // (H/G)), v [B,T,H,V],
g [B,T,H] log decay (<= 0), beta [B,T,H], level_scales [B,T,H,L] with
L >= ceil(log2 T) + 1; output [B,T,H,V] in v's dtype. All arithmetic is fp32.

Three forms, one entry point per op, ``impl=``:

* ``"naive"``: the materialized T x T fp32 reference (O(T^2) memory; the GDN
  attention matrix comes from the UT transform, O(T^3)).
* ``"chunked"``: O(T log T) training form, chunk size 64. Levels 0..6 are a
  dense C x C block per chunk; levels 7..L-1 are chunk levels. For log-linear
  Mamba-2 without an incoming state each chunk level is two batched segment
  sums (no sequential loop); otherwise (GDN, or a state) one scan over chunks
  keeps one state per chunk level and merges them by binary carry, exactly as
  the token recurrence does at chunk granularity. Any T: padding slots (tail,
  and the head when a state's count is not a multiple of 64) are masked.
  GDN's in-chunk attention and transitions use the UT transform
  A = (QK^T . Gamma) (I + diag(beta) strict(KK^T . Gamma))^-1 diag(beta).
* ``"recurrent"``: token by token, O(L K V) state per head.

State (``LogLinearState``): ``levels`` [B,H,L,K,V] fp32, where level l holds the
sources at Fenwick level l of the last consumed token, and ``count`` [B] int32,
the number of consumed tokens (the next token's absolute position). A state
holds at most 2^(L-1) tokens. Unoccupied levels are never read, so their
contents do not matter. Prefill is any impl with ``return_state=True``; decode
is ``log_linear_attention_step`` / ``log_linear_gated_delta_step``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CHUNK = 64
IMPLS = ("naive", "chunked", "recurrent")
_HI = lax.Precision.HIGHEST


def _ein(spec, *xs):
  return jnp.einsum(spec, *xs, precision=_HI)


class LogLinearState(NamedTuple):
  """Decode state. levels [B,H,L,K,V] fp32 (L = 1 for the base models); count [B] int32."""
  levels: jax.Array
  count: jax.Array


def init_state(batch: int, num_heads: int, num_levels: int, key_dim: int,
               value_dim: int) -> LogLinearState:
  """An empty state (no tokens consumed). num_levels = 1 gives a base-model state."""
  return LogLinearState(
      jnp.zeros((batch, num_heads, num_levels, key_dim, value_dim), jnp.float32),
      jnp.zeros((batch,), jnp.int32))


# ----------------------------------------------------------------------------- bits


def _bit_length(x):
  """bit_length of non-negative int32 values."""
  return 32 - lax.clz(x.astype(jnp.int32))


def _occupied(count, num_levels):
  """[B, L] bool: levels holding sources in a state whose last token is count-1.

  Level 0 holds token count-1 itself; level l >= 1 is non-empty iff bit l-1 of
  count-1 is set.
  """
  last = count[:, None] - 1
  ell = jnp.arange(num_levels)[None, :]
  bit = (jnp.right_shift(jnp.maximum(last, 0), jnp.maximum(ell - 1, 0)) & 1) == 1
  return (count[:, None] >= 1) & ((ell == 0) | bit)


def _clean(state: LogLinearState) -> jax.Array:
  """State levels with unoccupied levels zeroed by select (NaN there never leaks)."""
  occ = _occupied(state.count, state.levels.shape[2])
  return jnp.where(occ[:, None, :, None, None], state.levels, 0.0)


def _tri_inv(n):
  """(I + N)^-1 for strictly lower-triangular N [..., C, C] (the UT transform)."""
  c = n.shape[-1]
  eye = jnp.broadcast_to(jnp.eye(c, dtype=n.dtype), n.shape)
  return lax.linalg.triangular_solve(eye + n, eye, left_side=True, lower=True,
                                     unit_diagonal=True)


# ------------------------------------------------------------------------ validation


def _check_inputs(q, k, v, g, beta, lam, scale, impl, initial_state, *, levels: bool):
  if impl not in IMPLS:
    raise ValueError(f"impl: unknown implementation {impl!r} (known: {', '.join(IMPLS)})")
  named = [("q", q, 4), ("k", k, 4), ("v", v, 4), ("g", g, 3)]
  if beta is not None:
    named.append(("beta", beta, 3))
  if levels:
    named.append(("level_scales", lam, 4))
  for name, x, nd in named:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
    if x.ndim != nd:
      raise ValueError(f"{name}: expected {nd} dims, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
  b, t, grp, kd = q.shape
  if t < 1:
    raise ValueError(f"q: sequence length T must be >= 1, got shape {tuple(q.shape)}")
  if k.shape != q.shape:
    raise ValueError(f"k: shape {tuple(k.shape)} must equal q's {tuple(q.shape)} [B,T,G,K]")
  if v.shape[:2] != (b, t):
    raise ValueError(f"v: shape {tuple(v.shape)} must start with q's (B, T) = {(b, t)}")
  h = v.shape[2]
  if h % grp:
    raise ValueError(f"v: H={h} value heads are not divisible by G={grp} query/key groups "
                     f"(q, k axis 2)")
  for name, x in [("g", g)] + ([("beta", beta)] if beta is not None else []):
    if x.shape != (b, t, h):
      raise ValueError(f"{name}: shape {tuple(x.shape)} must be [B,T,H] = {(b, t, h)}")
  if levels:
    if lam.shape[:3] != (b, t, h):
      raise ValueError(f"level_scales: shape {tuple(lam.shape)} must be [B,T,H,L] with "
                       f"[B,T,H] = {(b, t, h)}")
    need = (t - 1).bit_length() + 1
    if lam.shape[3] < need:
      raise ValueError(f"level_scales: L={lam.shape[3]} levels are too few for T={t}; "
                       f"need L >= ceil(log2 T) + 1 = {need}")
  if not isinstance(scale, (int, float)) or isinstance(scale, bool):
    raise TypeError(f"scale: expected a Python number, got {scale!r}")
  if initial_state is not None:
    if not isinstance(initial_state, LogLinearState):
      raise TypeError(f"initial_state: expected a LogLinearState, got "
                      f"{type(initial_state).__name__}")
    nl = lam.shape[3] if levels else 1
    want = (b, h, nl, kd, v.shape[3])
    if tuple(initial_state.levels.shape) != want:
      raise ValueError(f"initial_state: levels shape {tuple(initial_state.levels.shape)} "
                       f"must be [B,H,L,K,V] = {want}")
    if tuple(initial_state.count.shape) != (b,):
      raise ValueError(f"initial_state: count shape {tuple(initial_state.count.shape)} "
                       f"must be [B] = {(b,)}")
    most = _concrete_max(initial_state.count)
    if levels and most is not None:
      most += t
      if most > 2 ** (nl - 1):
        raise ValueError(f"initial_state: count + T = {most} tokens exceed the capacity "
                         f"2^(L-1) = {2 ** (nl - 1)} of L={nl} levels (level_scales)")


def _concrete_max(x):
  """max of a concrete int array, or None under tracing (then capacity is unchecked)."""
  try:
    return int(jnp.max(x))
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
    return None


def _prepare(q, k, v, g, beta, lam, scale):
  """fp32, per-value-head, head-major [B,H,T,...]; q carries the score scale."""
  f32 = jnp.float32
  rep = v.shape[2] // q.shape[2]
  q = jnp.repeat(q.astype(f32), rep, axis=2) * jnp.float32(scale)
  k = jnp.repeat(k.astype(f32), rep, axis=2)
  tr = lambda x: None if x is None else jnp.moveaxis(x.astype(f32), 1, 2)
  return tr(q), tr(k), tr(v), tr(g), tr(beta), tr(lam)


# ---------------------------------------------------------------------------- naive


def _naive(q, k, v, g, beta, lam, state, n, return_state):
  """Materialized T x T reference. Inputs head-major fp32; n [B] live tokens."""
  bsz, nh, t, kd = q.shape
  delta = beta is not None
  t0 = state.count if state is not None else jnp.zeros((bsz,), jnp.int32)
  idx = jnp.arange(t)
  live = (idx[None, :] < n[:, None])[:, None, :]                      # [B,1,T]
  q, k, v = (jnp.where(live[..., None], x, 0.0) for x in (q, k, v))
  g = jnp.where(live, g, 0.0)
  pos = t0[:, None] + idx[None, :]                                     # absolute positions
  cum = jnp.cumsum(g, axis=-1)
  gam = jnp.exp(cum)
  causal = idx[:, None] >= idx[None, :]
  decay = jnp.exp(jnp.where(causal, cum[..., :, None] - cum[..., None, :], -jnp.inf))
  scores = _ein("bhtk,bhsk->bhts", q, k) * decay
  if delta:
    beta = jnp.where(live, beta, 0.0)
    strict = idx[:, None] > idx[None, :]
    kk = jnp.where(strict, _ein("bhtk,bhsk->bhts", k, k) * decay, 0.0)
    tinv = _tri_inv(beta[..., :, None] * kk)
    attn = _ein("bhts,bhsr->bhtr", scores, tinv) * beta[..., None, :]
    q_start = gam[..., None] * q - _ein("bhts,bhsk->bhtk", attn, gam[..., None] * k)
  else:
    attn = scores
    q_start = gam[..., None] * q                  # P(t, t0-1)^T q_t, reads the old state
  if lam is not None:
    nl = lam.shape[-1]
    lvl = _bit_length(pos[:, :, None] ^ pos[:, None, :])              # [B,T,T]
    lvl = jnp.broadcast_to(jnp.minimum(lvl, nl - 1)[:, None], (bsz, nh, t, t))
    attn_l = attn * jnp.take_along_axis(lam, lvl, axis=-1)
  else:
    attn_l = attn
  o = _ein("bhts,bhsv->bhtv", attn_l, v)
  old = None
  if state is not None:
    old = _clean(state) if lam is not None else state.levels
    if lam is not None:
      # Old bucket l (relative to token t0-1) sits at level max(l, h_t) for query t.
      h = _bit_length(pos ^ (t0[:, None] - 1))                         # [B,T]
      lev = jnp.maximum(jnp.arange(nl)[None, None, :], h[:, :, None])
      lev = jnp.broadcast_to(jnp.minimum(lev, nl - 1)[:, None], (bsz, nh, t, nl))
      o = o + _ein("bhtk,bhlkv,bhtl->bhtv", q_start, old, jnp.take_along_axis(lam, lev, -1))
    else:
      o = o + _ein("bhtk,bhkv->bhtv", q_start, old[:, :, 0])
  o = jnp.where(live[..., None], o, 0.0)
  if not return_state:
    return o, None

  # State at the last live token e: source s contributes kap_s v_s^T, kap_s = b_s P(e,s) k_s.
  e_loc = jnp.maximum(n - 1, 0)
  cum_e = jnp.take_along_axis(cum, e_loc[:, None, None], axis=-1)      # [B,H,1]
  upto = idx[None, None, :] <= e_loc[:, None, None]
  w = jnp.exp(jnp.where(upto, cum_e - cum, -jnp.inf))                 # [B,H,T]
  gam_e = jnp.exp(cum_e[..., 0])
  if delta:
    kap = beta[..., None] * _ein("bhsr,bhsk->bhrk", tinv, w[..., None] * k)
    p_e = (gam_e[..., None, None] * jnp.eye(kd)
           - _ein("bhsk,bhsj->bhkj", kap, gam[..., None] * k))
    carry_old = lambda s: _ein("bhkj,bhljv->bhlkv", p_e, s)
  else:
    kap = w[..., None] * k
    carry_old = lambda s: gam_e[:, :, None, None, None] * s
  if lam is not None:
    e = t0 + n - 1
    ell = jnp.arange(nl)
    lvl_e = _bit_length(e[:, None] ^ pos)                              # [B,T]
    onehot = (lvl_e[..., None] == ell) & (idx[None, :, None] <= e_loc[:, None, None])
    new = _ein("bsl,bhsk,bhsv->bhlkv", onehot.astype(jnp.float32), kap, v)
    if old is not None:
      h_e = _bit_length(e ^ (t0 - 1))
      lev = jnp.maximum(ell[None, :], h_e[:, None])                     # [B,L]
      move = (lev[:, :, None] == ell[None, None, :]).astype(jnp.float32)
      new = new + _ein("bmn,bhmkv->bhnkv", move, carry_old(old))
  else:
    new = _ein("bhsk,bhsv->bhkv", kap, v)[:, :, None]
    if old is not None:
      new = new + carry_old(old)
  return o, _finish_state(new, t0, n, old)


def _finish_state(new, t0, n, old):
  """Count update, zero unoccupied levels; rows with no live token keep the old state."""
  count = t0 + n
  nl = new.shape[2]
  occ = _occupied(count, nl) if nl > 1 else (count >= 1)[:, None]
  new = jnp.where(occ[:, None, :, None, None], new, 0.0)
  if old is not None:
    new = jnp.where((n > 0)[:, None, None, None, None], new, old)
  return LogLinearState(new, count.astype(jnp.int32))


# ------------------------------------------------------------------------ recurrent


def _step_core(levels, count, q, k, v, g, beta, lam):
  """One token for every row. levels [B,H,L,K,V]; q,k [B,H,K]; v [B,H,V]; g, beta [B,H];
  lam [B,H,L] or None (base model, L = 1). Returns (o [B,H,V], levels, count)."""
  t = count
  if lam is not None:
    nl = levels.shape[2]
    ell = jnp.arange(nl)[None, :]
    # Binary carry: before token t >= 1, levels 0..z (z = ctz(t)) merge into level z+1,
    # which is always empty. Selects (not products) so unused levels are never read.
    z = _bit_length(t & -t) - 1
    src = (t[:, None] >= 1) & (ell <= z[:, None])
    dst = (t[:, None] >= 1) & (ell == z[:, None] + 1)
    bc = lambda m: m[:, None, :, None, None]
    total = jnp.sum(jnp.where(bc(src), levels, 0.0), axis=2, keepdims=True)
    levels = jnp.where(bc(dst), total, jnp.where(bc(src), 0.0, levels))
  a = jnp.exp(g)[:, :, None, None, None]
  if beta is not None:
    ks = _ein("bhk,bhlkv->bhlv", k, levels)
    levels = a * (levels - beta[:, :, None, None, None] * _ein("bhk,bhlv->bhlkv", k, ks))
    kv = beta[:, :, None, None] * _ein("bhk,bhv->bhkv", k, v)
  else:
    levels = a * levels
    kv = _ein("bhk,bhv->bhkv", k, v)
  if lam is not None:
    levels = levels.at[:, :, 0].set(kv)
    occ = _occupied(t + 1, levels.shape[2])
    o = _ein("bhk,bhlkv,bhl->bhv", q, jnp.where(occ[:, None, :, None, None], levels, 0.0), lam)
  else:
    levels = levels.at[:, :, 0].add(kv)
    o = _ein("bhk,bhkv->bhv", q, levels[:, :, 0])
  return o, levels, t + 1


def _recurrent(q, k, v, g, beta, lam, state, n, return_state):
  bsz, nh, t, kd = q.shape
  nl = lam.shape[-1] if lam is not None else 1
  if state is None:
    st = init_state(bsz, nh, nl, kd, v.shape[-1])
    old = None
  else:
    st = state
    old = _clean(state) if lam is not None else state.levels
  levels0 = _clean(st) if lam is not None else st.levels
  tm = lambda x: None if x is None else jnp.moveaxis(x, 2, 0)
  live = jnp.arange(t)[:, None] < n[None, :]                          # [T,B]

  def step(carry, xs):
    levels, count = carry
    q_t, k_t, v_t, g_t, b_t, l_t, live_t = xs
    o, lv, ct = _step_core(levels, count, q_t, k_t, v_t, g_t, b_t, l_t)
    levels = jnp.where(live_t[:, None, None, None, None], lv, levels)
    count = jnp.where(live_t, ct, count)
    return (levels, count), jnp.where(live_t[:, None, None], o, 0.0)

  (levels, count), o = lax.scan(step, (levels0, st.count),
                                (tm(q), tm(k), tm(v), tm(g), tm(beta), tm(lam), live))
  o = jnp.moveaxis(o, 0, 2)
  if not return_state:
    return o, None
  t0 = st.count
  return o, _finish_state(levels, t0, count - t0, old)


# -------------------------------------------------------------------------- chunked


def _decay(cum):
  """exp(cum_t - cum_s) for s <= t, else 0 ([..., C] -> [..., C, C])."""
  c = cum.shape[-1]
  il = jnp.arange(c)
  tril = il[:, None] >= il[None, :]
  return jnp.exp(jnp.where(tril, cum[..., :, None] - cum[..., None, :], -jnp.inf))


def _ut_inverse(k, beta, decay):
  """(I + diag(beta) strict(K K^T . decay))^-1 per chunk (GDN's UT transform)."""
  c = k.shape[-2]
  il = jnp.arange(c)
  strict = il[:, None] > il[None, :]
  kk = jnp.where(strict, _ein("...ck,...sk->...cs", k, k) * decay, 0.0)
  return _tri_inv(beta[..., :, None] * kk)


def _chunk_terms(q, k, v, g, beta, lam_lo, lam_hi=None):
  """Everything a chunk contributes on its own, for [B,H,n,C,...] chunks:
  o (in-chunk output, levels 0..log2 C), q_start (query that reads the state at the
  chunk start), write (the chunk's sources as a state at its end), trans (transition
  across the chunk: scalar for Mamba-2, K x K for GDN) and cum (in-chunk cumsum of g)."""
  c, kd = q.shape[-2], q.shape[-1]
  cum = jnp.cumsum(g, axis=-1)
  gam = jnp.exp(cum)
  last = cum[..., -1]
  decay = _decay(cum)
  scores = _ein("...ck,...sk->...cs", q, k) * decay
  to_end = jnp.exp(last[..., None] - cum)
  if beta is not None:
    tinv = _ut_inverse(k, beta, decay)
    attn = _ein("...cs,...sr->...cr", scores, tinv) * beta[..., None, :]
    gk = gam[..., None] * k
    q_start = gam[..., None] * q - _ein("...cs,...sk->...ck", attn, gk)
    k_end = beta[..., None] * _ein("...sr,...sk->...rk", tinv, to_end[..., None] * k)
    trans = jnp.exp(last)[..., None, None] * jnp.eye(kd) - _ein("...sk,...sj->...kj", k_end, gk)
  else:
    attn = scores
    q_start = gam[..., None] * q
    k_end = to_end[..., None] * k
    trans = jnp.exp(last)
  if lam_lo is not None:
    il = jnp.arange(c)
    lvl_tab = _bit_length(il[:, None] ^ il[None, :])                  # [C,C] in 0..log2 C
    idx = jnp.broadcast_to(lvl_tab, lam_lo.shape[:-2] + (c, c))
    attn = attn * jnp.take_along_axis(lam_lo, idx, -1)
  o = _ein("...cs,...sv->...cv", attn, v)
  write = _ein("...sk,...sv->...kv", k_end, v)
  if lam_hi is not None and lam_hi.shape[-1]:
    o, _ = _levels_parallel(o, q_start, lam_hi, last, write, None, lam_hi.shape[-1], False)
  return o, q_start, write, trans, cum


_BLOCK = 16   # chunks per block: keeps the C x C intermediates cache-sized on CPU


def _to_blocks(x, nb):
  """[B,H,nC,...] -> [nb, B,H,_BLOCK,...] (zero chunks pad the last block)."""
  if x is None:
    return None
  x = jnp.pad(x, [(0, 0), (0, 0), (0, nb * _BLOCK - x.shape[2])] + [(0, 0)] * (x.ndim - 3))
  return jnp.moveaxis(x.reshape(x.shape[:2] + (nb, _BLOCK) + x.shape[3:]), 2, 0)


def _from_blocks(x, nc):
  """Inverse of _to_blocks: [nb, B,H,_BLOCK,...] -> [B,H,nC,...]."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(x.shape[:2] + (x.shape[2] * _BLOCK,) + x.shape[4:])[:, :, :nc]


def _blocked_chunk_terms(q, k, v, g, beta, lam_lo):
  """_chunk_terms over blocks of _BLOCK chunks (lax.map), so that the O(T C)
  intermediates never exist for the whole sequence at once."""
  nc = q.shape[2]
  if nc <= 64:
    return _chunk_terms(q, k, v, g, beta, lam_lo)
  nb = -(-nc // _BLOCK)
  outs = lax.map(lambda a: _chunk_terms(*a), tuple(_to_blocks(x, nb)
                                                   for x in (q, k, v, g, beta, lam_lo)))
  return tuple(_from_blocks(x, nc) for x in outs)


def _carry_levels(ys, nxt, write):
  """Binary carry at a chunk (or block) boundary: the levels below the lowest set bit z
  of `nxt` (the next chunk index) and `write` merge into level z; the others keep their
  state. ys [J,B,H,K,V]; nxt int scalar or [B]; write [B,H,K,V]."""
  jj = jnp.arange(ys.shape[0]).reshape((-1,) + (1,) * jnp.ndim(nxt))
  low = jnp.asarray(nxt)[None] & ((2 << jj) - 1)                      # [J] or [J,B]
  expand = lambda m: m.reshape(m.shape + (1,) * (ys.ndim - m.ndim))
  below, at = expand(low == 0), expand(low == (1 << jj))
  total = jnp.sum(jnp.where(below, ys, 0.0), axis=0) + write
  return jnp.where(at, total[None], jnp.where(below, 0.0, ys))


_STREAM_BLOCK = 8   # chunks per block of _streamed (8 and 16 tie forward; 8 is faster fwd+bwd)


@jax.custom_vjp
def _level_read(q_nck, lam_ncj, ys_jkv):
  """sum_j lam[..., j] * (q @ ys[j]): [B,H,n,C,K], [B,H,n,C,J], [J,B,H,K,V] -> [B,H,n,C,V].

  One matmul over (j, k) forward; the backward goes level by level, which on CPU was
  ~25% faster at 16K tokens than differentiating the fused contraction (its [.., J, K]
  operand is 4x the size of q)."""
  return _ein("bhncjk,jbhkv->bhncv", q_nck[..., None, :] * lam_ncj[..., None], ys_jkv)


def _level_read_fwd(q, lam, ys):
  return _level_read(q, lam, ys), (q, lam, ys)


def _level_read_bwd(res, do):
  q, lam, ys = res
  dq = jnp.zeros_like(q)
  dlam, dys = [], []
  for j in range(ys.shape[0]):
    p = _ein("bhncv,bhkv->bhnck", do, ys[j])                          # d(q_j) before lambda
    dq = dq + lam[..., j, None] * p
    dlam.append(jnp.sum(q * p, axis=-1))
    dys.append(_ein("bhnck,bhncv->bhkv", q * lam[..., j, None], do))
  return dq, jnp.stack(dlam, axis=-1), jnp.stack(dys)


_level_read.defvjp(_level_read_fwd, _level_read_bwd)


def _streamed(q, k, v, g, lam, n, scale, chunk, pad_value):
  """Log-linear Mamba-2 training form (no incoming or returned state) as one scan over
  blocks of _STREAM_BLOCK chunks, straight from the [B,T,...] inputs to the [B,T,H,V]
  output.

  Each block is cast, masked, laid out head-major and processed while it is in cache,
  so the sequence crosses memory once in and once out: the whole-sequence layout
  passes of the general path cost ~10x more beyond the CPU's L3 (about 4K tokens here)
  than within it, which broke the O(T log T) scaling of the forward.

  Chunk levels < log2(_STREAM_BLOCK) only ever hold writes from the same block:
  _chunk_terms does them block-locally. Higher levels are whole blocks, i.e. the
  binary-carry recurrence of the token form one granularity up: the scan carries one
  state per outer level at the block start; a chunk reads it decayed to its start,
  scaled by its tokens' lambdas; at the block end the block's writes and the levels
  below the lowest set bit of (block + 1) merge into that level. The step is
  rematerialized in the backward (only the level states cross blocks).
  """
  f32 = jnp.float32
  bsz, t, _, kd = q.shape
  nh, vd = v.shape[2], v.shape[3]
  span = chunk * _STREAM_BLOCK
  nb = -(-t // span)
  nj = max(0, (-(-t // chunk) - 1).bit_length())                       # chunk levels
  nlc = chunk.bit_length()                                             # in-chunk levels
  jl = min(nj, _STREAM_BLOCK.bit_length() - 1)
  jo = nj - jl

  def blocks(x):
    """[B,T,...] -> [nb, B, span, ...] (free for B = 1 when T is a multiple of span)."""
    x = jnp.pad(x, [(0, 0), (0, nb * span - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((bsz, nb, span) + x.shape[2:]), 1, 0)

  def step(ys, xs):
    b, qb, kb, vb, gb, lb = xs
    live = (b * span + jnp.arange(span))[None, :] < n[:, None]         # [B, span]

    def chunks(x):
      """[B,H,span,...] -> [B,H,blk,C,...]; dead slots hold pad_value, then 0."""
      m = live[:, None].reshape((bsz, 1, span) + (1,) * (x.ndim - 3))
      x = jnp.where(m, jnp.where(m, x, jnp.asarray(pad_value, f32)), 0.0)
      return x.reshape((bsz, nh, _STREAM_BLOCK, chunk) + x.shape[3:])

    qh, kh, vh, gh, _, lh = (None if x is None else chunks(x)
                             for x in _prepare(qb, kb, vb, gb, None, lb, scale))
    lo = lh[..., :nlc]
    if lo.shape[-1] < nlc:
      lo = jnp.pad(lo, [(0, 0)] * 4 + [(0, nlc - lo.shape[-1])])
    hi_in, hi_out = lh[..., nlc:nlc + jl], lh[..., nlc + jl:nlc + nj]
    o, q_start, write, _, cum = _chunk_terms(qh, kh, vh, gh, None, lo, hi_in if jl else None)
    if jo:
      last = cum[..., -1]                                             # [B,H,n]
      gx = jnp.cumsum(last, axis=-1) - last                            # block start -> chunk
      qsd = q_start * jnp.exp(gx)[..., None, None]
      o = o + _level_read(qsd, hi_out, ys)
      tot = gx[..., -1] + last[..., -1]                                # [B,H]
      wb = _ein("bhn,bhnkv->bhkv", jnp.exp(tot[..., None] - gx - last), write)
      ys = _carry_levels(jnp.exp(tot)[None, ..., None, None] * ys, b + 1, wb)
    o = jnp.moveaxis(o.reshape(bsz, nh, span, vd), 1, 2)               # [B,span,H,V]
    return ys, jnp.where(live[..., None, None], o, 0.0).astype(v.dtype)

  ys0 = jnp.zeros((jo, bsz, nh, kd, vd), f32)
  _, o = lax.scan(jax.checkpoint(step), ys0,
                  (jnp.arange(nb),) + tuple(blocks(x) for x in (q, k, v, g, lam)))
  return jnp.moveaxis(o, 0, 1).reshape(bsz, nb * span, nh, vd)[:, :t]


def _levels_parallel(o, q_start, lam_hi, last, write, ce, nj, return_state):
  """Chunk levels of log-linear Mamba-2 without an incoming state, with no sequential scan.

  Chunk level j: in each aligned group of 2^(j+1) chunks the first half writes and
  the second half reads. With scalar decays the state a reader sees is the
  group's first-half writes decayed to the group middle (one segment sum) and
  then to the reader's start, so every level is two batched contractions, and
  only the chunks that actually read (half of them) pay for the read.
  Used inside a block by _chunk_terms (block-local levels) and for the whole sequence
  when the state is returned. Returns (o, snap) with snap [J,B,H,K,V] the chunk-level
  states at chunk ce (only when return_state).
  """
  bsz, nh, nc, c, _ = q_start.shape
  gx = jnp.cumsum(last, axis=-1) - last                               # log decay at chunk starts
  gend = gx + last

  def grouped(x, span, mode):
    """Pad the chunk axis (2) to a multiple of span and split it as [groups, 2, span/2]."""
    ng = -(-nc // span)
    x = jnp.pad(x, [(0, 0), (0, 0), (0, ng * span - nc)] + [(0, 0)] * (x.ndim - 3), mode=mode)
    return x.reshape(x.shape[:2] + (ng, 2, span // 2) + x.shape[3:])

  snaps = []
  for j in range(nj):
    span = 2 << j
    gxg, gendg = grouped(gx, span, "edge"), grouped(gend, span, "edge")   # [B,H,G,2,half]
    gmid = gxg[:, :, :, 1, 0]                                          # first reader's start
    wdec = jnp.exp(gmid[..., None] - gendg[:, :, :, 0])                # writer end -> middle
    x = _ein("bhgi,bhgikv->bhgkv", wdec, grouped(write, span, "constant")[:, :, :, 0])
    rdec = jnp.exp(gxg[:, :, :, 1] - gmid[..., None])                  # middle -> reader start
    scale_r = rdec[..., None] * grouped(lam_hi[..., j], span, "constant")[:, :, :, 1]
    qs = grouped(q_start, span, "constant")[:, :, :, 1] * scale_r[..., None]
    o_r = _ein("bhgick,bhgkv->bhgicv", qs, x)                          # readers only
    o_j = jnp.stack([jnp.zeros_like(o_r), o_r], axis=3)
    o = o + o_j.reshape(o_j.shape[:2] + (-1,) + o_j.shape[5:])[:, :, :nc]
    if return_state:
      gce = ce >> (j + 1)
      sel = lambda a: jnp.take_along_axis(
          a, gce.reshape((bsz, 1, 1) + (1,) * (a.ndim - 3)), axis=2)[:, :, 0]
      dec = jnp.exp(jnp.take_along_axis(gx, ce[:, None, None], -1)[..., 0] - sel(gmid))
      on = ((ce >> j) & 1 == 1)[:, None, None, None]
      snaps.append(jnp.where(on, dec[..., None, None] * sel(x), 0.0))
  snap = jnp.stack(snaps) if return_state else None
  return o, snap


def _chunked(q, k, v, g, beta, lam, state, n, return_state, chunk, pad_value=0.0,
             parallel=True):
  """O(T log T) chunked form. See the module docstring; papers.md section 1.1.

  `parallel` selects _levels_parallel for log-linear Mamba-2 without an incoming
  state; otherwise (and always for GDN, whose transitions are matrices) one
  sequential scan over chunks carries the chunk-level states and merges them by
  binary carry, like the token recurrence.
  """
  bsz, nh, t, kd = q.shape
  vd = v.shape[-1]
  delta = beta is not None
  levels = lam is not None
  c = chunk
  nlc = c.bit_length()                     # intra-chunk levels 0..log2(C)
  shifted = state is not None
  t0 = state.count if shifted else jnp.zeros((bsz,), jnp.int32)
  # With a state the buffer is shifted right by t0 mod C so chunks align with
  # absolute positions (the Fenwick levels are defined on absolute positions).
  r = t0 % c if shifted else jnp.zeros((bsz,), jnp.int32)
  tb = -(-(t + (c - 1 if shifted else 0)) // c) * c
  nc = tb // c
  ib = jnp.arange(tb)
  src = ib[None, :] - r[:, None]                                      # [B,Tb] token index
  live = (src >= 0) & (src < n[:, None])

  def to_buffer(x):
    """[B,H,T,...] -> [B,H,nC,C,...]; slots without a live token hold pad_value, then 0."""
    extra = x.ndim - 3
    if shifted:
      ix = jnp.clip(src, 0, t - 1).reshape((bsz, 1, tb) + (1,) * extra)
      xb = jnp.take_along_axis(x, ix, axis=2)
    else:
      xb = jnp.pad(x, [(0, 0), (0, 0), (0, tb - t)] + [(0, 0)] * extra)
    m = live.reshape((bsz, 1, tb) + (1,) * extra)
    xb = jnp.where(m, xb, jnp.asarray(pad_value, jnp.float32))   # whatever sits in padding...
    xb = jnp.where(m, xb, 0.0)                          # ...is never read
    return xb.reshape((bsz, nh, nc, c) + x.shape[3:])

  q, k, v, g = (to_buffer(x) for x in (q, k, v, g))
  beta = to_buffer(beta) if delta else None
  lam = to_buffer(lam) if levels else None

  il = jnp.arange(c)
  if levels:
    nl = lam.shape[-1]
    lam_lo = lam[..., :nlc]
    if nl < nlc:
      lam_lo = jnp.pad(lam_lo, [(0, 0)] * 4 + [(0, nlc - nl)])
    nj = max(nl - nlc, 0) if shifted else max(0, (nc - 1).bit_length())
    lam_hi = lam[..., nlc:nlc + nj]                                   # chunk levels
  else:
    lam_lo = None
    nl, nj = 1, 1
  # Log-linear Mamba-2 without an incoming state: chunk levels by _levels_parallel
  # (no sequential scan; here only when the state is returned, else _run streams).
  par = levels and not delta and not shifted and nj > 0 and parallel
  o, q_start, write, trans, cum = _blocked_chunk_terms(q, k, v, g, beta, lam_lo)
  last = cum[..., -1]
  if delta:
    apply = lambda m, s: _ein("bhkj,...bhjv->...bhkv", m, s)
  else:
    apply = lambda m, s: m[..., None, None] * s

  # ---- the incoming state
  old = None
  cbase = (t0 - r) // c                                               # abs chunk of buffer chunk 0
  if levels:
    ell = jnp.arange(nl)
    ys0 = jnp.zeros((nj, bsz, nh, kd, vd), jnp.float32)
    if shifted:
      old = _clean(state)
      # Old bucket l (relative to token t0-1) is at level max(l, h0) seen from
      # buffer chunk 0: chunk level m-nlc if m >= nlc, else still inside chunk 0.
      h0 = _bit_length((t0 - r) ^ (t0 - 1))
      m = jnp.maximum(ell[None, :], h0[:, None])                      # [B,L]
      to_y = (m[:, :, None] - nlc == jnp.arange(nj)[None, None, :]).astype(jnp.float32)
      in_c0 = (m < nlc)
      ys0 = _ein("blj,bhlkv->jbhkv", to_y, old)
      w0 = _ein("bl,bhlkv->bhkv", in_c0.astype(jnp.float32), old)
      write = write.at[:, :, 0].add(apply(trans[:, :, 0], w0))
      # Queries of chunk 0 read those in-chunk old buckets at level max(l, h_t).
      ht = _bit_length((t0 - r)[:, None] + il[None, :] ^ (t0 - 1)[:, None])   # [B,C]
      lev = jnp.minimum(jnp.maximum(ell[None, None, :], ht[:, :, None]), nl - 1)
      lam_o = jnp.take_along_axis(lam[:, :, 0], jnp.broadcast_to(lev[:, None], (bsz, nh, c, nl)),
                                  -1) * in_c0[:, None, None, :]
      o = o.at[:, :, 0].add(_ein("bhcl,bhck,bhlkv->bhcv", lam_o, q_start[:, :, 0], old))
    carry0 = ys0
  else:
    if shifted:
      old = state.levels
      carry0 = old[:, :, 0][None]
    else:
      carry0 = jnp.zeros((1, bsz, nh, kd, vd), jnp.float32)

  e_buf = r + n - 1
  ce = jnp.maximum(e_buf, 0) // c

  def step(carry, xs):
    ys, snap = carry
    ci, qs_c, lam_c, tr_c, wr_c = xs
    if return_state:
      snap = jnp.where((ci == ce)[None, :, None, None, None], ys, snap)
    if levels:
      o_c = _ein("bhck,jbhkv,bhcj->bhcv", qs_c, ys, lam_c)
      ys = apply(tr_c, ys)
      ys = _carry_levels(ys, cbase + ci + 1, wr_c)                      # into chunk ci+1
    else:
      o_c = _ein("bhck,jbhkv->bhcv", qs_c, ys)
      ys = apply(tr_c, ys) + wr_c[None]
    return (ys, snap), o_c

  if par:
    o, snap = _levels_parallel(o, q_start, lam_hi, last, write, ce, nj, return_state)
  elif nj > 0:
    front = lambda x: jnp.moveaxis(x, 2, 0)
    xs = (jnp.arange(nc), front(q_start), front(lam_hi) if levels else jnp.zeros((nc,)),
          front(trans), front(write))
    (_, snap), o_hi = lax.scan(step, (carry0, carry0 if return_state else None), xs)
    o = o + jnp.moveaxis(o_hi, 0, 2)
  else:
    snap = carry0

  o = o.reshape(bsz, nh, tb, vd)
  if shifted:
    o = jnp.take_along_axis(o, (jnp.arange(t)[None, :] + r[:, None])[:, None, :, None], axis=2)
  else:
    o = o[:, :, :t]
  o = jnp.where((jnp.arange(t)[None, :] < n[:, None])[:, None, :, None], o, 0.0)
  if not return_state:
    return o, None

  # ---- state at the last live token e (buffer index e_buf, chunk ce, offset le)
  le = jnp.maximum(e_buf, 0) % c
  pick = lambda x: jnp.take_along_axis(
      x, ce.reshape((bsz, 1, 1) + (1,) * (x.ndim - 3)), axis=2)[:, :, 0]
  cum_c, k_c, v_c = pick(cum), pick(k), pick(v)
  cum_e = jnp.take_along_axis(cum_c, le[:, None, None], axis=-1)       # [B,H,1]
  upto = il[None, None, :] <= le[:, None, None]
  w = jnp.exp(jnp.where(upto, cum_e - cum_c, -jnp.inf))
  gam_e = jnp.exp(cum_e[..., 0])
  if delta:
    tinv_c = _ut_inverse(k_c, pick(beta), _decay(cum_c))
    kap = pick(beta)[..., None] * _ein("bhsr,bhsk->bhrk", tinv_c, w[..., None] * k_c)
    p_e = (gam_e[..., None, None] * jnp.eye(kd)
           - _ein("bhsk,bhsj->bhkj", kap, jnp.exp(cum_c)[..., None] * k_c))
  else:
    kap = w[..., None] * k_c
    p_e = gam_e
  if levels:
    lvl_e = _bit_length(le[:, None] ^ il[None, :])                    # [B,C]
    onehot = ((lvl_e[..., None] == ell) & upto[:, 0, :, None]).astype(jnp.float32)
    new = _ein("bsl,bhsk,bhsv->bhlkv", onehot, kap, v_c)
    if nj > 0:
      hi = apply(p_e, snap)                                           # [J,B,H,K,V]
      new = new.at[:, :, nlc:nlc + nj].add(jnp.moveaxis(hi, 0, 2))
    if shifted:
      e = t0 + n - 1
      h_e = _bit_length(e ^ (t0 - 1))
      lev = jnp.maximum(ell[None, :], h_e[:, None])
      move = ((lev[:, :, None] == ell[None, None, :]) & in_c0[:, :, None]
              & (ce == 0)[:, None, None]).astype(jnp.float32)
      carried = apply(p_e, jnp.moveaxis(old, 2, 0))                   # [L,B,H,K,V]
      new = new + _ein("bmn,mbhkv->bhnkv", move, carried)
  else:
    new = (_ein("bhsk,bhsv->bhkv", kap, v_c) + apply(p_e, snap)[0])[:, :, None]
  return o, _finish_state(new, t0, n, old)


# ----------------------------------------------------------------------- dispatch


def _run(q, k, v, g, beta, lam, *, scale, impl, initial_state, return_state,
         lengths=None, chunk_size=CHUNK, pad_value=0.0, parallel=True):
  """Shared entry: validate, prepare, dispatch. `lengths` [B] (internal, used by the
  mixers for padding): only the first lengths[b] tokens of row b are live; the rest
  give zero output and do not enter the returned state."""
  _check_inputs(q, k, v, g, beta, lam, scale, impl, initial_state, levels=lam is not None)
  bsz, t = q.shape[:2]
  out_dtype = v.dtype
  n = (jnp.full((bsz,), t, jnp.int32) if lengths is None
       else jnp.clip(jnp.asarray(lengths, jnp.int32), 0, t))
  if (impl == "chunked" and lam is not None and beta is None and initial_state is None
      and not return_state and parallel):
    # The training form of log-linear Mamba-2: one streaming pass (see _streamed).
    return _streamed(q, k, v, g, lam, n, scale, chunk_size, pad_value)
  qh, kh, vh, gh, bh, lh = _prepare(q, k, v, g, beta, lam, scale)
  if impl == "naive":
    o, st = _naive(qh, kh, vh, gh, bh, lh, initial_state, n, return_state)
  elif impl == "recurrent":
    o, st = _recurrent(qh, kh, vh, gh, bh, lh, initial_state, n, return_state)
  else:
    o, st = _chunked(qh, kh, vh, gh, bh, lh, initial_state, n, return_state, chunk_size,
                     pad_value, parallel)
  o = jnp.moveaxis(o, 1, 2).astype(out_dtype)
  return (o, st) if return_state else o


def log_linear_attention(q, k, v, g, level_scales, *, scale=1.0, impl="chunked",
                         initial_state=None, return_state=False):
  """Log-linear Mamba-2: o_t = scale * sum_s lambda_t^(l(t,s)) e^{G_t - G_s} (q_t.k_s) v_s.

  q, k [B,T,G,K]; v [B,T,H,V]; g [B,T,H] (log decay <= 0); level_scales
  [B,T,H,L], L >= ceil(log2 T) + 1. Returns o [B,T,H,V] (and the
  LogLinearState after the last token if return_state).
  """
  return _run(q, k, v, g, None, level_scales, scale=scale, impl=impl,
              initial_state=initial_state, return_state=return_state)


def log_linear_gated_delta(q, k, v, g, beta, level_scales, *, scale=1.0, impl="chunked",
                           initial_state=None, return_state=False):
  """Log-linear Gated DeltaNet: every level is transformed by e^{g_t}(I - beta_t k_t k_t^T),
  new sources enter as beta_t k_t v_t^T; query t reads sum_l lambda_t^(l) S_l^T q_t.

  Shapes as log_linear_attention, plus beta [B,T,H].
  """
  return _run(q, k, v, g, beta, level_scales, scale=scale, impl=impl,
              initial_state=initial_state, return_state=return_state)


def linear_attention(q, k, v, g, *, scale=1.0, impl="chunked", initial_state=None,
                     return_state=False):
  """Plain Mamba-2 (SSD, scalar decay per head): the base model of log_linear_attention.
  Its state has one level."""
  return _run(q, k, v, g, None, None, scale=scale, impl=impl,
              initial_state=initial_state, return_state=return_state)


def gated_delta_rule(q, k, v, g, beta, *, scale=1.0, impl="chunked", initial_state=None,
                     return_state=False):
  """Plain Gated DeltaNet: the base model of log_linear_gated_delta (one-level state)."""
  return _run(q, k, v, g, beta, None, scale=scale, impl=impl,
              initial_state=initial_state, return_state=return_state)


# -------------------------------------------------------------------------- decode


def _check_step(state, q_t, k_t, v_t, g_t, beta_t, lam_t, scale):
  if not isinstance(state, LogLinearState):
    raise TypeError(f"state: expected a LogLinearState, got {type(state).__name__}")
  for name, x in [("q_t", q_t), ("k_t", k_t), ("v_t", v_t), ("g_t", g_t)]:
    if not hasattr(x, "shape"):
      raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
  if q_t.ndim != 3 or k_t.shape != q_t.shape:
    raise ValueError(f"q_t, k_t: expected equal shapes [B,G,K], got {tuple(q_t.shape)} and "
                     f"{tuple(k_t.shape)}")
  b, grp, kd = q_t.shape
  if v_t.ndim != 3 or v_t.shape[0] != b:
    raise ValueError(f"v_t: expected [B,H,V] with B={b}, got {tuple(v_t.shape)}")
  h, vd = v_t.shape[1:]
  if h % grp:
    raise ValueError(f"v_t: H={h} value heads are not divisible by G={grp} query/key groups")
  if g_t.shape != (b, h):
    raise ValueError(f"g_t: shape {tuple(g_t.shape)} must be [B,H] = {(b, h)}")
  if beta_t is not None and beta_t.shape != (b, h):
    raise ValueError(f"beta_t: shape {tuple(beta_t.shape)} must be [B,H] = {(b, h)}")
  nl = 1
  if lam_t is not None:
    if lam_t.ndim != 3 or lam_t.shape[:2] != (b, h):
      raise ValueError(f"level_scales_t: expected [B,H,L] with [B,H] = {(b, h)}, got "
                       f"{tuple(lam_t.shape)}")
    nl = lam_t.shape[2]
  want = (b, h, nl, kd, vd)
  if tuple(state.levels.shape) != want or tuple(state.count.shape) != (b,):
    raise ValueError(f"state: levels {tuple(state.levels.shape)} / count "
                     f"{tuple(state.count.shape)} must be {want} / {(b,)}")
  if not isinstance(scale, (int, float)) or isinstance(scale, bool):
    raise TypeError(f"scale: expected a Python number, got {scale!r}")


def _step(state, q_t, k_t, v_t, g_t, beta_t, lam_t, scale):
  _check_step(state, q_t, k_t, v_t, g_t, beta_t, lam_t, scale)
  f32 = jnp.float32
  rep = v_t.shape[1] // q_t.shape[1]
  q = jnp.repeat(q_t.astype(f32), rep, axis=1) * f32(scale)
  k = jnp.repeat(k_t.astype(f32), rep, axis=1)
  cast = lambda x: None if x is None else x.astype(f32)
  o, levels, count = _step_core(state.levels, state.count, q, k, cast(v_t), cast(g_t),
                                cast(beta_t), cast(lam_t))
  return o.astype(v_t.dtype), LogLinearState(levels, count)


def log_linear_attention_step(state, q_t, k_t, v_t, g_t, level_scales_t, *, scale=1.0):
  """Decode one token: (state, q_t [B,G,K], k_t, v_t [B,H,V], g_t [B,H], level_scales_t
  [B,H,L]) -> (o_t [B,H,V], state). The state grows by binary carry."""
  return _step(state, q_t, k_t, v_t, g_t, None, level_scales_t, scale)


def log_linear_gated_delta_step(state, q_t, k_t, v_t, g_t, beta_t, level_scales_t, *,
                                scale=1.0):
  """Decode one token of log-linear Gated DeltaNet (shapes as log_linear_attention_step)."""
  return _step(state, q_t, k_t, v_t, g_t, beta_t, level_scales_t, scale)


def linear_attention_step(state, q_t, k_t, v_t, g_t, *, scale=1.0):
  """Decode one token of plain Mamba-2 (one-level state)."""
  return _step(state, q_t, k_t, v_t, g_t, None, None, scale)


def gated_delta_rule_step(state, q_t, k_t, v_t, g_t, beta_t, *, scale=1.0):
  """Decode one token of plain Gated DeltaNet (one-level state)."""
  return _step(state, q_t, k_t, v_t, g_t, beta_t, None, scale)


def num_levels(max_len: int) -> int:
  """Levels needed for sequences of up to max_len tokens: ceil(log2 max_len) + 1."""
  return (max(int(max_len), 1) - 1).bit_length() + 1
