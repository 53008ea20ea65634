"""Blockwise (FlashAttention-style) PaTH attention: memory linear in T, any T.

Internal layout (the public wrappers in path.py convert):
  q [B,H,G,T,K] (query head = h*G + r), k/w [B,H,T,K], v [B,H,T,V], beta [B,H,T],
  gcum [B,H,G,T] (cumulative log gate), key_mask [B,T] bool.

Per block of L tokens (W rows w_t, D = diag(beta)) the UT / compact-WY form gives
  H_{L-1} ... H_0 = I - W^T Tt W,   Tt = (I + strict_lower(D W W^T))^{-1} D,
and any contiguous sub-interval uses the principal sub-block of Tt (inverse of a
lower-triangular matrix). From it (papers.md section 2.2):
  q_new = q - tril(q W^T) (Tt W)                carries q_i to the block's left edge,
  k_new = k - (Tt M)^T W,  M = strict_lower(W k^T)   carries k_j to the block's right edge,
  intra = tril(q k^T) - (tril(q W^T) Tt) M      logits inside the block.
A query block then scans the earlier key blocks right to left with an online
softmax, pushing its queries across each block: q <- q - (q W_c^T)(Tt_c W_c).

Query blocks b and nb-1-b share one scan of static length nb-1, so the inter-block
work is the exact causal triangle with static shapes. Memory: that per-pair work is
wrapped in jax.checkpoint inside lax.map, so the backward (JAX autodiff) recomputes one
pair at a time and never holds anything T x T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def _pad_time(x, axis: int, tp: int, fill):
  """Pad axis to length tp with `fill`, then zero the tail with a select.

  The select is the analogue of a kernel's masked load: whatever sits in the
  padded tail (tests write NaN there) never reaches the arithmetic.
  """
  t = x.shape[axis]
  if tp == t:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, tp - t)
  x = jnp.pad(x, widths, constant_values=jnp.asarray(fill, x.dtype))
  keep = (jnp.arange(tp) < t).reshape([tp if a == axis % x.ndim else 1 for a in range(x.ndim)])
  return jnp.where(keep, x, jnp.zeros((), x.dtype))


def _blocks(x, axis: int, nb: int, blk: int):
  """Split time axis into (nb, blk)."""
  axis = axis % x.ndim
  return x.reshape(x.shape[:axis] + (nb, blk) + x.shape[axis + 1:])


def mm(spec: str, a, b, cd):
  """einsum with operands rounded to `cd` and fp32 accumulation (a tensor-core matmul).

  XLA:CPU cannot run every bf16 x bf16 -> f32 dot (its backward hits an unsupported
  DotThunk), so on CPU the rounded operands are multiplied in fp32: the products of
  bf16 numbers are exact in fp32, so the numerics are those of the bf16 matmul.
  """
  if jnp.dtype(cd) == F32:
    return jnp.einsum(spec, a.astype(F32), b.astype(F32))
  if jax.default_backend() == "cpu":
    return jnp.einsum(spec, a.astype(cd).astype(F32), b.astype(cd).astype(F32))
  return jnp.einsum(spec, a.astype(cd), b.astype(cd), preferred_element_type=F32)


def online_update(m, l, acc, logits, allowed, v, *, spec: str):
  """One online-softmax step. m/l [..., I], acc [..., I, V], logits [..., I, J].

  Masked entries contribute exactly 0; a row with nothing visible keeps l = 0.
  m is a stop-gradient shift (the softmax does not depend on it).
  """
  logits = jnp.where(allowed, logits, -jnp.inf)
  m_new = lax.stop_gradient(jnp.maximum(m, jnp.max(logits, axis=-1)))
  m_use = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
  alpha = jnp.exp(m - m_use)
  p = jnp.exp(logits - m_use[..., None])
  l = alpha * l + jnp.sum(p, axis=-1)
  acc = alpha[..., None] * acc + mm(spec, p, v, v.dtype)
  return m_new, l, acc


def finish(l, acc):
  return acc / jnp.where(l > 0, l, 1.0)[..., None]


def ut_preprocess(w32, beta32, k32):
  """Per-block UT transform. w32/k32 [..., L, K], beta32 [..., L] (fp32).

  Returns Tt = (I + strict_lower(D W W^T))^{-1} D, w2 = Tt W, k_new, and
  M = strict_lower(W k^T) (kept for the intra-block logits).
  """
  L = w32.shape[-2]
  strict = jnp.tril(jnp.ones((L, L), bool), -1)
  a = jnp.where(strict, beta32[..., :, None] * jnp.einsum("...ik,...jk->...ij", w32, w32), 0.0)
  eye = jnp.broadcast_to(jnp.eye(L, dtype=F32), a.shape)
  t = lax.linalg.triangular_solve(eye + a, eye, left_side=True, lower=True)
  tt = t * beta32[..., None, :]
  w2 = jnp.einsum("...ts,...sk->...tk", tt, w32)
  mk = jnp.where(strict, jnp.einsum("...sk,...jk->...sj", w32, k32), 0.0)
  k_new = k32 - jnp.einsum("...ts,...sj,...tk->...jk", tt, mk, w32)
  return tt, w2, k_new, mk


def blockwise_core(q, k, v, w, beta, gcum, key_mask, *, scale: float, block: int,
                   cache=None, want_keys: bool = False, pad_value=0.0):
  """PaTH (w given) or plain/forgetting attention (w None) over T new tokens.

  cache: optional (k_c [B,H,S,K] f32, v_c [B,H,S,V], gate_c [B,H,G,S] f32 or None,
  visible_c [B,S] bool), keys already carried to the position just before the
  new tokens; gate_c[j] = G_before - G_j. Returns o [B,H,G,T,V] (fp32) and, if
  want_keys, (k_fin [B,H,T,K] keys carried to the last token, Q_total [B,H,K,K]
  product of all new transitions, for updating older cache keys).
  """
  B, H, G, T, K = q.shape
  V = v.shape[-1]
  L = min(block, T)
  nb = -(-T // L)
  tp = nb * L
  cd = jnp.promote_types(q.dtype, k.dtype)  # dtype of the two attention matmuls
  use_path = w is not None

  q = _pad_time(q, 3, tp, pad_value)
  k = _pad_time(k, 2, tp, pad_value)
  v = _pad_time(v, 2, tp, pad_value)
  key_mask = _pad_time(key_mask, 1, tp, False)
  qb = _blocks(q, 3, nb, L).astype(F32)      # [B,H,G,nb,L,K]
  kb = _blocks(k, 2, nb, L).astype(F32)      # [B,H,nb,L,K]
  vb = _blocks(v, 2, nb, L)                  # [B,H,nb,L,V]
  mb = _blocks(key_mask, 1, nb, L)           # [B,nb,L]
  if gcum is not None:
    gcum = _pad_time(gcum.astype(F32), 3, tp, pad_value)
    gb = _blocks(gcum, 3, nb, L)             # [B,H,G,nb,L]
  else:
    gb = jnp.zeros((B, H, G, nb, L), F32)

  tri = jnp.tril(jnp.ones((L, L), bool))
  if use_path:
    w = _pad_time(w.astype(F32), 2, tp, pad_value)
    beta = _pad_time(beta.astype(F32), 2, tp, pad_value)
    wb = _blocks(w, 2, nb, L)
    bb = _blocks(beta, 2, nb, L)
    tt, w2, k_new, mk = ut_preprocess(wb, bb, kb)
    qw = jnp.where(tri, jnp.einsum("bhgnik,bhntk->bhgnit", qb, wb), 0.0)
    q_new = qb - jnp.einsum("bhgnit,bhntk->bhgnik", qw, w2)
    intra = (jnp.einsum("bhgnik,bhnjk->bhgnij", qb, kb)
             - jnp.einsum("bhgnit,bhnts,bhnsj->bhgnij", qw, tt, mk))
  else:
    k_new, q_new = kb, qb
    intra = jnp.einsum("bhgnik,bhnjk->bhgnij", qb, kb)

  # Intra-block part (diagonal blocks), all blocks at once: the online state's start.
  allowed = tri & mb[:, None, None, :, None, :]
  logits = scale * (intra + gb[..., :, None] - gb[..., None, :])
  zeros = jnp.zeros((B, H, G, nb, L), F32)
  m0, l0, acc0 = online_update(jnp.full_like(zeros, -jnp.inf), zeros,
                               jnp.zeros((B, H, G, nb, L, V), F32), logits, allowed, vb,
                               spec="bhgnij,bhnjv->bhgniv")

  # Inter-block part. Query blocks are processed in pairs (b, nb-1-b): block b needs key
  # blocks b-1..0 and block nb-1-b needs nb-2-b..0, nb-1 steps together, so every pair
  # runs one scan of static length nb-1 and the total work is the exact triangle.
  lead = lambda x, ax: jnp.moveaxis(x, ax, 0)
  keys = dict(k=lead(k_new, 2).astype(cd), v=lead(vb, 2), g=lead(gb, 3), m=lead(mb, 1))
  if use_path:
    keys.update(w=lead(wb, 2), w2=lead(w2, 2))
  qstate = dict(q=lead(q_new, 3), g=lead(gb, 3), m=lead(m0, 3), l=lead(l0, 3), acc=lead(acc0, 3))
  npair = (nb + 1) // 2
  b1s = jnp.arange(npair)
  # Static slices (not gathers): their transposes are pads, which XLA does not try to
  # constant-fold the way it does scatters with constant indices.
  pairs = dict(b1=b1s, b2=nb - 1 - b1s, s1=jax.tree.map(lambda a: a[:npair], qstate),
               s2=jax.tree.map(lambda a: a[::-1][:npair], qstate))
  take = lambda tree, idx: jax.tree.map(lambda a: a[idx], tree)
  steps = jnp.arange(nb - 1)

  def process(st, kx, active):
    """Attend one query block to one earlier key block, then push its queries across it."""
    s = mm("bhgik,bhjk->bhgij", st["q"], kx["k"], cd)
    lg = scale * (s + st["g"][..., :, None] - kx["g"][..., None, :])
    ok = active & kx["m"][:, None, None, None, :]
    m, l, acc = online_update(st["m"], st["l"], st["acc"], lg, ok, kx["v"],
                              spec="bhgij,bhjv->bhgiv")
    q = st["q"]
    if use_path:
      qw_c = jnp.einsum("bhgik,bhtk->bhgit", q, kx["w"])
      q = jnp.where(active, q - jnp.einsum("bhgit,bhtk->bhgik", qw_c, kx["w2"]), q)
    return dict(q=q, g=st["g"], m=m, l=l, acc=acc)

  def finish_block(st):
    m, l, acc = st["m"], st["l"], st["acc"]
    if cache is not None:  # keys before these T tokens, already carried to the boundary
      k_c, v_c, gate_c, vis_c = cache
      s = jnp.einsum("bhgik,bhsk->bhgis", st["q"], k_c)
      lg = s if gate_c is None else s + st["g"][..., :, None] + gate_c[..., None, :]
      m, l, acc = online_update(m, l, acc, scale * lg, vis_c[:, None, None, None, :], v_c,
                                spec="bhgis,bhsv->bhgiv")
    return finish(l, acc)

  def pair_blocks(px):
    b1, b2 = px["b1"], px["b2"]
    first = steps < b1                                   # steps of block b1, then of b2
    kxs = take(keys, jnp.where(first, b1 - 1 - steps, nb - 2 - steps))
    kxs.update(first=first, active=first | (b1 != b2))  # odd nb: middle block pairs itself

    def step(carry, kx):
      st1, st2 = carry
      sel = lambda a, b: jax.tree.map(lambda x, y: jnp.where(kx["first"], x, y), a, b)
      new = process(sel(st1, st2), kx, kx["active"])
      return (sel(new, st1), sel(st2, new)), None

    (st1, st2), _ = lax.scan(step, (px["s1"], px["s2"]), kxs)
    return finish_block(st1), finish_block(st2)

  o1, o2 = lax.map(jax.checkpoint(pair_blocks, prevent_cse=False), pairs)  # [npair,B,H,G,L,V]
  o = jnp.concatenate([o1, o2[::-1][npair * 2 - nb:]], axis=0)            # block order
  o = jnp.moveaxis(o, 0, 3).reshape(B, H, G, tp, V)[:, :, :, :T]
  if not want_keys:
    return o

  # Carry every new key to the last token: k_fin_c = (P_{nb-1} ... P_{c+1}) k_new_c.
  eye = jnp.broadcast_to(jnp.eye(K, dtype=F32), (B, H, K, K))
  if use_path:
    def carry_keys(qm, kx):
      kn, wc, w2c = kx
      out = jnp.einsum("bhjk,bhlk->bhjl", kn, qm)
      qm = qm - jnp.einsum("bhlt,bhtk->bhlk", jnp.einsum("bhlk,bhtk->bhlt", qm, wc), w2c)
      return qm, out
    q_total, k_fin = lax.scan(carry_keys, eye, (lead(k_new, 2), lead(wb, 2), lead(w2, 2)),
                              reverse=True)
    k_fin = jnp.moveaxis(k_fin, 0, 2).reshape(B, H, tp, K)[:, :, :T]
  else:
    q_total, k_fin = eye, k.astype(F32)[:, :, :T]
  return o, (k_fin, q_total)
