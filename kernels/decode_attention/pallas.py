"""Mosaic-GPU kernel: GQA decode attention over the KV cache, split-K over length.

Grid (Hkv * G/BG, P). CTA (h, p) owns BG of the G = Hq/Hkv query heads of KV head h
(block_g; all G unless their accumulators would crowd the registers) and a
contiguous share of the live cache blocks: with nb = ceil(length / BS) blocks,
split p reads blocks [p*ceil(nb/P), ...) — a *dynamic* number, so cache slots
past `length` are never read (only the tail of the last live block, which is
masked). K and V blocks [BS, Dh] stream through SMEM with a TMA pipeline; for
each query head the CTA keeps an online softmax (m, l, o) in registers, and
writes the unnormalised partial (m_p, l_p, o_p), split-major ([P, Hkv, G, ...]: each
split's rows are the query heads in order, so a consumer can stream o_p by columns of
Hq * Dh). The standard merge (kernels/decode_attention/reference.merge_splits) runs in
XLA on P*Hq*(Dh+2) floats, or inside the output projection (kernels/attention_out_mlp).

PaTH (path_decode_attention): the same pass also applies the token's transition to
every older key, K <- K - beta (K w) w^T for slots < length - 1 (slot length - 1
holds the new key), stores the updated block and attends with it, so K is read
once and written once per step (papers.md 2.3, FlashFormer-style fusion).

The caches these two passes update (PaTH's K, the forget gate's row) come back as new
arrays in which only the live blocks are written. `commit` = 0 (a step past the end of
the cache) runs the pass over every block and writes each back unchanged, so the caches
come back whole and as they were, without a branch around the kernel (on the GPU a
conditional is a host round trip); the attention output is then meaningless.

Score bias (bias_HS, e.g. a forget gate's scale * (G_t - G_j) in FoX / PaTH-FoX):
[G, BS] blocks of it stream through the same pipeline and are added to the scaled
scores of the live slots.

Forget-gate update (gate_HS, g_H): the gate row G_{t-1} - G_j streams in the bias's place;
the kernel adds this token's g_t to the older slots, zeroes the new one (slot length - 1),
adds scale * the result to the scores and stores the updated live blocks, so a FoX /
PaTH-FoX step reads and writes its gate row once, inside attention, instead of in a
separate XLA kernel before it.

Masking: scores of slots >= length are -inf and their V rows are zeroed before
the product (0 * NaN would be NaN), so NaN garbage in unused slots (keys, values,
bias) is harmless.

Scores on the tensor cores (scores="mma", bf16 q and K): the K tile is WGMMA's A
operand and the CTA's query heads are the columns of B [Dh, 16] (built in SMEM each
step; q is bf16, so exact), giving every head's scores [BS, 16] in one WGMMA; only p·V
stays on the CUDA cores. Products are exact and sums fp32, as in the FMA form (q·K is
scaled after the sum instead of q before it).

Both products on the tensor cores (scores="mma-pv", bf16 q, K and V): every [64, *] tile
has the CTA's query heads as rows, head g in rows g and g + 32 (up to 32 heads per CTA).
A = those q rows (built in SMEM in the first step) against the K tile as a transposed B
gives S [64, BS]; the softmax runs on S's rows (reductions within a quad of threads, no
trip through SMEM); A = P [64, BS], p in hi bf16 in rows g and its lo part in rows
g + 32, against the V tile as B adds P V into an fp32 [64, Dh] carry: row g plus row
g + 32 is p V with p to ~2^-17. The softmax is in base 2 (the scale times log2(e); exp2 is one
approximate MUFU.EX2 when compiled) and m leaves in natural-log units. V rows past the
live length are zeroed in SMEM first (only in the last live block). PaTH's key update
stays on the CUDA-core forms.

Head-dim chunks (block_d, default min(Dh, 64)): the K and V tiles are read and widened
BD columns at a time, and q is read from SMEM per chunk, so the registers hold one
[BS, BD] fp32 chunk besides the G accumulators instead of the whole K and V tiles and
every head's q. At Dh = 128 with four heads per CTA (llama-8b-bench) the whole-tile form
needed far more than 255 registers and spilled 1428 bytes per thread (ptxas, H100).
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import _common as C
from kernels.decode_attention import reference


SCORE_FORMS = ("fma", "mma", "mma-pv")
MMA_HEADS = 16   # B's columns in the "mma" scores: up to 16 query heads per CTA
MMA_SWIZZLE = 32  # B's rows are 16 bf16 = 32 bytes wide; the K tile takes the same swizzle
MMA_ROWS = 64     # "mma-pv": a WGMMA's rows; up to 32 query heads per CTA, each in two rows
LOG2E = 1.4426950408889634
PV_SWIZZLE = 128  # "mma-pv": every operand's rows are 64 bf16 (or a multiple) = 128 bytes


def _mma_scores(ctx: C.Ctx, k_s, q_s, *, BG: int, Dh: int, BS: int):
  """[BS] unscaled scores q_g . K per head g (ROW layout): K tile [BS, Dh] @ B [Dh, 16],
  column g of B = q_g (bf16), on the tensor cores (or, "hlo", the same exact products
  summed by XLA)."""
  f32, NB = jnp.float32, MMA_HEADS
  col = ctx.iota((Dh, NB), 1, C.WGMMA)
  b = ctx.zeros((Dh, NB), C.WGMMA)
  for g in range(BG):
    b = jnp.where(col == g, C.bcast_cols(ctx.ld(q_s.at[g], C.ROW).astype(f32), (Dh, NB)), b)
  b = b.astype(jnp.bfloat16)
  if not ctx.tma:
    s = C.mma_product(ctx, k_s, b, (BS, NB), refs=(True, False))
  else:
    def scoped(b_s):
      b_s[...] = b
      C.plgpu.commit_smem()   # B visible to the tensor cores (and the warpgroup barrier)
      return C.mma_product(ctx, k_s, b_s, (BS, NB))

    s = pl.run_scoped(scoped, C.plgpu.SMEM((Dh, NB), jnp.bfloat16,
                                           transforms=C.mma_transforms(MMA_SWIZZLE)))
  cs = ctx.iota((BS, NB), 1, C.WGMMA)
  return [jnp.sum(jnp.where(cs == g, s, 0.0), axis=1) for g in range(BG)]


def _transposed(ctx: C.Ctx, k_s, scratch):
  """k_s [BS, Dh] as WGMMA's B operand [Dh, BS]: a transposed view of the SMEM tile
  (the tensor cores read bf16 operands either way round), or, in the Mosaic-GPU
  interpreter, which models no transposed views, a transposed copy in `scratch`."""
  if ctx.interpret:
    scratch[...] = k_s[...].T
    return scratch
  return C.plgpu.transpose_ref(k_s, (1, 0))


def _pv_step(ctx: C.Ctx, *, BG: int, Dh: int, BS: int, scale, base, length, commit, gstep,
             bias: bool, gate: bool, gate_dst, scratch):
  """The pipeline step of the "mma-pv" form; scratch = the SMEM operands: q's A tile, P,
  and, in the Mosaic-GPU interpreter, K^T (none in "hlo" mode). Row r < 32 of every
  [64, *] tile is query head r, and row r + 32 the same head again: its scores and
  softmax repeat row r's, and its P row holds the lo part of p, so each accumulator row
  pair sums to p·V with p in hi + lo bf16. gate_dst(j): where block j's updated gate
  rows go."""
  f32, bf16, R = jnp.float32, jnp.bfloat16, MMA_ROWS

  def heads_to_rows(vectors, shape):   # [n] COL vectors, one per head -> rows g, g + 32
    row, out = ctx.iota(shape, 0, C.WGMMA), ctx.zeros(shape, C.WGMMA)
    for g, v in enumerate(vectors):
      out = jnp.where((row == g) | (row == g + R // 2), C.bcast_rows(v, shape), out)
    return out

  def step(idx, k_s, v_s, q_s, *rest):
    *bias_s, (o, m, l) = rest
    blk = base + idx[0]
    slot = ctx.iota((BS,), 0, C.COL) + blk * BS
    valid = slot < length
    qa = lambda: heads_to_rows([ctx.ld(q_s.at[g], C.COL).astype(f32) for g in range(BG)],
                               (R, Dh)).astype(bf16)
    if ctx.tma:
      qa_s, pa_s, *kt_s = scratch

      @pl.when(idx[0] == 0)   # q is the same in every step: A is built once
      def _():
        qa_s[...] = qa()
        C.plgpu.commit_smem()

      s = C.mma_product(ctx, qa_s, _transposed(ctx, k_s, kt_s and kt_s[0]), (R, BS))
    else:
      s = jnp.dot(qa().astype(f32), k_s[...].astype(f32).T, precision=lax.Precision.HIGHEST)
    # base 2: the scores times log2(e) (folded into the scale), m in those units, and
    # exp2 (one MUFU.EX2 when compiled, where exp costs ~9 instructions an element)
    s = s * (scale * LOG2E)
    gate_rows = []
    if bias:
      b = [ctx.ld(bias_s[0].at[g], C.COL) for g in range(BG)]
      if gate:   # older slots += g_t; the new slot (and the masked tail) 0
        b = [jnp.where(commit, jnp.where(slot < length - 1, bg + gstep[g], 0.0), bg)
             for g, bg in enumerate(b)]
        gate_rows = b
        b = [bg * scale for bg in b]
      s = s + heads_to_rows(b, (R, BS)) * LOG2E
    s = jnp.where(C.bcast_rows(valid, (R, BS)), s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - C.bcast_cols(m_new, (R, BS)))
    l = l * alpha + jnp.sum(p, axis=1)
    lo_rows = ctx.iota((R, BS), 0, C.WGMMA) >= R // 2
    pa = jnp.where(lo_rows, p - p.astype(bf16).astype(f32), p).astype(bf16)
    if ctx.tma:
      pa_s[...] = pa

      # V rows past the live length are zeroed in SMEM first: P is 0 there, but on the
      # tensor cores too 0 * NaN is NaN (only the last live block has such rows)
      @pl.when((blk + 1) * BS > length)
      def _():
        rows = C.bcast_cols(ctx.iota((BS,), 0, C.ROW) + blk * BS < length, (BS, Dh))
        v_s[...] = jnp.where(rows, v_s[...], 0.0).astype(v_s.dtype)

      C.plgpu.commit_smem()   # P (and V) visible to the tensor cores
      pv = C.mma_product(ctx, pa_s, v_s, (R, Dh))
    else:
      v = jnp.where(C.bcast_cols(jnp.arange(BS) + blk * BS < length, (BS, Dh)),
                    v_s[...].astype(f32), 0.0)
      pv = jnp.dot(pa.astype(f32), v, precision=lax.Precision.HIGHEST)
    if gate:
      ctx.store_rows(gate_rows, gate_dst(blk))
    return o * C.bcast_cols(alpha, (R, Dh)) + pv, m_new, l

  return step


def _pv_pass(ctx: C.Ctx, *, G, q_g, k_g, v_g, bias_g, o_g, m_g, l_g, gnew_g, h, g0, p,
             BG, Dh, BS, scale, stages, start, n_blocks, length, commit, gstep):
  """The "mma-pv" form's pass over this CTA's blocks, and its BG heads' partials (o, m,
  l) stored."""
  f32, bf16, R = jnp.float32, jnp.bfloat16, MMA_ROWS
  heads = pl.ds(g0, BG)
  tr = C.mma_transforms(PV_SWIZZLE)
  spec = C.plgpu.BlockSpec((BS, Dh), lambda i: (start + i, 0), transforms=tr)
  in_specs = [spec, spec, C.plgpu.BlockSpec((BG, Dh), lambda i: (0, 0))]
  operands = [k_g.at[h], v_g.at[h], q_g.at[h, heads]]
  if bias_g is not None:
    in_specs.append(C.plgpu.BlockSpec((BG, BS), lambda i: (0, start + i)))
    operands.append(bias_g.at[h, heads])
  carry0 = (ctx.zeros((R, Dh), C.WGMMA), ctx.cast(jnp.full((R,), -jnp.inf, f32), C.ROW),
            ctx.zeros((R,), C.ROW))

  def run(*scratch):
    step = _pv_step(ctx, BG=BG, Dh=Dh, BS=BS, scale=scale, base=start, length=length,
                    commit=commit, gstep=gstep, bias=bias_g is not None,
                    gate=gnew_g is not None,
                    gate_dst=lambda j: gnew_g.at[h, heads, pl.ds(j * BS, BS)],
                    scratch=scratch)
    return ctx.pipeline(step, grid=(n_blocks,), in_specs=in_specs, stages=stages,
                        init_carry=carry0)(*operands)

  if ctx.tma:   # A's q tile, P, and (interpreter only) K^T, all bf16 WGMMA operands
    shapes = [(R, Dh), (R, BS)] + ([(Dh, BS)] if ctx.interpret else [])
    o, m, l = pl.run_scoped(run, *[C.plgpu.SMEM(sh, bf16, transforms=tr) for sh in shapes])

    def fold(s):   # row g + row g + 32, through SMEM, as rows in the column layout
      s[...] = o
      C.plgpu.commit_smem()   # includes the warpgroup barrier
      return [ctx.ld(s.at[g], C.COL) + ctx.ld(s.at[g + R // 2], C.COL) for g in range(BG)]

    rows = pl.run_scoped(fold, C.plgpu.SMEM((R, Dh), f32))
  else:
    o, m, l = run()
    rows = [o[g] + o[g + R // 2] for g in range(BG)]
  ctx.store_rows(rows, o_g.at[p, h, heads])
  # m back in natural-log units, as the merge takes it
  _store_ml(ctx, m * (1 / LOG2E), l, m_g.at[p, h, heads], l_g.at[p, h, heads], BG=BG, G=G)


def _store_ml(ctx: C.Ctx, m, l, m_dst, l_dst, *, BG: int, G: int):
  """The CTA's heads' m and l, vectors in the row layout with head g in row g, to
  their [BG] rows in GMEM: each with one TMA store (Ctx.store's first `rows` entries)
  when those rows are whole 16-byte boxes, else as scalars (a scalar store to GMEM costs
  two warpgroup barriers)."""
  if not ctx.tma or not (BG % 4 or G % 4):
    ctx.store(m, m_dst, rows=BG)
    ctx.store(l, l_dst, rows=BG)
    return

  def body(ml_s):
    ml_s[0] = m
    ml_s[1] = l
    C.plgpu.commit_smem()   # includes the warpgroup barrier
    for g in range(BG):
      m_dst[g] = ml_s[0, g]
      l_dst[g] = ml_s[1, g]

  pl.run_scoped(body, C.plgpu.SMEM((2, m.shape[0]), jnp.float32))


def _body(*refs, ctx: C.Ctx, S, G, BG, Dh, BS, BD, P, scale, stages, path, bias, gate,
          mma=False, pv=False):
  """G query heads per KV head, BG of them per CTA (grid axis h = KV head * G/BG + group)."""
  refs = list(refs)
  len_g, q_g, k_g, v_g = refs[:4]
  del refs[:4]
  if path:   # PaTH: also carry every older key through the token's transition
    w_g, b_g = refs.pop(0), refs.pop(0)
  bias_g = refs.pop(0) if bias else None   # the gate row G_{t-1} - G_j when gate
  gstep_g = refs.pop(0) if gate else None  # g_t per query head [Hq]
  o_g, m_g, l_g = refs[:3]
  knew_g = refs[3] if path else None
  gnew_g = refs[-1] if gate else None
  NG = G // BG
  hg = ctx.axis("h")
  h, g0 = hg // NG, (hg % NG) * BG   # this CTA's KV head and its first query head in it
  heads = pl.ds(g0, BG)
  p = ctx.axis("p")
  f32 = jnp.float32
  ctx.begin()   # everything here (the caches' new row, q, length) is the step's own
  length = len_g[0]
  commit = len_g[1] != 0 if (path or gate) else None   # (only passes that update caches)
  nb = (length + BS - 1) // BS
  per = (nb + P - 1) // P
  n_blocks = jnp.clip(nb - p * per, 0, per)
  start = jnp.minimum(p * per, S // BS - 1)   # in range even for an empty split

  if path:
    beta = b_g[h].astype(f32)
  if gate:
    gstep = [gstep_g[h * G + g0 + g] for g in range(BG)]

  # q (and PaTH's w) ride in the pipeline with K and V (a constant block, re-fetched each
  # step: G * Dh elements), so their load overlaps the first K/V load instead of costing
  # one more TMA round trip before it.
  nc = Dh // BD
  cols = lambda c: pl.ds(c * BD, BD)
  if pv:
    _pv_pass(ctx, G=G, q_g=q_g, k_g=k_g, v_g=v_g, bias_g=bias_g, o_g=o_g, m_g=m_g,
             l_g=l_g, gnew_g=gnew_g, h=h, g0=g0, p=p, BG=BG, Dh=Dh, BS=BS, scale=scale,
             stages=stages, start=start, n_blocks=n_blocks, length=length, commit=commit,
             gstep=gstep if gate else None)
    return

  def step(idx, k_s, v_s, q_s, *rest):
    *extra_s, carry = rest
    q = lambda g, c: ctx.ld(q_s.at[g, cols(c)], C.COL).astype(f32) * scale
    if path:
      w2 = lambda c: C.bcast_rows(ctx.ld(extra_s[0].at[cols(c)], C.COL).astype(f32), (BS, BD))
    bias_s = extra_s[1:] if path else extra_s
    slot = ctx.iota((BS,), 0, C.ROW) + (start + idx[0]) * BS
    valid = slot < length
    k = lambda c: k_s[:, cols(c)].astype(f32)
    if path:   # slots < length - 1 hold older keys; slot length - 1 is the new key
      kw = sum(jnp.sum(k(c) * w2(c), axis=1) for c in range(nc))            # [BS], ROW
      older = C.bcast_cols((slot < length - 1) & commit, (BS, BD))
      k_old = k

      def k(c):   # the updated chunk, stored once, then attended with
        kc = k_old(c)
        kc = jnp.where(older, kc - C.bcast_cols(kw * beta, (BS, BD)) * w2(c), kc)
        ctx.store(kc, knew_g.at[h, pl.ds((start + idx[0]) * BS, BS), cols(c)],
                  transforms=C.tile_transforms(BD, knew_g.dtype))
        return kc

    if mma:   # every head's scores in one WGMMA (never with PaTH: checked in partials)
      s = [sg * scale for sg in _mma_scores(ctx, k_s, q_s, BG=BG, Dh=Dh, BS=BS)]
    else:     # one head-dim chunk of K at a time
      s = [None] * BG
      for c in range(nc):
        kc = k(c)
        for g in range(BG):
          sc = jnp.sum(kc * C.bcast_rows(q(g, c), (BS, BD)), axis=1)
          s[g] = sc if s[g] is None else s[g] + sc
    gate_rows, pr, alpha, ml = [], [], [], []
    for g, (_, m, l) in enumerate(carry):
      sg = s[g]
      if bias:
        b = ctx.ld(bias_s[0].at[g], C.ROW)
        if gate:   # older slots += g_t; the new slot (and the masked tail) 0
          b = jnp.where(commit, jnp.where(slot < length - 1, b + gstep[g], 0.0), b)
          gate_rows.append(b)
          b = b * scale
        sg = sg + b
      sg = jnp.where(valid, sg, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(sg))
      alpha.append(jnp.exp(m - m_new))
      pr.append(jnp.exp(sg - m_new))
      ml.append((m_new, l * alpha[g] + jnp.sum(pr[g])))
    # o += p V, one head-dim chunk of V at a time (masked rows zeroed: 0 * NaN = NaN)
    accs = [list(acc) for acc, _, _ in carry]
    for c in range(nc):
      v = jnp.where(C.bcast_cols(valid, (BS, BD)), v_s[:, cols(c)].astype(f32), 0.0)
      for g in range(BG):
        accs[g][c] = accs[g][c] * alpha[g] + jnp.sum(v * C.bcast_cols(pr[g], (BS, BD)), axis=0)
    if gate:
      ctx.store_rows(gate_rows, gnew_g.at[h, heads, pl.ds((start + idx[0]) * BS, BS)])
    return tuple((tuple(accs[g]), *ml[g]) for g in range(BG))

  # K and V may differ in dtype (PaTH layers keep fp32 keys next to model-dtype values).
  spec = lambda dt, tr=None: C.plgpu.BlockSpec((BS, Dh), lambda i: (start + i, 0),
                                               transforms=tr or C.tile_transforms(Dh, dt))
  carry0 = tuple((tuple(ctx.zeros((BD,), C.COL) for _ in range(nc)), f32(-jnp.inf), f32(0.0))
                 for _ in range(BG))
  in_specs = [spec(k_g.dtype, C.mma_transforms(MMA_SWIZZLE) if mma else None), spec(v_g.dtype),
              C.plgpu.BlockSpec((BG, Dh), lambda i: (0, 0))]
  operands = [k_g.at[h], v_g.at[h], q_g.at[h, heads]]
  if path:
    in_specs.append(C.plgpu.BlockSpec((Dh,), lambda i: (0,)))
    operands.append(w_g.at[h])
  if bias:   # [BG, BS] of this CTA's rows of bias_g[h] per cache block
    in_specs.append(C.plgpu.BlockSpec((BG, BS), lambda i: (0, start + i)))
    operands.append(bias_g.at[h, heads])
  res = ctx.pipeline(step, grid=(n_blocks,), in_specs=in_specs, stages=stages,
                     init_carry=carry0)(*operands)
  # The G partial rows leave with one TMA store per chunk (not one per head), and every
  # head's m and l with one more each.
  for c in range(nc):
    ctx.store_rows([acc[c] for acc, _, _ in res], o_g.at[p, h, heads, cols(c)])
  NR = MMA_ROWS * -(-BG // MMA_ROWS)   # a row-layout vector: whole 64-row tiles
  ri = ctx.iota((NR,), 0, C.ROW)
  ms, ls = ctx.zeros((NR,), C.ROW), ctx.zeros((NR,), C.ROW)
  for g, (_, m, l) in enumerate(res):
    ms, ls = jnp.where(ri == g, m, ms), jnp.where(ri == g, l, ls)
  _store_ml(ctx, ms, ls, m_g.at[p, h, heads], l_g.at[p, h, heads], BG=BG, G=G)


def _heads_per_cta(G: int, Dh: int) -> int:
  """The most query heads per CTA whose accumulators fit ACC_COLUMNS columns."""
  return max(b for b in range(1, G + 1) if G % b == 0 and (b == 1 or b * Dh <= ACC_COLUMNS))


# A [Dh] fp32 accumulator in the WGMMA column layout costs Dh / 4 registers per thread;
# 256 columns (64 registers) leave room for a [64, 64] fp32 chunk and the temporaries
# (llama-1b-bench: 4 heads x 64; llama-8b-bench: 2 of its 4 heads x 128 per CTA).
ACC_COLUMNS = 256


def partials(q_HD, k_cache_KSD, v_cache_KSD, length, *, scale, mode, num_splits=None,
             block_s=None, block_d=None, block_g=None, stages=2, path_wb=None, bias_HS=None,
             gate_g=None, pdl=None, commit=True, scores="fma"):
  """The kernel alone: (o_p [P, Hkv, G, Dh], m_p [P, Hkv, G], l_p [P, Hkv, G]), fp32;
  with path_wb = (w [Hkv, Dh], beta [Hkv]) also the updated K (live blocks written);
  bias_HS [Hq, S] is added to the scaled scores; with gate_g = (gate [Hq, S], g [Hq]) the
  gate row is updated (older slots + g, slot length - 1 zero), scale * it added to the
  scores, and the updated gate [Hq, S] returned last (live blocks written). commit (bool,
  may be traced) False: every block of K and the gate written back unchanged (the
  outputs = the inputs; o meaningless). block_d: head-dim columns per chunk (module
  docstring; default min(Dh, 64)). block_g: query heads per CTA (default: as many of the
  G per KV head as keep G * Dh <= ACC_COLUMNS; PaTH: all G, which share one key update).
  scores: "fma" (CUDA cores) or "mma" (tensor cores; bf16 q and K, no PaTH; module
  docstring)."""
  if gate_g is not None and bias_HS is not None:
    raise ValueError("decode attention: bias_HS and a gate update exclude each other")
  Hq, Dh = q_HD.shape
  Hkv, S, _ = k_cache_KSD.shape
  G = Hq // Hkv
  interp = mode != "compile"
  BS = block_s or C.pick_block(S, 64, 64, "S (cache length)")
  C.check_block(S, BS, 64, "S (cache length)")   # WGMMA row tiles: 64-row blocks
  BD = block_d or min(Dh, 64)
  C.check_block(Dh, BD, 8 if interp else 32, "Dh (head dim)")
  pv = scores == "mma-pv"
  BG = block_g or (G if path_wb is not None else
                   max(b for b in range(1, min(G, MMA_ROWS // 2) + 1) if G % b == 0) if pv
                   else _heads_per_cta(G, Dh))
  if BG < 1 or G % BG or (path_wb is not None and BG != G):
    raise ValueError(f"block_g={BG} must divide the {G} query heads per KV head"
                     + (" and, with PaTH's key update, be all of them" if path_wb is not None
                        else ""))
  if scores not in SCORE_FORMS:
    raise ValueError(f"decode attention: unknown scores={scores!r} (known: "
                     f"{', '.join(SCORE_FORMS)})")
  mma = scores == "mma"
  if mma and (q_HD.dtype != jnp.bfloat16 or k_cache_KSD.dtype != jnp.bfloat16
              or path_wb is not None or BG > MMA_HEADS or Dh % 64):
    raise ValueError(f"decode attention: scores='mma' needs bf16 q and K (got {q_HD.dtype}, "
                     f"{k_cache_KSD.dtype}), no PaTH key update, at most {MMA_HEADS} query "
                     f"heads per CTA (got {BG}) and a head dim in multiples of 64 (got {Dh})")
  if pv and (any(a.dtype != jnp.bfloat16 for a in (q_HD, k_cache_KSD, v_cache_KSD))
             or path_wb is not None or BG > MMA_ROWS // 2 or Dh % 64):
    raise ValueError(f"decode attention: scores='mma-pv' needs bf16 q, K and V (got "
                     f"{q_HD.dtype}, {k_cache_KSD.dtype}, {v_cache_KSD.dtype}), no PaTH key "
                     f"update, at most {MMA_ROWS // 2} query heads per CTA (got {BG}) and a "
                     f"head dim in multiples of 64 (got {Dh})")
  P = num_splits or max(1, min(S // BS, (2 if interp else 128) // Hkv))
  if P < 1:
    raise ValueError(f"num_splits must be >= 1, got {P}")
  path = path_wb is not None
  gate = gate_g is not None
  if gate:
    bias_HS = gate_g[0]
  bias = bias_HS is not None
  out_type = (jax.ShapeDtypeStruct((P, Hkv, G, Dh), jnp.float32),
              jax.ShapeDtypeStruct((P, Hkv, G), jnp.float32),
              jax.ShapeDtypeStruct((P, Hkv, G), jnp.float32))
  if path:
    out_type += (jax.ShapeDtypeStruct(k_cache_KSD.shape, k_cache_KSD.dtype),)
  if gate:
    out_type += (jax.ShapeDtypeStruct((Hkv, G, S), jnp.float32),)
  kern = C.mosaic_kernel(
      lambda *r, ctx: _body(*r, ctx=ctx, S=S, G=G, BG=BG, Dh=Dh, BS=BS, BD=BD, P=P,
                            scale=scale, mma=mma, pv=pv,
                            stages=stages, path=path, bias=bias, gate=gate),
      out_type=out_type, grid=(Hkv * (G // BG), P), grid_names=("h", "p"), mode=mode,
      name="path_decode_attention" if path else "decode_attention", pdl=pdl,
      approx_math=True)   # the kernel's only approximable op is the softmax's exp (exp2)
  length = jnp.asarray(length, jnp.int32)
  if path or gate:   # [length, commit]; no commit: every block, written back unchanged
    commit = jnp.asarray(commit)
    length_1 = jnp.stack([jnp.where(commit, length, S), commit.astype(jnp.int32)])
  else:              # nothing to write back: commit does not apply
    length_1 = jnp.reshape(length, (1,))
  extra = () if not path else (path_wb[0].astype(jnp.float32), path_wb[1].astype(jnp.float32))
  if bias:
    extra += (bias_HS.astype(jnp.float32).reshape(Hkv, G, S),)
  if gate:
    extra += (gate_g[1].astype(jnp.float32).reshape(Hq),)
  out = kern(length_1, q_HD.reshape(Hkv, G, Dh), k_cache_KSD, v_cache_KSD, *extra)
  if gate:
    out = (*out[:-1], out[-1].reshape(Hq, S))
  return out


def _merged(q_HD, o, m, l):
  return reference.merge_splits(o, m, l).reshape(q_HD.shape).astype(q_HD.dtype)


def decode_attention(q_HD, k_cache_KSD, v_cache_KSD, length, *, scale, mode, **kw):
  """o, or (o, gate) with gate_g."""
  o, m, l, *gate = partials(q_HD, k_cache_KSD, v_cache_KSD, length, scale=scale, mode=mode, **kw)
  return (_merged(q_HD, o, m, l), *gate) if gate else _merged(q_HD, o, m, l)


def path_decode_attention(q_HD, k_cache_KSD, v_cache_KSD, w_KD, beta_K, length, *, scale, mode,
                          **kw):
  """(o, K), or (o, K, gate) with gate_g."""
  o, m, l, k_new, *gate = partials(q_HD, k_cache_KSD, v_cache_KSD, length, scale=scale,
                                   mode=mode, path_wb=(w_KD, beta_K), **kw)
  return (_merged(q_HD, o, m, l), k_new, *gate)
