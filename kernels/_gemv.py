"""Shared Mosaic-GPU GEMV body for the decode kernels: y = W^T v with fused
prologue (RMSNorm scale) and epilogues (bias, residual, block argmax).

W^T is [N, K] (one output per row). Grid: one CTA per BN rows. Each CTA streams
its [BN, K] slab through SMEM with a TMA pipeline of BK-wide stages, multiplies
by the matching vector slice and reduces along the row. Batch-1 decode is
bandwidth-bound: what matters is keeping enough TMA loads in flight (`stages`)
across enough CTAs, and issuing few enough instructions per weight byte that the
CTAs keep up with them. Two forms of the inner product (`gemv=`, GEMV_FORMS):

  "fma": CUDA-core FMAs in the WGMMA register layout, the vector slice broadcast
         over rows. Each weight element costs ~7.5 SASS instructions on an H100
         (mostly widening bf16 to fp32; docs/kernels.md "Compiled without a GPU").
  "mma": the tensor cores (WGMMA), bf16 or int8 weights. The weight tile is A
         [BN, BK]; B [BK, NB] is built in SMEM each step with the vector split into
         two bf16 parts, hi = bf16(v) in column 0 and lo = bf16(v - hi) in column 1
         (zeros elsewhere), so y = acc[:, 0] + acc[:, 1] carries v to ~16
         significant bits and every product exactly into the fp32 accumulator.
         NB = mma_swizzle / 2: B's rows must be one swizzle wide. bf16 A is read
         from SMEM as TMA lands it (same swizzle as B): no per-element work on the
         CUDA cores. int8 A is widened to bf16 in registers (exact: |w| <= 128) and
         fed to the WGMMA from there, as in mixed-input matmuls (WGMMA multiplies
         like types only, and only A may come from registers): ~2.5 conversion
         instructions per weight, against ~7.5 per weight for the "fma" form's
         widening and FMAs.
  "mma-s8": int8 weights on the int8 tensor cores (s8 x s8 WGMMA into an int32
         accumulator), with no per-weight work on the CUDA cores: the int8 tile is A
         straight from SMEM, and B^T [8, BK] int8 holds the step's vector slice as
         base-128 digits, v = s1 (q_0 + q_1 / 128 + q_2 / 128^2 + q_3 / 128^3), |q_j| <= 64,
         s1 a power of two from the slice's max |v| (s8_digits). The step's int32 columns
         leave through fp32 weights s1 / 128^j. The digits keep v to 2^-27 of the slice's
         max |v| (bf16 values exactly, down to 2^-19 of it); every product and sum before
         the fp32 readout is exact.

RMSNorm fusion: norm(x) = x * g / RMS(x), and 1/RMS(x) is one scalar, so the
CTA accumulates W^T (x * g) and sum(x^2) in the same pass and scales at the end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import _common as C
from kernels.unfinished import Unfinished

ARGMAX_SENTINEL = 2 ** 30


def _weights(m_p, l_p):
  """The merge's weights w_p = e^{m_p - m} and denominator sum_p w_p l_p, from the P
  splits' m_p and l_p: scalars (one head) or vectors (heads side by side). An empty
  split (m = -inf, l = 0) weighs 0."""
  mx = m_p[0]
  for v in m_p[1:]:
    mx = jnp.maximum(mx, v)
  w = [jnp.exp(v - mx) for v in m_p]
  L = w[0] * l_p[0]
  for wp, lp in zip(w[1:], l_p[1:]):
    L = L + wp * lp
  return w, L


def merge_weights(ctx: C.Ctx, m_s, l_s, *, P: int):
  """_weights for every head of the CTA at once, as [Hs] vectors (COL layout) from its
  (m, l) rows m_s, l_s [P, Hs]: computed across the threads, once per CTA
  (vector_weights), instead of as the same scalars in every thread at every step."""
  return _weights([ctx.ld(m_s.at[p], C.COL) for p in range(P)],
                  [ctx.ld(l_s.at[p], C.COL) for p in range(P)])


def vector_weights(Hs: int) -> bool:
  """Whether a CTA with Hs heads computes its merge weights as vectors (a COL vector needs
  whole 8-column tiles) or per step as scalars."""
  return Hs % 8 == 0


def _merged_block(ctx: C.Ctx, op_s, w, L, *, P, Dh, BK, dtype, layout=C.COL):
  """BK columns of the merged split-K attention output o = sum_p w_p o_p / L
  (kernels/decode_attention/reference.merge_splits), rounded to `dtype` as the unfused
  op returns it; fp32 [BK], COL layout. op_s [P, BK]: the partials' columns; w[t][p],
  L[t]: the weights and denominator of the block's head t (BK / Dh heads, or one when
  BK < Dh; _step_weights). layout: the result's register layout (C.ROW for the "mma"
  form's B tile)."""
  f32 = jnp.float32
  nh = len(L)
  col = ctx.iota((BK,), 0, layout)

  def by_column(vals):
    """[BK] vector holding vals[t] on head t's columns."""
    out = jnp.full((BK,), vals[-1], f32)
    for t in range(nh - 2, -1, -1):
      out = jnp.where(col < (t + 1) * Dh, vals[t], out)
    return ctx.cast(out, layout)

  o = ctx.ld(op_s, layout, 0) * by_column([w[t][0] for t in range(nh)])
  for p in range(1, P):
    o = o + ctx.ld(op_s, layout, p) * by_column([w[t][p] for t in range(nh)])
  return (o / by_column(L)).astype(dtype).astype(f32)


def _step_weights(kind: str, a, b, j0, nh: int, P: int):
  """(w[t][p], L[t]) of the block's nh heads j0, j0 + 1, ...: kind "vector", read from
  the precomputed w [P, Hs] and L [Hs] (refs or arrays: a, b); kind "scalars", computed
  here from the CTA's (m, l) rows a, b [P, Hs] as scalars (every thread, every step)."""
  if kind == "vector":
    return ([[a[p, j0 + t] for p in range(P)] for t in range(nh)],
            [b[j0 + t] for t in range(nh)])
  per_head = [_weights([a[p, j0 + t] for p in range(P)], [b[p, j0 + t] for p in range(P)])
              for t in range(nh)]
  return [w for w, _ in per_head], [L for _, L in per_head]


GEMV_FORMS = ("fma", "mma", "mma-s8")
MMA_SWIZZLES = (32, 64, 128)
S8 = "s8"   # check_form's value for gemv="mma-s8" (its B^T rows are 128 bytes)
# "mma" default: B [BK, 32] (64-byte swizzle). The tensor-core work per weight byte grows
# with NB (a [64, BK] tile takes BK/16 HGMMA.64xNBx16): at an H100 SM's share of the
# bandwidth, ~22% of its bf16 rate at NB = 64, ~5% at NB = 16, whose weight tiles then
# arrive in 32-byte TMA rows; registers grow with NB (docs/kernels.md). Not yet timed.
MMA_SWIZZLE = 64


def check_form(gemv: str, mma_swizzle: int | None, w_dtype, name: str) -> int | None:
  """The "mma" form's swizzle (bytes), S8 for "mma-s8", or None for "fma"; a clear error
  for a bad choice."""
  if gemv not in GEMV_FORMS:
    raise ValueError(f"{name}: unknown gemv={gemv!r} (known: {', '.join(GEMV_FORMS)})")
  if gemv == "fma":
    if mma_swizzle is not None:
      raise ValueError(f"{name}: mma_swizzle={mma_swizzle} needs gemv='mma'")
    return None
  if gemv == "mma-s8":
    if mma_swizzle is not None:
      raise ValueError(f"{name}: mma_swizzle={mma_swizzle} needs gemv='mma' (gemv='mma-s8' "
                       "has 128-byte rows)")
    if jnp.dtype(w_dtype) != jnp.dtype(jnp.int8):
      raise ValueError(f"{name}: gemv='mma-s8' needs int8 weights (got {jnp.dtype(w_dtype)}); "
                       "use gemv='mma'")
    return S8
  swizzle = MMA_SWIZZLE if mma_swizzle is None else mma_swizzle
  if swizzle not in MMA_SWIZZLES:
    raise ValueError(f"{name}: mma_swizzle={swizzle} must be one of {MMA_SWIZZLES}")
  if jnp.dtype(w_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int8)):
    raise ValueError(f"{name}: gemv='mma' needs bf16 or int8 weights (got "
                     f"{jnp.dtype(w_dtype)}); use gemv='fma'")
  return swizzle


def mma_b(ctx: C.Ctx, v, *, BK: int, NB: int):
  """B [BK, NB] bf16 (WGMMA layout) for v [BK] (ROW layout): column 0 hi = bf16(v),
  column 1 lo = bf16(v - hi), zeros elsewhere."""
  f32 = jnp.float32
  hi = v.astype(jnp.bfloat16).astype(f32)
  col = ctx.iota((BK, NB), 1, C.WGMMA)
  return jnp.where(col == 0, C.bcast_cols(hi, (BK, NB)),
                   jnp.where(col == 1, C.bcast_cols(v - hi, (BK, NB)), 0.0)).astype(jnp.bfloat16)


def _pow2(e):
  """2^e in fp32, for int32 e (arrays too) in the normal range."""
  return lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


S8_DIGITS = 4


def s8_digits(ctx: C.Ctx, v, *, width: int = 128):
  """The "mma-s8" operand of the fp32 slice v [K] (S8_VEC-like layout): (q, w) with q the
  base-128 digits, fp32 integers in [-64, 64], [8, K] (compiled: B^T, s8_b_layout(width))
  or [K, 8] (interpreters: B), digit j in row (column) j < S8_DIGITS and zeros after; and
  w [8] (COL layout) with v = sum_j w_j q_j to within 2^-27 max |v|.

  s1 = 2^(E - 127) with m = max |v| < 2^(E - 121), so u = v / s1 is |u| < 64, exact. With
  t_j = round(u 128^j), q_j = t_j - 128 t_(j-1) (|q_j| <= 64) telescopes to t_3 / 128^3 =
  u to within 2^-22; each q_j = round(u 128^j - 128 t_(j-1)) is computed exactly (t_j <
  2^24, and the difference is exact). E >= 22 keeps 128^3 / s1 finite and s1 / 128^3
  normal (not flushed to zero): vectors under 2^-100 lose precision (to 2^-127 absolute),
  not range. A NaN or infinite max makes w NaN, so y is too."""
  f32 = jnp.float32
  K = v.shape[0]
  if ctx.interpret:
    shape, axis, vb, lay = (K, 8), 1, C.bcast_cols(v, (K, 8)), None
  else:
    lay = C.s8_b_layout(width)
    shape, axis, vb = (8, K), 0, ctx.cast(C.bcast_rows(v, (8, K)), lay)
  m = jnp.max(jnp.abs(v))
  expo = (lax.bitcast_convert_type(m, jnp.int32) >> 23) & 0xFF
  E = jnp.maximum(expo, 27) - 5
  s1 = lax.bitcast_convert_type(E << 23, f32)
  inv = lax.bitcast_convert_type((254 - E) << 23, f32)
  j = ctx.iota(shape, axis, lay)
  pa = jnp.where(j < S8_DIGITS, _pow2(7 * j), 0.0)
  pb = jnp.where((j >= 1) & (j < S8_DIGITS), _pow2(7 * j - 7), 0.0)
  t = jnp.round(vb * (pb * inv))
  q = jnp.round(vb * (pa * inv) - 128.0 * t)
  col = ctx.iota((8,), 0, C.COL)
  w = jnp.where(col < S8_DIGITS, _pow2(-7 * col), 0.0) * s1 + 0.0 * m
  return q, w


def s8_products(ctx: C.Ctx, w_tiles, q, w, b_s):
  """(w_tiles[i] [BN, BK] int8 @ the digits q) * w, fp32 [BN, 8] (WGMMA layout) per tile:
  s8 WGMMAs against B^T in b_s (written and committed by the caller) into fresh int32
  accumulators, then one wait; or ("hlo") the same integer products in XLA."""
  f32 = jnp.float32
  BN = w_tiles[0].shape[0]
  if not ctx.tma:
    qi = q.astype(jnp.int32)
    outs = [jnp.dot(t[...].astype(jnp.int32), qi, preferred_element_type=jnp.int32)
            for t in w_tiles]
  else:
    b = b_s if ctx.interpret else C.plgpu.transpose_ref(b_s, (1, 0))

    def products(*acc_refs):
      for t, r in zip(w_tiles, acc_refs):
        C.plgpu.wgmma(r, t, b)
      C.plgpu.wgmma_wait(0)   # the weight slots and B^T are free again
      return tuple(r[...] for r in acc_refs)

    outs = pl.run_scoped(products, *[C.plgpu.ACC((BN, 8), jnp.int32)] * len(w_tiles))
  wb = C.bcast_rows(w, (BN, 8))
  return tuple(o.astype(f32) * wb for o in outs)


def s8_step(ctx: C.Ctx, w_tiles, v, accs, mm, *, BK: int):
  """The "mma-s8" mma_step: accs[i] [BN, 8] fp32 + s8_products of this step's digits of v
  (v in S8_VEC: to_s8_vec), through fresh int32 accumulators per step (the digits' scale
  changes per step). mm: with_s8_scratch's (B's SMEM, relayout buffer)."""
  q, w = s8_digits(ctx, v)
  if ctx.tma:
    mm[0][...] = q.astype(jnp.int8)
    C.plgpu.commit_smem()   # B^T visible to the tensor cores; warpgroup barrier
  outs = s8_products(ctx, w_tiles, q, w, mm[0] if mm else None)
  return tuple(a + o for a, o in zip(accs, outs))


def with_s8_scratch(ctx: C.Ctx, fn, *, BK: int, width: int = 128, relayout: bool = False):
  """fn((B's SMEM, relayout SMEM or None)) for s8_step: int8 B^T [8, BK] (compiled: tiled
  and swizzled as WGMMA reads a K-major operand), or B [BK, 8] in the Mosaic-GPU
  interpreter, whose WGMMA takes no transposed operand (it ignores tiling and swizzle);
  with relayout, an fp32 [BK] buffer for to_s8_vec."""
  if ctx.interpret:
    shape, tr = (BK, 8), ()
  else:
    shape = (8, BK)
    tr = (C.plgpu.TilingTransform((8, width)), C.plgpu.SwizzleTransform(width))
  b = C.plgpu.SMEM(shape, jnp.int8, transforms=tr)
  if not relayout:
    return pl.run_scoped(lambda b_s: fn((b_s, None)), b)
  return pl.run_scoped(lambda b_s, v_s: fn((b_s, v_s)), b, C.plgpu.SMEM((BK,), jnp.float32))


def to_s8_vec(ctx: C.Ctx, v, mm):
  """v [BK] (C.strided layout) in S8_VEC, through with_s8_scratch's fp32 buffer: one
  store, a warpgroup barrier and a load. The slice is built (loaded, normed, merged,
  finished) in the strided layout, where each element lives in one thread, against 4 in
  ROW and 32 in S8_VEC (8 rows of B^T). llama-1b-bench int8, 256-column steps, SASS
  instructions per step built in S8_VEC / ROW / strided: the merged O-projection 1618
  (and spills) / 928 / 764, QKV 319 / 290 / 247. Reusing the buffer is safe: every
  thread has read it before the s8_step barrier that precedes the next step's store."""
  if ctx.interpret:
    return v
  v_s = mm[1]
  v_s[...] = v
  C.plgpu.commit_smem()
  return ctx.ld(v_s, C.S8_VEC)


def form_step(ctx: C.Ctx, w_tiles, v, accs, mm, *, mma, BK: int):
  """One pipeline step's products for a tensor-core form (mma: a swizzle, or S8)."""
  if mma == S8:
    return s8_step(ctx, w_tiles, v, accs, mm, BK=BK)
  return mma_step(ctx, w_tiles, v, accs, mm, BK=BK, NB=mma // 2)


def form_acc0(ctx: C.Ctx, BN: int, mma):
  """The pipeline's initial carry for a tensor-core form's accumulator: [BN, NB] fp32
  ("hlo", and S8 everywhere: its accumulator is carried in registers), else a dummy
  (the WGMMA accumulators live in with_mma_scratch's refs)."""
  if mma == S8:
    return ctx.zeros((BN, 8), C.WGMMA)
  return jnp.zeros((BN, mma // 2), jnp.float32) if not ctx.tma else jnp.float32(0)


def form_result(ctx: C.Ctx, acc, mma):
  """y [BN] (ROW layout) from a tensor-core form's accumulator."""
  if mma == S8:   # the digits' weights are in already; columns past S8_DIGITS are zero
    return jnp.sum(acc, axis=1)
  return mma_result(ctx, acc)


def with_form_scratch(ctx: C.Ctx, fn, *, BN: int, BK: int, mma, w_dtype, n_acc: int = 1,
                      relayout: bool = False):
  """with_mma_scratch or with_s8_scratch (compiled, and the Mosaic-GPU interpreter)."""
  if mma == S8:
    return with_s8_scratch(ctx, fn, BK=BK, relayout=relayout)
  return with_mma_scratch(ctx, fn, BN=BN, BK=BK, NB=mma // 2, w_dtype=w_dtype, n_acc=n_acc)


def mma_step(ctx: C.Ctx, w_tiles, v, accs, mm, *, BK: int, NB: int):
  """accs[i] + w_tiles[i] [BN, BK] @ B for each weight tile, one B = mma_b(v) (v [BK],
  ROW layout): WGMMAs into the accumulators of mm = (B's SMEM, acc refs, A staging
  tiles) and one wait, or ("hlo", no tensor cores) the same exact products summed by
  XLA into the carried accs. Returns the accs."""
  b = mma_b(ctx, v, BK=BK, NB=NB)
  if not ctx.tma:
    f32 = jnp.float32
    return tuple(a + jnp.dot(w[...].astype(f32), b.astype(f32), precision=lax.Precision.HIGHEST)
                 for w, a in zip(w_tiles, accs))
  b_s, acc_refs, stage = mm
  a_ops = [C.mma_a(w, stage[i] if stage else None) for i, w in enumerate(w_tiles)]
  b_s[...] = b
  C.plgpu.commit_smem()   # B (and staged A) visible to the tensor cores; warpgroup barrier
  for a, a_ref in zip(a_ops, acc_refs):
    C.plgpu.wgmma(a_ref, a, b_s)
  C.plgpu.wgmma_wait(0)   # the weight slots and B are free again
  return accs


def mma_result(ctx: C.Ctx, acc):
  """y [BN] (ROW layout) from the "mma" accumulator [BN, NB]: acc[:, 0] + acc[:, 1]."""
  col = ctx.iota(acc.shape, 1, C.WGMMA)
  return jnp.sum(jnp.where(col < 2, acc, 0.0), axis=1)


def with_mma_scratch(ctx: C.Ctx, fn, *, BN: int, BK: int, NB: int, w_dtype, n_acc: int = 1):
  """fn((B's SMEM [BK, NB] bf16, n_acc WGMMA accumulators [BN, NB] fp32, A staging
  tiles)). The staging tiles (C.mma_a) exist for int8 weights in the Mosaic-GPU
  interpreter only; elsewhere the tuple is empty. Separate scopes: register allocations
  cannot share a run_scoped with SMEM ones."""
  accs = [C.plgpu.ACC((BN, NB), jnp.float32)] * n_acc
  tr = C.mma_transforms(2 * NB)
  stage = n_acc if C.stages_mma_a(ctx, w_dtype) else 0
  return pl.run_scoped(
      lambda b_s, *st: pl.run_scoped(lambda *refs: fn((b_s, refs, st)), *accs),
      C.plgpu.SMEM((BK, NB), jnp.bfloat16, transforms=tr),
      *[C.plgpu.SMEM((BN, BK), jnp.bfloat16, transforms=tr)] * stage)


def _body(*refs, ctx: C.Ctx, N, K, BN, BK, S, eps, has_norm, has_wscale, has_bias, has_resid,
          argmax, stages, out_f32, raw, merge=None, swiglu=None, xrows=None, prefetch=None,
          mma=None):
  """merge = (P, Dh, dtype): the vector is split-K attention output, merged on the fly
  (_merged_block); its refs (o_p [P, K], m_p [P, K / Dh], l_p) replace v.
  swiglu = (S1, D1, nb1, eps1, dtype): the vector is h = silu(gate) * up of an MLP whose
  gate / up GEMV left its split-K partials unfinished (finished per block in `vector`);
  its refs (part [S1, 2K]: gate rows, then up rows; ss [S1 * nb1], the slices of
  sum(x^2) over D1) replace v.
  xrows = (dtype, (R_1, ...), store): the vector is a kernels.unfinished.Unfinished x,
  finished per block; its refs (base [K], then fp32 [R_i, K] groups) replace v. With
  store, the n = 0 CTAs also write the finished x (their K slices) to a last output.
  mma = the swizzle (bytes) of the "mma" form, None for "fma" (module docstring)."""
  refs = list(refs)
  xo_g = refs.pop() if xrows and xrows[2] else None
  if xrows:
    rdtype, Rs, _ = xrows
    base_g = refs.pop(0)
    grp_g = [refs.pop(0) for _ in Rs]
  elif merge:
    P, Dh, mdtype = merge
    op_g, m_g, l_g = refs.pop(0), refs.pop(0), refs.pop(0)
    Hs = K // S // Dh                        # heads in this CTA's K slice
    nh = max(1, BK // Dh)                    # heads in a block
    vw = vector_weights(Hs)
  elif swiglu:
    S1, D1, nb1, eps1, hdtype = swiglu
    gu_g, ss1_g = refs.pop(0), refs.pop(0)
  else:
    v_g = refs.pop(0)
  g_g = refs.pop(0) if has_norm else None
  w_g = refs.pop(0)
  ws_g = refs.pop(0) if has_wscale else None
  b_g = refs.pop(0) if has_bias else None
  r_g = refs.pop(0) if has_resid else None
  o_g = refs.pop(0)
  if argmax:
    bmax_g, barg_g = refs
  if raw and has_norm:
    (ss_g,) = refs
  n = ctx.axis("n")
  s = ctx.axis("s") if S > 1 else 0
  ks = K // S // BK                          # pipeline steps of this CTA's K slice
  f32 = jnp.float32
  rows = pl.ds(n * BN, BN)
  tr = C.weight_transforms(BK, w_g.dtype, mma)
  # the vector's register layout: along the tile's columns (fma), along B's rows (mma),
  # or (mma-s8) strided, then moved to B^T's columns (to_s8_vec)
  s8_moved = mma == S8
  VL = C.COL if mma is None else (C.strided(BK) if s8_moved else C.ROW)
  # PDL "prefetch": this CTA's first weight tiles head for L2 before the wait.
  ctx.begin(prefetch=[(w_g.at[rows, pl.ds((s * ks + j) * BK, BK)], tr)
                      for j in range(min(prefetch or stages, ks))])
  if swiglu:   # the gate / up GEMV's 1/RMS(x): its slices of sum(x^2), the same for every n
    r1 = lax.rsqrt(sum(ss1_g[t * nb1] for t in range(S1)) / D1 + eps1)

  def vector(idx, vec_s, wts=None):
    """This step's [BK] slice of the vector, fp32, in layout VL. wts: the merge's weight
    scratch (SMEM w [P, Hs], L [Hs]) when vw."""
    if xrows:   # kernels.unfinished.finish, on this block
      base_s, *grp_s = vec_s
      v = ctx.ld(base_s, VL).astype(f32)
      for R, g_s in zip(Rs, grp_s):
        y = ctx.ld(g_s, VL, 0)
        for r in range(1, R):
          y = y + ctx.ld(g_s, VL, r)
        v = (v + y).astype(rdtype).astype(f32)
      return v
    if swiglu:
      g_s, u_s = vec_s
      gate = sum(ctx.ld(g_s, VL, t) for t in range(S1)) * r1
      up = sum(ctx.ld(u_s, VL, t) for t in range(S1)) * r1
      return (C.silu(gate) * up).astype(hdtype).astype(f32)
    if not merge:
      return ctx.ld(vec_s[0], VL).astype(f32)
    j0 = idx[0] * (BK // Dh) if BK >= Dh else idx[0] * BK // Dh
    op_s, m_s, l_s = vec_s
    if not vw:
      w, L = _step_weights("scalars", m_s, l_s, j0, nh, P)
    elif ctx.tma:   # this CTA's weights, computed in its first step into SMEM (wts)
      @pl.when(idx[0] == 0)
      def _():
        wv, Lv = merge_weights(ctx, m_s, l_s, P=P)
        for p in range(P):
          wts[0][p] = wv[p]
        wts[1][...] = Lv
        C.plgpu.commit_smem()   # includes the warpgroup barrier: every row is written

      w, L = _step_weights("vector", *wts, j0, nh, P)
    else:   # "hlo": the same vectors, recomputed per step
      wv, Lv = merge_weights(ctx, m_s, l_s, P=P)
      w, L = _step_weights("vector", jnp.stack(wv), Lv, j0, nh, P)
    return _merged_block(ctx, op_s, w, L, P=P, Dh=Dh, BK=BK, dtype=mdtype, layout=VL)

  def step(idx, *args, xs=None, mm=None, wts=None):
    *vec_s, w_s, (acc, ss) = args
    if has_norm:
      *vec_s, g_s = vec_s
    v = vector(idx, vec_s, wts)
    if xo_g is not None:   # keep the finished x block for the store below
      if xs is not None:
        xs[pl.ds(idx[0] * BK, BK)] = v.astype(xs.dtype)
      else:
        @pl.when(n == 0)
        def _():
          xo_g[pl.ds((s * ks + idx[0]) * BK, BK)] = v.astype(xo_g.dtype)
    vg = v * ctx.ld(g_s, VL).astype(f32) if has_norm else v
    if mma is None:
      acc = acc + jnp.sum(C.widen(w_s[...]) * C.bcast_rows(vg, (BN, BK)), axis=1)
    else:
      if s8_moved:
        vg = to_s8_vec(ctx, vg, mm)
      (acc,) = form_step(ctx, (w_s,), vg, (acc,), mm, mma=mma, BK=BK)
    return acc, (ss + v * v if has_norm else ss)

  vec_spec = lambda: C.plgpu.BlockSpec((BK,), lambda k: (s * ks + k,))
  w_spec = C.plgpu.BlockSpec((BN, BK), lambda k: (n, s * ks + k), transforms=tr)
  if merge:   # o_p columns, and the (m, l) rows of this CTA's heads (K / S / Dh of them)
    ml_spec = lambda: C.plgpu.BlockSpec((P, K // S // Dh), lambda k: (0, s))
    in_specs = [C.plgpu.BlockSpec((P, BK), lambda k: (0, s * ks + k)), ml_spec(), ml_spec()]
    ins = [op_g, m_g, l_g]
  elif xrows:   # [BK] blocks of base, [R_i, BK] column blocks of each group
    in_specs = [vec_spec()] + [C.plgpu.BlockSpec((R, BK), lambda k: (0, s * ks + k))
                               for R in Rs] + ([vec_spec()] if has_norm else [])
    ins = [base_g, *grp_g] + ([g_g] if has_norm else [])
  elif swiglu:   # [S1, BK] column blocks of the gate partials and of the up partials
    in_specs = [C.plgpu.BlockSpec((S1, BK), lambda k: (0, s * ks + k)),
                C.plgpu.BlockSpec((S1, BK), lambda k: (0, K // BK + s * ks + k))]
    ins = [gu_g, gu_g]
  else:
    in_specs = [vec_spec()] + ([vec_spec()] if has_norm else [])
    ins = [v_g] + ([g_g] if has_norm else [])
  in_specs.append(w_spec)
  ins.append(w_g)
  ss0 = ctx.zeros((BK,), VL) if has_norm else jnp.float32(0)
  if mma is None:
    acc0 = ctx.zeros((BN,), C.ROW)
  else:
    acc0 = form_acc0(ctx, BN, mma)

  def run(xs=None):
    def go(mm=None):
      def pipe(*wts):
        return ctx.pipeline(functools.partial(step, xs=xs, mm=mm, wts=wts or None),
                            grid=(ks,), in_specs=in_specs, stages=stages,
                            init_carry=(acc0, ss0))(*ins)

      if merge and vw and ctx.tma:
        out = pl.run_scoped(pipe, C.plgpu.SMEM((P, Hs), f32), C.plgpu.SMEM((Hs,), f32))
      else:
        out = pipe()
      if mm is not None and mma != S8:
        out = (mm[1][0][...], out[1])
      if mma is not None:
        out = (form_result(ctx, out[0], mma), out[1])
      return out

    if mma is None or not ctx.tma:
      return go()
    return with_form_scratch(ctx, go, BN=BN, BK=BK, mma=mma, w_dtype=w_g.dtype,
                             relayout=s8_moved)

  if xo_g is not None and ctx.tma:
    # The finished x slice collects in SMEM (every CTA; cheap) and leaves in one TMA
    # store from the n = 0 CTAs, instead of a waited store per pipeline step.
    def scoped(xs):
      out = run(xs)
      C.plgpu.commit_smem()

      @pl.when(n == 0)
      def _():
        C.plgpu.copy_smem_to_gmem(xs, xo_g.at[pl.ds(s * ks * BK, ks * BK)])

      C.plgpu.wait_smem_to_gmem(0)
      return out

    acc, ss = pl.run_scoped(scoped, C.plgpu.SMEM((ks * BK,), xo_g.dtype))
  else:
    acc, ss = run()
  if raw:
    # Split-K (or raw): this CTA's partial dot products (and its slice of sum(x^2)); the
    # tiny epilogue (sum over S, 1/RMS, bias, residual) runs in XLA or the next kernel.
    ctx.store(acc, o_g.at[pl.ds(s * N + n * BN, BN)])
    if has_norm:
      ss_g[s * (N // BN) + n] = jnp.sum(ss)
    return
  y = acc * lax.rsqrt(jnp.sum(ss) / K + eps) if has_norm else acc
  if has_wscale:   # int8 W: the per-row scale factors out of the dot product
    y = y * ctx.load(ws_g.at[rows], lambda s: ctx.ld(s, C.ROW).astype(f32))
  if has_bias:
    y = y + ctx.load(b_g.at[rows], lambda s: ctx.ld(s, C.ROW).astype(f32))
  if has_resid:
    y = y + ctx.load(r_g.at[rows], lambda s: ctx.ld(s, C.ROW).astype(f32))
  if not out_f32:
    y = y.astype(o_g.dtype).astype(f32)   # what the caller sees (argmax must agree)
  ctx.store(y, o_g.at[rows])
  if argmax:
    m = jnp.max(y)
    idx = ctx.iota((BN,), 0, C.ROW) + n * BN
    bmax_g[n] = m
    barg_g[n] = jnp.min(jnp.where(y == m, idx, ARGMAX_SENTINEL))


# Split-K aims for at least this many CTAs (an H100 has 132 SMs; a 2048-row QKV or
# output projection in 64-row blocks gives only 32-48 CTAs, too few loads in flight).
TARGET_CTAS = 128
MAX_SPLIT = 8


def pick_split(n_blocks: int, K: int, BK: int) -> int:
  """Smallest power-of-two split of K giving >= TARGET_CTAS CTAs (each slice a whole
  number of BK blocks; at most MAX_SPLIT)."""
  S = 1
  while n_blocks * S < TARGET_CTAS and S < MAX_SPLIT and K % (2 * S * BK) == 0:
    S *= 2
  return S


def _blocks(N: int, K: int, *, mode: str, block_n, block_k, split_k, argmax: bool, name: str,
            mma: int | None = None):
  """(BN, BK, S) for a [N, K] GEMV: checked blocks and the split of K. The "mma" form
  (mma = its swizzle) needs BK in whole 64-row B tiles (the WGMMA row layout of v); the
  "mma-s8" form (S8) in whole 128-byte rows, up to 256 per step when compiled (its digit
  work is per vector element, so wider steps spread it over more weight bytes)."""
  interp = mode != "compile"
  kmult = 32 if mma is None else (128 if mma == S8 else max(64, mma // 2))
  BN = block_n or C.pick_block(N, 256 if interp else 64, 64, "N")
  BK = block_k or C.pick_block(K, 512 if interp else (256 if mma == S8 else 128), kmult, "K")
  C.check_block(N, BN, 64, "N")
  C.check_block(K, BK, kmult, "K")
  if split_k is None:
    S = 1 if argmax else pick_split(N // BN, K, BK)
  else:
    S = split_k
    if S < 1 or K % (S * BK):
      raise ValueError(f"{name}: split_k={S} must be >= 1 and divide K={K} into whole "
                       f"blocks of {BK}")
    if argmax and S > 1:
      raise ValueError(f"{name}: split_k > 1 is not supported with argmax")
  return BN, BK, S


def _kernel(N, K, BN, BK, S, *, raw: bool, eps, argmax, stages, out_dtype, flags, mode, name,
            w_dtype, merge=None, swiglu=None, rows=None, pdl=None, prefetch_tiles=None,
            mma=None):
  C.check_prefetch(prefetch_tiles, BN * BK * jnp.dtype(w_dtype).itemsize, name, pdl, mode)
  if raw:
    out_type = [jax.ShapeDtypeStruct((S * N,), jnp.float32)]
    if flags["has_norm"]:
      out_type += [jax.ShapeDtypeStruct((S * (N // BN),), jnp.float32)]
    flags = dict(flags, has_wscale=False, has_bias=False, has_resid=False)
  else:
    out_type = [jax.ShapeDtypeStruct((N,), out_dtype)]
    if argmax:
      out_type += [jax.ShapeDtypeStruct((N // BN,), jnp.float32),
                   jax.ShapeDtypeStruct((N // BN,), jnp.int32)]
  if rows and rows[2]:   # the finished x
    out_type += [jax.ShapeDtypeStruct((K,), rows[0])]
  grid, grid_names = ((N // BN, S), ("n", "s")) if S > 1 else ((N // BN,), ("n",))
  return C.mosaic_kernel(
      lambda *r, ctx: _body(*r, ctx=ctx, N=N, K=K, BN=BN, BK=BK, S=S, eps=eps, argmax=argmax,
                            stages=stages, out_f32=out_dtype == jnp.float32, raw=raw,
                            merge=merge, swiglu=swiglu, xrows=rows, prefetch=prefetch_tiles,
                            mma=mma, **flags),
      out_type=tuple(out_type) if len(out_type) > 1 else out_type[0], grid=grid,
      grid_names=grid_names, mode=mode, name=name, pdl=pdl,
      # the merge's P weights per head, e^(m_p - m): 2 instructions each as ex2.approx
      # instead of ~10 (the kernel's only approximable op)
      approx_math=merge is not None)


def _rows(v_K, store: bool = False):
  """(the kernel's `rows` option, its vector operands) for v_K, an array or an
  Unfinished vector (kernels/unfinished.py)."""
  if not isinstance(v_K, Unfinished):
    if store:
      raise ValueError("store_x needs an Unfinished vector")
    return None, [v_K]
  return ((jnp.dtype(v_K.dtype), tuple(r.shape[0] for r in v_K.rows), store),
          [v_K.base_D, *v_K.rows])


def gemv_partials(v_K, w_t_NK, *, scale_K=None, mode: str, block_n: int | None = None,
                  block_k: int | None = None, stages: int = 2, split_k: int | None = None,
                  name: str = "gemv", pdl: str | None = None,
                  prefetch_tiles: int | None = None, store_x: bool = False,
                  gemv: str = "fma", mma_swizzle: int | None = None):
  """The GEMV kernel without its epilogue, for a next kernel to finish (e.g. the fused
  QKV + RoPE + append): (part f32 [S, N], the unscaled partial dot products W^T (v * g)
  over S slices of K; ss f32 [S * N/BN] or None, block (s, n)'s slice of sum(v^2), the
  same for every n). Finish: y = sum_s part[s] * rsqrt(sum_s ss[s * N/BN] / K + eps).

  v_K may be Unfinished (finished block by block as it streams); with store_x the
  finished v [K] is a third result (written by the n = 0 CTAs). gemv / mma_swizzle: the
  inner product's form (module docstring)."""
  N, K = w_t_NK.shape
  rows, vec = _rows(v_K, store_x)
  kern, S = _partials_kernel(N, K, w_t_NK.dtype, has_norm=scale_K is not None, rows=rows,
                             mode=mode, name=name, block_n=block_n, block_k=block_k,
                             split_k=split_k, stages=stages, pdl=pdl,
                             prefetch_tiles=prefetch_tiles, gemv=gemv, mma_swizzle=mma_swizzle)
  outs = kern(*vec, *([scale_K] if scale_K is not None else []), w_t_NK)
  outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
  x = outs.pop() if store_x else None
  part, ss = (outs if scale_K is not None else (outs[0], None))
  return (part.reshape(S, N), ss) + ((x,) if store_x else ())


def _partials_kernel(N, K, w_dtype, *, has_norm=False, merge=None, swiglu=None, rows=None,
                     mode, name, block_n, block_k, split_k, stages, pdl, prefetch_tiles,
                     gemv="fma", mma_swizzle=None):
  """(the raw GEMV kernel over a [N, K] weight, its split S): the partials' form shared
  by gemv_partials, gemv_partials_merged and gemv_partials_swiglu."""
  mma = check_form(gemv, mma_swizzle, w_dtype, name)
  BN, BK, S = _blocks(N, K, mode=mode, block_n=block_n, block_k=block_k, split_k=split_k,
                      argmax=False, name=name, mma=mma)
  flags = dict(has_norm=has_norm, has_wscale=False, has_bias=False, has_resid=False)
  return _kernel(N, K, BN, BK, S, raw=True, eps=0.0, argmax=False, stages=stages,
                 out_dtype=jnp.float32, flags=flags, mode=mode, name=name, w_dtype=w_dtype,
                 merge=merge, swiglu=swiglu, rows=rows, pdl=pdl,
                 prefetch_tiles=prefetch_tiles, mma=mma), S


def merge_ok(n_heads: int, head_dim: int, N: int, K: int, *, mode: str,
             block_n: int | None = None, block_k: int | None = None,
             split_k: int | None = None, gemv: str = "fma",
             mma_swizzle: int | None = None, w_dtype=jnp.bfloat16) -> bool:
  """Whether gemv_partials_merged compiles at these shapes: every CTA's K slice holds
  whole heads, a block holds whole heads (or lies inside one), and on GPU the slice's
  per-head (m, l) rows are a whole TMA box (>= 4 fp32, i.e. 16 bytes)."""
  try:
    mma = check_form(gemv, mma_swizzle, w_dtype, "merge")
    BN, BK, S = _blocks(N, K, mode=mode, block_n=block_n, block_k=block_k, split_k=split_k,
                        argmax=False, name="merge", mma=mma)
  except ValueError:
    return False
  Hs, rem = divmod(K // S, head_dim)
  return (rem == 0 and (BK % head_dim == 0 or head_dim % BK == 0)
          and (mode != "compile" or Hs % 4 == 0) and n_heads * head_dim == K)


def gemv_partials_merged(o_PHD, m_PH, l_PH, w_t_NK, *, dtype, mode: str,
                         block_n: int | None = None, block_k: int | None = None,
                         stages: int = 2, split_k: int | None = None, name: str = "gemv",
                         pdl: str | None = None, prefetch_tiles: int | None = None,
                         gemv: str = "fma", mma_swizzle: int | None = None):
  """gemv_partials of W^T o, where o [Hq * Dh] is the merge of split-K attention partials
  (o_p [P, Hq, Dh], m_p / l_p [P, Hq]; kernels/decode_attention/pallas.partials, split
  axis first) rounded to `dtype`: the merge runs inside the GEMV, on each block of
  columns as it streams, instead of in XLA before it. Returns part f32 [S, N]."""
  P, Hq, Dh = o_PHD.shape
  N, K = w_t_NK.shape
  if K != Hq * Dh or m_PH.shape != (P, Hq) or l_PH.shape != (P, Hq):
    raise ValueError(f"{name}: attention partials o {o_PHD.shape}, m {m_PH.shape}, l "
                     f"{l_PH.shape} do not fit W^T {w_t_NK.shape}")
  if not merge_ok(Hq, Dh, N, K, mode=mode, block_n=block_n, block_k=block_k, split_k=split_k,
                  gemv=gemv, mma_swizzle=mma_swizzle, w_dtype=w_t_NK.dtype):
    raise ValueError(f"{name}: the merged attention output ({Hq} heads x {Dh}) does not fit "
                     f"the GEMV's blocks (K slices and blocks of whole heads; on GPU >= 4 "
                     "heads per K slice)")
  kern, S = _partials_kernel(N, K, w_t_NK.dtype, merge=(P, Dh, jnp.dtype(dtype)), mode=mode,
                             name=name, block_n=block_n, block_k=block_k, split_k=split_k,
                             stages=stages, pdl=pdl, prefetch_tiles=prefetch_tiles,
                             gemv=gemv, mma_swizzle=mma_swizzle)
  part = kern(o_PHD.reshape(P, K), m_PH, l_PH, w_t_NK)
  return part.reshape(S, N)


def gemv_partials_swiglu(part_S2F, ss, w_t_DF, *, norm_size: int, eps: float, dtype, mode: str,
                         block_n: int | None = None, block_k: int | None = None,
                         stages: int = 2, split_k: int | None = None, name: str = "gemv",
                         pdl: str | None = None, prefetch_tiles: int | None = None,
                         gemv: str = "fma", mma_swizzle: int | None = None):
  """gemv_partials of W_down^T h, where h = silu(gate) * up [F] (rounded to `dtype`, as
  the MLP kernel rounds it) is finished from the gate / up GEMV's unfinished partials:
  part_S2F [S1, 2F] (gemv_partials of [W_gate^T; W_up^T] with the norm scale) and its
  ss [S1 * nb]; norm_size (D) and eps give that GEMV's 1/RMS. The finishing runs on
  each block of columns as it streams. Returns part f32 [S, D]."""
  S1, F2 = part_S2F.shape
  N, F = w_t_DF.shape
  if F2 != 2 * F or ss.shape[0] % S1:
    raise ValueError(f"{name}: gate/up partials {part_S2F.shape} (ss {ss.shape}) do not fit "
                     f"W_down^T {w_t_DF.shape}")
  kern, S = _partials_kernel(N, F, w_t_DF.dtype,
                             swiglu=(S1, norm_size, ss.shape[0] // S1, eps, jnp.dtype(dtype)),
                             mode=mode, name=name, block_n=block_n, block_k=block_k,
                             split_k=split_k, stages=stages, pdl=pdl,
                             prefetch_tiles=prefetch_tiles, gemv=gemv, mma_swizzle=mma_swizzle)
  return kern(part_S2F, ss, w_t_DF).reshape(S, N)


def gemv(v_K, w_t_NK, *, scale_K=None, w_scale_N=None, bias_N=None, resid_N=None,
         eps: float = 0.0, argmax: bool = False, out_dtype=None, mode: str,
         block_n: int | None = None, block_k: int | None = None, stages: int = 2,
         split_k: int | None = None, name: str = "gemv", pdl: str | None = None,
         prefetch_tiles: int | None = None, gemv: str = "fma", mma_swizzle: int | None = None):
  """y = W^T (norm(v) or v) (* w_scale) (+ bias) (+ resid), and optionally per-block
  (max, argmax). int8 W^T streams as int8 (half the bytes of bf16) and is converted in
  registers; its fp32 per-row scale w_scale_N multiplies each finished dot product.

  Returns y [N] (out_dtype, default v.dtype), plus (block_max f32 [N/BN],
  block_argmax int32 [N/BN]) when argmax=True. `split_k` (None: `pick_split`;
  never with argmax) splits the reduction over that many CTAs per row block. v_K may
  be Unfinished (finished block by block as it streams). gemv: "fma" (CUDA cores),
  "mma" (tensor cores, bf16 or int8 W; mma_swizzle) or "mma-s8" (int8 tensor cores, int8
  W) (module docstring).
  """
  N, K = w_t_NK.shape
  rows, vec = _rows(v_K)
  mma = check_form(gemv, mma_swizzle, w_t_NK.dtype, name)
  BN, BK, S = _blocks(N, K, mode=mode, block_n=block_n, block_k=block_k, split_k=split_k,
                      argmax=argmax, name=name, mma=mma)
  out_dtype = jnp.dtype(v_K.dtype if out_dtype is None else out_dtype)
  flags = dict(has_norm=scale_K is not None, has_wscale=w_scale_N is not None,
               has_bias=bias_N is not None, has_resid=resid_N is not None)
  kern = _kernel(N, K, BN, BK, S, raw=S > 1, eps=eps, argmax=argmax, stages=stages,
                 out_dtype=out_dtype, flags=flags, mode=mode, name=name, pdl=pdl,
                 w_dtype=w_t_NK.dtype, rows=rows, prefetch_tiles=prefetch_tiles, mma=mma)
  args = vec + ([scale_K] if flags["has_norm"] else []) + [w_t_NK]
  if S == 1:
    args += [a for a in (w_scale_N, bias_N, resid_N) if a is not None]
    return kern(*args)
  outs = kern(*args)
  part, ss = (outs if flags["has_norm"] else (outs, None))
  y = jnp.sum(part.reshape(S, N), axis=0)
  if flags["has_norm"]:
    y = y * lax.rsqrt(jnp.sum(ss.reshape(S, N // BN)[:, 0]) / K + eps)
  if flags["has_wscale"]:
    y = y * w_scale_N.astype(jnp.float32)
  if flags["has_bias"]:
    y = y + bias_N.astype(jnp.float32)
  if flags["has_resid"]:
    y = y + resid_N.astype(jnp.float32)
  return y.astype(out_dtype)
