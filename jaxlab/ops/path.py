"""PaTH attention (Yang et al. 2025, arXiv 2505.16381): softmax attention whose
query-key pairs are mixed by a data-dependent product of Householder-like
transitions H_t = I - beta_t w_t w_t^T, optionally with a forget gate (PaTH-FoX).

  s_ij   = q_i^T H_i H_{i-1} ... H_{j+1} k_j          (j <= i; empty product if j = i)
  logits = scale * (s_ij + G_i - G_j),  G = cumsum(g)   (gate inside the scale, as fla does)
  o_i    = sum_j softmax_j(logits_ij) v_j

Shapes follow fla's `naive_path_attn`: q [B,T,HQ,K]; k, w [B,T,H,K]; v [B,T,H,V];
beta [B,T,H]; g [B,T,HQ] (log forget gate) or None; HQ a multiple of H (query head
hq uses key head hq // (HQ // H)). Output [B,T,HQ,V] in q's dtype.

Forms (`impl=`):
  "naive"     materialized fp32 reference: a scan applies each H_i to all earlier keys,
              then a masked softmax over the full T x T logits.
  "blockwise" FlashAttention-style UT/compact-WY algorithm (see _path_blockwise.py):
              never builds T x T, memory linear in T, any T; differentiable (autodiff
              through lax.scan with per-query-block rematerialization).
  "decode"    token-by-token decoding through `path_decode_step` (a scan), for tests.

Decoding: `path_prefill` returns (o, PathCache); `path_decode_step` first updates every
cached key in place, K <- K - beta (K w) w^T in fp32, then attends; `path_extend` adds a
chunk of T tokens to a cache. The cache has a fixed number of slots, so a jitted
decode step compiles once.

Input checks (errors name the argument): shapes and head counts always. Values are
checked only when the inputs are concrete (not traced under jit): beta must lie in
[0, 2] (0 = identity transition, e.g. padding; 2 = reflection), and every w row with
beta != 0 must have unit L2 norm -- the op rejects rather than renormalizes, because
renormalizing would change dw. Under jit these value checks cannot run; the PaTH
mixers produce valid values by construction (beta = 2 sigmoid, fp32 l2norm).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlab.ops import _path_blockwise as _bw

F32 = jnp.float32
IMPLS = ("naive", "blockwise", "decode")
DEFAULT_BLOCK = 64

__all__ = ["path_attention", "path_prefill", "path_extend", "path_decode_step",
           "path_init_cache", "PathCache", "IMPLS"]


class PathCache(NamedTuple):
  """Fixed-size decode cache (S = max_len slots).

  k:      [B,S,H,K] float32, keys carried to the latest token, k_j^(t) = H_t ... H_{j+1} k_j
          (fp32 because every decode step rewrites them).
  v:      [B,S,H,V] values.
  gate:   [B,S,HQ] float32, G_t - G_j for each cached key (None without a forget gate).
  valid:  [B,S] bool, slot holds a real (unmasked) token.
  length: [] int32, number of slots used; slots >= length are never read.
  """
  k: jax.Array
  v: jax.Array
  gate: jax.Array | None
  valid: jax.Array
  length: jax.Array


# ----------------------------------------------------------------------------- checks

def _concrete(x):
  """numpy value of x if it is concrete, else None (traced: value checks skipped)."""
  if x is None or isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _eps(dtype) -> float:
  return float(jnp.finfo(dtype).eps)


def _check_floating(name, x):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")


def _validate(q, k, v, w, beta, g, kv_mask=None, *, single_token=False, need_w=True):
  """Shape checks (always) and value checks (concrete inputs only).

  need_w=False (private callers only) allows w = beta = None: no transitions, i.e.
  plain causal softmax attention, or forgetting attention with g."""
  tail = "" if single_token else "T,"
  nd = 3 if single_token else 4
  if w is None or beta is None:
    if need_w or (w is None) != (beta is None):
      raise ValueError(f"{'w' if w is None else 'beta'}: required (got None)")
  for name, x in (("q", q), ("k", k), ("v", v), ("w", w)):
    if x is None:
      continue
    if x.ndim != nd:
      hd = "HQ" if name == "q" else "H"
      d = "V" if name == "v" else "K"
      raise ValueError(f"{name}: expected shape [B,{tail}{hd},{d}], got {tuple(x.shape)}")
    _check_floating(name, x)
  lead = q.shape[:nd - 2]
  HQ, K = q.shape[-2:]
  H = k.shape[-2]
  if k.shape[:nd - 2] != lead:
    raise ValueError(f"k: leading dims {tuple(k.shape[:nd - 2])} do not match q's {tuple(lead)}")
  if k.shape[-1] != K:
    raise ValueError(f"k: head dim {k.shape[-1]} differs from q's head dim {K}")
  if HQ % H != 0:
    raise ValueError(f"q: {HQ} query heads are not a multiple of the {H} key/value heads of k")
  if v.shape[:-1] != k.shape[:-1]:
    raise ValueError(f"v: shape {tuple(v.shape)} must be [B,{tail}H,V] matching k {tuple(k.shape)}")
  if w is not None and w.shape != k.shape:
    raise ValueError(f"w: shape {tuple(w.shape)} must equal k's shape {tuple(k.shape)}")
  if beta is not None:
    if beta.shape != k.shape[:-1]:
      raise ValueError(f"beta: shape {tuple(beta.shape)} must be {tuple(k.shape[:-1])} "
                       f"([B,{tail}H])")
    _check_floating("beta", beta)
  if g is not None:
    if g.shape != q.shape[:-1]:
      raise ValueError(f"g: shape {tuple(g.shape)} must be {tuple(q.shape[:-1])} ([B,{tail}HQ])")
    _check_floating("g", g)
  if kv_mask is not None and kv_mask.shape != lead:
    raise ValueError(f"kv_mask: shape {tuple(kv_mask.shape)} must be {tuple(lead)}")

  b = _concrete(beta)
  if b is not None:
    b = b.astype(np.float64)
    if not np.all(np.isfinite(b)) or b.min() < 0 or b.max() > 2:
      raise ValueError(f"beta: values must lie in [0, 2] (eigenvalues of H in [-1, 1]); "
                       f"got min {np.nanmin(b):.4g}, max {np.nanmax(b):.4g}")
  wv = _concrete(w)
  if wv is not None and b is not None:
    norms = np.linalg.norm(wv.astype(np.float64), axis=-1)
    used = b != 0
    m = _concrete(kv_mask)
    if m is not None:
      used &= m.reshape(m.shape + (1,)).astype(bool)
    err = np.where(used, np.abs(norms - 1.0), 0.0)
    tol = max(1e-4, 4 * _eps(w.dtype))
    if err.size and (not np.all(np.isfinite(err)) or err.max() > tol):
      raise ValueError(f"w: rows must have unit L2 norm (max |norm - 1| = {np.nanmax(err):.3g} > "
                       f"{tol:.1g}); normalize w in fp32 first (e.g. w / ||w||)")


def _scale(scale, K):
  return K ** -0.5 if scale is None else float(scale)


# ----------------------------------------------------------------------------- layout

def _to_internal(q, k, v, w, beta, g, kv_mask):
  """Public [B,T,...] -> internal q [B,H,G,T,K], k/w [B,H,T,K], v [B,H,T,V], beta [B,H,T],
  g [B,H,G,T] (fp32), kv_mask [B,T]. Masked tokens get beta = 0 and g = 0 (invisible)."""
  B, T, HQ, K = q.shape
  H = k.shape[2]
  G = HQ // H
  mask = jnp.ones((B, T), bool) if kv_mask is None else kv_mask.astype(bool)
  qi = q.reshape(B, T, H, G, K).transpose(0, 2, 3, 1, 4)
  ki = k.transpose(0, 2, 1, 3)
  vi = v.transpose(0, 2, 1, 3)
  wi = bi = None
  if w is not None:
    wi = w.astype(F32).transpose(0, 2, 1, 3)
    bi = jnp.where(mask[:, :, None], beta.astype(F32), 0.0).transpose(0, 2, 1)
  gi = None
  if g is not None:
    g = jnp.where(mask[:, :, None], g.astype(F32), 0.0)
    gi = g.reshape(B, T, H, G).transpose(0, 2, 3, 1)
  return qi, ki, vi, wi, bi, gi, mask


def _from_internal(o, dtype):
  B, H, G, T, V = o.shape
  return o.transpose(0, 3, 1, 2, 4).reshape(B, T, H * G, V).astype(dtype)


# ----------------------------------------------------------------------------- naive

def _naive_core(q, k, v, w, beta, g, mask, scale):
  """Materialized fp32 reference (internal layout). Returns (o, keys carried to T-1)."""
  q, k, v = q.astype(F32), k.astype(F32), v.astype(F32)
  T = k.shape[2]
  idx = jnp.arange(T)

  def step(keys, i):
    # Apply H_i to every earlier key (rows j < i): keys_j <- H_i ... H_{j+1} k_j.
    if w is not None:
      wi, bi = w[:, :, i], beta[:, :, i]
      kw = jnp.einsum("bhtk,bhk->bht", keys, wi)
      upd = keys - (bi[:, :, None] * kw)[..., None] * wi[:, :, None, :]
      keys = jnp.where((idx < i)[:, None], upd, keys)
    return keys, jnp.einsum("bhgk,bhtk->bhgt", q[:, :, :, i], keys)

  keys, s = lax.scan(step, k, idx)            # s [T_i, B, H, G, T_j]
  s = jnp.moveaxis(s, 0, 3)                   # [B, H, G, T_i, T_j]
  if g is not None:
    gc = jnp.cumsum(g, axis=-1)
    s = s + gc[..., :, None] - gc[..., None, :]
  logits = scale * s
  allowed = jnp.tril(jnp.ones((T, T), bool)) & mask[:, None, None, None, :]
  logits = jnp.where(allowed, logits, -jnp.inf)
  mx = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  p = jnp.exp(logits - jnp.where(jnp.isneginf(mx), 0.0, mx))
  den = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(den > 0, den, 1.0)
  return jnp.einsum("bhgij,bhjv->bhgiv", p, v), keys


# ----------------------------------------------------------------------------- cache

def path_init_cache(batch: int, max_len: int, *, num_heads: int, num_q_heads: int,
                    head_dim: int, value_dim: int | None = None, dtype=jnp.float32,
                    gate: bool = False) -> PathCache:
  """An empty cache with max_len slots (keys fp32, values `dtype`)."""
  if num_q_heads % num_heads:
    raise ValueError(f"num_q_heads: {num_q_heads} is not a multiple of num_heads={num_heads}")
  V = head_dim if value_dim is None else value_dim
  return PathCache(
      k=jnp.zeros((batch, max_len, num_heads, head_dim), F32),
      v=jnp.zeros((batch, max_len, num_heads, V), dtype),
      gate=jnp.zeros((batch, max_len, num_q_heads), F32) if gate else None,
      valid=jnp.zeros((batch, max_len), bool),
      length=jnp.zeros((), jnp.int32))


def _check_room(cache: PathCache, n: int):
  S = cache.k.shape[1]
  ln = _concrete(cache.length)
  if ln is not None and int(ln) + n > S:
    raise ValueError(f"cache: {int(ln)} used + {n} new tokens exceed max_len={S}")
  # Traced: overflow cannot raise; the output is poisoned with NaN instead (see callers).
  return cache.length + n <= S


def _check_cache(cache: PathCache, k, v, g, *, single: bool):
  nd = 3 if single else 4
  H, K = k.shape[nd - 2:]
  if cache.k.shape[0] != k.shape[0] or cache.k.shape[2:] != (H, K):
    raise ValueError(f"cache: key cache {tuple(cache.k.shape)} does not fit k {tuple(k.shape)}")
  if cache.v.shape[2:] != v.shape[nd - 2:]:
    raise ValueError(f"cache: value cache {tuple(cache.v.shape)} does not fit v {tuple(v.shape)}")
  if (cache.gate is None) != (g is None):
    raise ValueError("g: a cache built with a forget gate needs g (and one without needs g=None)")


def _visible_slots(cache: PathCache):
  S = cache.k.shape[1]
  return cache.valid & (jnp.arange(S) < cache.length)[None, :]


def _decode_step(cache: PathCache, q_t, k_t, v_t, w_t, beta_t, g_t, *, scale, mask_t):
  """path_decode_step after validation; w_t = beta_t = None means no transitions."""
  B, HQ, K = q_t.shape
  H = k_t.shape[1]
  G = HQ // H
  room = _check_room(cache, 1)
  m = jnp.ones((B,), bool) if mask_t is None else mask_t.astype(bool)
  idx = cache.length
  kc = cache.k
  if w_t is not None:  # 1. in-place transition of every cached key, in fp32
    beta = jnp.where(m[:, None], beta_t.astype(F32), 0.0)
    w = w_t.astype(F32)
    kc = kc - (beta[:, None, :] * jnp.einsum("bshk,bhk->bsh", kc, w))[..., None] * w[:, None]
  kc = lax.dynamic_update_slice(kc, k_t.astype(F32)[:, None], (0, idx, 0, 0))  # 2. append
  vc = lax.dynamic_update_slice(cache.v, v_t.astype(cache.v.dtype)[:, None], (0, idx, 0, 0))
  valid = lax.dynamic_update_slice(cache.valid, m[:, None], (0, idx))
  gate = None
  if cache.gate is not None:
    gt = jnp.where(m[:, None], g_t.astype(F32), 0.0)
    gate = lax.dynamic_update_slice(cache.gate + gt[:, None, :], jnp.zeros((B, 1, HQ), F32),
                                    (0, idx, 0))
  new = PathCache(k=kc, v=vc, gate=gate, valid=valid, length=idx + 1)

  vis = _visible_slots(new)                                      # 3. attend, [B,S]
  q = q_t.astype(F32).reshape(B, H, G, K)
  s = jnp.einsum("bhgk,bshk->bhgs", q, kc)
  if gate is not None:
    s = s + gate.reshape(B, -1, H, G).transpose(0, 2, 3, 1)
  logits = jnp.where(vis[:, None, None, :], scale * s, -jnp.inf)
  mx = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - jnp.where(jnp.isneginf(mx), 0.0, mx))
  den = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(den > 0, den, 1.0)
  v_safe = jnp.where(vis[:, :, None, None], vc, jnp.zeros((), vc.dtype))
  o = _bw.mm("bhgs,bshv->bhgv", p, v_safe, vc.dtype)
  o = jnp.where(room, o, jnp.nan).reshape(B, HQ, -1).astype(q_t.dtype)
  return o, new


def path_decode_step(cache: PathCache, q_t, k_t, v_t, w_t, beta_t, g_t=None, *, scale=None,
                     mask_t=None):
  """One decode step. q_t [B,HQ,K], k_t/w_t [B,H,K], v_t [B,H,V], beta_t [B,H], g_t [B,HQ].

  1. every cached key: K <- K - beta_t (K w_t) w_t^T (fp32, in place);
  2. append the untransformed k_t, v_t (gate 0; older gates += g_t);
  3. softmax attention of q_t over the visible slots.
  mask_t [B] (optional): False marks a padding token, stored invisible and acting as the
  identity (beta = 0, g = 0). Returns (o_t [B,HQ,V] in q's dtype, cache). A full cache
  raises when its length is concrete; under jit the output is NaN instead.
  """
  _validate(q_t, k_t, v_t, w_t, beta_t, g_t, mask_t, single_token=True)
  _check_cache(cache, k_t, v_t, g_t, single=True)
  return _decode_step(cache, q_t, k_t, v_t, w_t, beta_t, g_t, scale=_scale(scale, q_t.shape[-1]),
                      mask_t=mask_t)


def _write_chunk(cache: PathCache, k_fin, q_total, v, gcum, mask) -> PathCache:
  """Cache after T new tokens (internal layout inputs): old keys pushed through all new
  transitions (q_total = their product), new keys/values/gates written at slots
  [length, length + T)."""
  B, H, T, K = k_fin.shape
  idx = cache.length
  k_old = jnp.einsum("bshk,bhlk->bshl", cache.k, q_total)
  kc = lax.dynamic_update_slice(k_old, k_fin.transpose(0, 2, 1, 3), (0, idx, 0, 0))
  vc = lax.dynamic_update_slice(cache.v, v.transpose(0, 2, 1, 3).astype(cache.v.dtype),
                                (0, idx, 0, 0))
  valid = lax.dynamic_update_slice(cache.valid, mask, (0, idx))
  gate = None
  if cache.gate is not None:
    G = gcum.shape[2]
    last = gcum[..., -1]                                        # [B,H,G]
    rel = (last[..., None] - gcum).transpose(0, 3, 1, 2).reshape(B, T, H * G)
    gate = lax.dynamic_update_slice(cache.gate + last.reshape(B, 1, H * G), rel, (0, idx, 0))
  return PathCache(k=kc, v=vc, gate=gate, valid=valid, length=idx + T)


def _extend(cache: PathCache, q, k, v, w, beta, g, *, scale, kv_mask, block_size):
  """path_extend after validation; w = beta = None means no transitions."""
  B, T, HQ, K = q.shape
  H = k.shape[2]
  G = HQ // H
  room = _check_room(cache, T)
  qi, ki, vi, wi, bi, gi, mask = _to_internal(q, k, v, w, beta, g, kv_mask)
  gcum = None if gi is None else jnp.cumsum(gi, axis=-1)
  vis = _visible_slots(cache)
  kc = cache.k.transpose(0, 2, 1, 3)
  vc = jnp.where(vis[:, :, None, None], cache.v, jnp.zeros((), cache.v.dtype)).transpose(0, 2, 1, 3)
  gc = None
  if cache.gate is not None:
    gc = cache.gate.reshape(B, -1, H, G).transpose(0, 2, 3, 1)
  o, (k_fin, q_total) = _bw.blockwise_core(
      qi, ki, vi, wi, bi, gcum, mask, scale=scale, block=block_size,
      cache=(kc, vc, gc, vis), want_keys=True)
  o = jnp.where(room, o, jnp.nan)
  return _from_internal(o, q.dtype), _write_chunk(cache, k_fin, q_total, vi, gcum, mask)


def path_extend(cache: PathCache, q, k, v, w, beta, g=None, *, scale=None, kv_mask=None,
                block_size: int = DEFAULT_BLOCK):
  """Attend T new tokens ([B,T,...] as in path_attention) to the cache and to each other,
  blockwise; returns (o [B,T,HQ,V], cache with the T tokens appended).
  kv_mask [B,T] (optional): False tokens are invisible (padding)."""
  _validate(q, k, v, w, beta, g, kv_mask)
  _check_cache(cache, k, v, g, single=False)
  _check_block(block_size)
  return _extend(cache, q, k, v, w, beta, g, scale=_scale(scale, q.shape[-1]), kv_mask=kv_mask,
                 block_size=block_size)


def _prefill(q, k, v, w, beta, g, *, scale, max_len, impl, kv_mask, cache_dtype, block_size):
  B, T, HQ, K = q.shape
  H = k.shape[2]
  S = T if max_len is None else int(max_len)
  if S < T:
    raise ValueError(f"max_len: {S} is shorter than the prompt length T={T}")
  cache = path_init_cache(B, S, num_heads=H, num_q_heads=HQ, head_dim=K, value_dim=v.shape[-1],
                          dtype=v.dtype if cache_dtype is None else cache_dtype,
                          gate=g is not None)
  if impl == "blockwise":
    return _extend(cache, q, k, v, w, beta, g, scale=scale, kv_mask=kv_mask,
                   block_size=block_size)
  if impl == "naive":  # the reference scan's final keys are the cache keys
    qi, ki, vi, wi, bi, gi, mask = _to_internal(q, k, v, w, beta, g, kv_mask)
    o, keys = _naive_core(qi, ki, vi, wi, bi, gi, mask, scale)
    gcum = None if gi is None else jnp.cumsum(gi, axis=-1)
    eye = jnp.broadcast_to(jnp.eye(K, dtype=F32), (B, H, K, K))
    return _from_internal(o, q.dtype), _write_chunk(cache, keys, eye, vi, gcum, mask)
  raise ValueError(f"impl: unknown PaTH prefill implementation {impl!r} "
                   f"(known: 'naive', 'blockwise')")


def path_prefill(q, k, v, w, beta, g=None, *, scale=None, max_len: int | None = None,
                 impl: str = "blockwise", kv_mask=None, cache_dtype=None):
  """Prefill T tokens: returns (o [B,T,HQ,V], PathCache with max_len (default T) slots,
  values in cache_dtype (default v's), keys fp32). impl "blockwise" or "naive"."""
  _validate(q, k, v, w, beta, g, kv_mask)
  return _prefill(q, k, v, w, beta, g, scale=_scale(scale, q.shape[-1]), max_len=max_len,
                  impl=impl, kv_mask=kv_mask, cache_dtype=cache_dtype, block_size=DEFAULT_BLOCK)


# ----------------------------------------------------------------------------- public op

def _check_block(block_size):
  if not (isinstance(block_size, int) and block_size > 0):
    raise ValueError(f"block_size: must be a positive integer, got {block_size!r}")


def _path_attention(q, k, v, w, beta, g=None, *, scale=None, impl="blockwise", kv_mask=None,
                    block_size: int = DEFAULT_BLOCK, pad_value=0.0, need_w=True):
  """path_attention with the private knobs (kv_mask, block_size, pad_value for the
  NaN-tail test, need_w=False to allow w = beta = None for the FoX baseline)."""
  if impl not in IMPLS:
    raise ValueError(f"impl: unknown PaTH implementation {impl!r} (known: {', '.join(IMPLS)})")
  _check_block(block_size)
  _validate(q, k, v, w, beta, g, kv_mask, need_w=need_w)
  B, T, HQ, K = q.shape
  sc = _scale(scale, K)
  if impl == "decode":
    cache = path_init_cache(B, T, num_heads=k.shape[2], num_q_heads=HQ, head_dim=K,
                            value_dim=v.shape[-1], dtype=v.dtype, gate=g is not None)
    mask = jnp.ones((B, T), bool) if kv_mask is None else kv_mask
    xs = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), (q, k, v, w, beta, g, mask))

    def step(c, x):
      o, c = _decode_step(c, *x[:6], scale=sc, mask_t=x[6])
      return c, o

    _, o = lax.scan(step, cache, xs)
    return jnp.moveaxis(o, 0, 1)
  qi, ki, vi, wi, bi, gi, mask = _to_internal(q, k, v, w, beta, g, kv_mask)
  if impl == "naive":
    o, _ = _naive_core(qi, ki, vi, wi, bi, gi, mask, sc)
  else:
    gcum = None if gi is None else jnp.cumsum(gi, axis=-1)
    o = _bw.blockwise_core(qi, ki, vi, wi, bi, gcum, mask, scale=sc, block=block_size,
                           pad_value=pad_value)
  return _from_internal(o, q.dtype)


def path_attention(q, k, v, w, beta, g=None, *, scale=None, impl="blockwise"):
  """PaTH attention. q [B,T,HQ,K]; k, w [B,T,H,K] (w unit-norm); v [B,T,H,V];
  beta [B,T,H] in [0, 2]; g [B,T,HQ] log forget gate or None; scale default K**-0.5,
  applied to the gate too: logits = scale * (q~.k + G_i - G_j). impl: "naive",
  "blockwise" (default) or "decode". Returns [B,T,HQ,V] in q's dtype."""
  return _path_attention(q, k, v, w, beta, g, scale=scale, impl=impl)
