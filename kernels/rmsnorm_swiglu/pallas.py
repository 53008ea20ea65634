"""Mosaic-GPU kernel: fused RMSNorm + SwiGLU MLP + residual, split over the hidden dim.

Grid: one CTA per BF hidden units. CTA p
  1. streams its [BF, D] slabs of W_gate^T and W_up^T with x and g (TMA
     pipeline), accumulating both GEMVs and sum(x^2) (norm fused as in _gemv);
  2. forms h = silu(gate) * up for its BF units, in registers;
  3. streams its [BF, D] slab of W_down (natural [F, D] layout) and writes the
     partial product h^T W_down[p] (fp32, [D]) to row p of a partials buffer.
No CTA needs another's h, so no grid-wide barrier is needed; the F/BF partial
rows are summed with the residual by one small XLA reduction (F/BF * D * 4
bytes, ~1% of the MLP weight bytes at Llama sizes).

int8 weights stream as int8 and convert in registers; the gate/up row scales
multiply the finished dot products in the CTA, and the down projection's column
scale each down block of the CTA's partial row (it is constant along the
reduction). Scaled there, not after the XLA sum: XLA then compiles the epilogue
(x, finished with the O-projection's scale, plus the partial rows) as one
reduction kernel, where a scale on the rows left x's finish in a kernel of its own.

gemv="mma" puts both phases on the tensor cores, as kernels/_gemv.py does for its
GEMVs: the gate and up tiles are WGMMA A operands against one B per step built from
x * g (hi / lo bf16 columns). The down phase's operand holds h alone (h is rounded to
bf16 before it, so no lo part): with W_down [F, D] the tile [BF, BD] is B and A
[64, BF] holds h in row j at step j, so the partial row collects in the accumulator's
rows and leaves in one store (store_once's form, always); with W_down^T [D, F] the
tile [BD, BF] is A and B [BF, NB] holds h (hi / lo columns), built once. int8 weights enter
as A only (widened to bf16 in registers, _gemv), so with int8 W_down [F, D] the down
phase stays on the CUDA cores; W_down^T puts it on the tensor cores too.

gemv="mma-s8" (int8 weights) does the same on the int8 tensor cores: the gate / up tiles
against one B^T of x * g's int8 digits per step (_gemv.s8_step), and with W_down^T the
down tiles against h's digits, built once with one scale for all of h.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import _common as C
from kernels import _gemv


def finish_x(resid, part_SD, w_scale_D=None):
  """The output projection's split-K partials finished as out_proj_residual does:
  x = dtype(resid + (part[0] + part[1] + ...) * w_scale), summed in this order in the
  kernel and in XLA alike, so both see the same x bit for bit."""
  y = part_SD[0]
  for s in range(1, part_SD.shape[0]):
    y = y + part_SD[s]
  if w_scale_D is not None:
    y = y * w_scale_D.astype(jnp.float32)
  return (resid.astype(jnp.float32) + y).astype(resid.dtype)


def _row_to_col(ctx: C.Ctx, v, n: int, layout=C.COL):
  """[n] vector in the row layout (one value per WGMMA row) -> the column layout (or
  `layout`)."""
  if ctx.interpret:
    return v

  def body(s):
    s[...] = v
    C.plgpu.commit_smem()   # includes the warpgroup barrier: every thread's value is in
    return ctx.ld(s, layout)

  return pl.run_scoped(body, C.plgpu.SMEM((n,), jnp.float32))


def _mma_down_rows(ctx: C.Ctx, h, wd_g, part_g, *, p, D, BF, BD, tr, stages):
  """The down projection with W_down [F, D] on the tensor cores. Step j's [BF, BD] tile
  is B and A [64, BF] holds h in row j only, so row j of one [64, BD] accumulator
  collects output block j, and the D / BD rows leave in one store at the end (h in a
  fixed row would cost a 64-row reduction across the warps per step). part_g: the
  [F/BF, R, BD] partial rows, R = D / BD rounded up to whole 8-row tiles (the rows past
  D / BD stay zero)."""
  f32, bf16 = jnp.float32, jnp.bfloat16
  n, R = D // BD, part_g.shape[1]
  hrows = C.bcast_rows(_row_to_col(ctx, h, BF), (64, BF))
  row = ctx.iota((64, BF), 0, C.WGMMA)
  a_j = lambda j: jnp.where(row == j, hrows, 0.0).astype(bf16)
  spec = C.plgpu.BlockSpec((BF, BD), lambda j: (p, j), transforms=tr)
  if not ctx.tma:   # the same exact products, summed by XLA
    def step(idx, wd_s, acc):
      return acc + jnp.dot(a_j(idx[0]).astype(f32), wd_s[...].astype(f32),
                           precision=lax.Precision.HIGHEST)

    acc = ctx.pipeline(step, grid=(n,), in_specs=[spec], stages=stages,
                       init_carry=jnp.zeros((64, BD), f32))(wd_g)
    ctx.store(acc, part_g.at[p], rows=R)
    return

  def scoped(a_s, acc_ref):
    def step(idx, wd_s):
      a_s[...] = a_j(idx[0])
      C.plgpu.commit_smem()   # A visible to the tensor cores (and the warpgroup barrier)
      C.plgpu.wgmma(acc_ref, a_s, wd_s)
      C.plgpu.wgmma_wait(0)   # the weight slot and A are free again

    ctx.pipeline(step, grid=(n,), in_specs=[spec], stages=stages)(wd_g)
    ctx.store(acc_ref[...], part_g.at[p], C.tile_transforms(BD, f32), rows=R)

  pl.run_scoped(lambda a_s: pl.run_scoped(lambda acc_ref: scoped(a_s, acc_ref),
                                          C.plgpu.ACC((64, BD), f32)),
                C.plgpu.SMEM((64, BF), bf16, transforms=tr))


def _body(*refs, ctx: C.Ctx, D, BF, BK, BD, eps, stages, store_once, int8, x_parts,
          down_t=False, prefetch=None, mma=None, mma_down=False):
  """x_parts = (S_o, has_scale): x arrives unfinished, as the residual, the output
  projection's S_o split-K partial rows [S_o, D] (and its int8 row scale), and is
  finished block by block as it streams (finish_x). down_t: the down weight is W_down^T
  [D, F] (see below). mma: the "mma" form's swizzle (bytes), None for "fma"; mma_down:
  whether the down phase takes it too (_call)."""
  refs = list(refs)
  if x_parts:
    S_o, has_oscale = x_parts
    x_in = [refs.pop(0), refs.pop(0)] + ([refs.pop(0)] if has_oscale else [])
  else:
    x_in = [refs.pop(0)]
  g_g, wg_g, wu_g, wd_g = refs[:4]
  del refs[:4]
  if int8:
    sg_g, su_g, sd_g, part_g = refs
  else:
    (part_g,) = refs
  p = ctx.axis("f")
  f32 = jnp.float32
  tr = C.weight_transforms(BK, wg_g.dtype, mma)
  # x's register layout: along the tiles' columns (fma), along B's rows (mma), or
  # (mma-s8) strided, then moved to B^T's columns (_gemv.to_s8_vec)
  s8_moved = mma == _gemv.S8
  VL = C.COL if mma is None else (C.strided(BK) if s8_moved else C.ROW)
  NB = None if mma in (None, _gemv.S8) else mma // 2
  dtype = x_in[0].dtype
  # PDL "prefetch": the first gate and up tiles head for L2 before the wait.
  ctx.begin(prefetch=[(w.at[pl.ds(p * BF, BF), pl.ds(j * BK, BK)], tr)
                      for j in range(min(prefetch or stages, D // BK)) for w in (wg_g, wu_g)])

  def x_block(xs):
    if not x_parts:
      return ctx.ld(xs[0], VL).astype(f32)
    r_s, op_s = xs[:2]
    y = ctx.ld(op_s, VL, 0)
    for s in range(1, S_o):
      y = y + ctx.ld(op_s, VL, s)
    if has_oscale:
      y = y * ctx.ld(xs[2], VL)
    return (ctx.ld(r_s, VL).astype(f32) + y).astype(dtype).astype(f32)

  def up_step(_, *args, mm=None):
    *xs, g_s, wg_s, wu_s, carry = args
    acc_g, acc_u, ss = carry
    x = x_block(xs)
    xg = x * ctx.ld(g_s, VL).astype(f32)
    if s8_moved:
      xg = _gemv.to_s8_vec(ctx, xg, mm)
    if mma is None:
      xg = C.bcast_rows(xg, (BF, BK))
      acc_g = acc_g + jnp.sum(C.widen(wg_s[...]) * xg, axis=1)
      acc_u = acc_u + jnp.sum(C.widen(wu_s[...]) * xg, axis=1)
    else:   # both tiles against one B
      acc_g, acc_u = _gemv.form_step(ctx, (wg_s, wu_s), xg, (acc_g, acc_u), mm, mma=mma,
                                     BK=BK)
    return acc_g, acc_u, ss + x * x

  vec = lambda: C.plgpu.BlockSpec((BK,), lambda k: (k,))
  mat = lambda: C.plgpu.BlockSpec((BF, BK), lambda k: (p, k), transforms=tr)
  x_specs = [vec()] if not x_parts else (
      [vec(), C.plgpu.BlockSpec((S_o, BK), lambda k: (0, k))] + ([vec()] if has_oscale else []))
  if mma is None:
    acc0 = ctx.zeros((BF,), C.ROW)
  else:
    acc0 = _gemv.form_acc0(ctx, BF, mma)

  def gate_up(mm=None):
    out = ctx.pipeline(functools.partial(up_step, mm=mm), grid=(D // BK,),
                       in_specs=x_specs + [vec(), mat(), mat()], stages=stages,
                       init_carry=(acc0, acc0, ctx.zeros((BK,), VL)))(*x_in, g_g, wg_g, wu_g)
    if mm is not None and mma != _gemv.S8:
      out = (mm[1][0][...], mm[1][1][...], out[2])
    if mma is not None:
      out = (_gemv.form_result(ctx, out[0], mma), _gemv.form_result(ctx, out[1], mma), out[2])
    return out

  if mma is None or not ctx.tma:
    acc_g, acc_u, ss = gate_up()
  else:
    acc_g, acc_u, ss = _gemv.with_form_scratch(ctx, gate_up, BN=BF, BK=BK, mma=mma,
                                               w_dtype=wg_g.dtype, n_acc=2,
                                               relayout=s8_moved)
  r = lax.rsqrt(jnp.sum(ss) / D + eps)
  if int8:
    rows = pl.ds(p * BF, BF)
    load_row = lambda s: ctx.ld(s, C.ROW).astype(f32)
    acc_g = acc_g * ctx.load(sg_g.at[rows], load_row)
    acc_u = acc_u * ctx.load(su_g.at[rows], load_row)
  h = C.silu(acc_g * r) * (acc_u * r)                       # [BF], ROW layout
  # The down projection's operand dtype, as in XLA: the weights' (int8: the activations').
  op_dtype = dtype if int8 else wd_g.dtype
  if jnp.dtype(op_dtype) != jnp.float32:
    h = h.astype(op_dtype).astype(f32)

  # bf16 weights: h is exact in bf16 (rounded above), so A's h rows need no lo part.
  if mma_down and not down_t:
    _mma_down_rows(ctx, h, wd_g, part_g, p=p, D=D, BF=BF, BD=BD, tr=tr, stages=stages)
    return
  s8 = mma == _gemv.S8
  if mma_down and s8:
    # A = the [BD, BF] int8 tile straight from SMEM, B^T [8, BF] = h's base-128 digits with
    # one scale for all of h (h is whole here), built once; each step's int32 columns
    # leave through the digits' weights.
    hv = _row_to_col(ctx, h, BF, None if ctx.interpret else C.s8_b_layout(BF).reduce(0))
    op, w8 = _gemv.s8_digits(ctx, hv, width=BF)
    down_spec = C.plgpu.BlockSpec((BD, BF), lambda j: (j, p),
                                 transforms=C.weight_transforms(BF, wd_g.dtype, mma))

    def down_product(wd_s, b_s):
      return jnp.sum(_gemv.s8_products(ctx, (wd_s,), op, w8, b_s)[0], axis=1)
    down_layout = C.ROW
  elif mma_down:   # A = the [BD, BF] tile, B [BF, NB] = h's hi / lo columns, built once
    op = _gemv.mma_b(ctx, h, BK=BF, NB=NB)   # (lo = 0 unless h is fp32: int8 W, fp32 x)
    down_spec = C.plgpu.BlockSpec((BD, BF), lambda j: (j, p),
                                 transforms=C.weight_transforms(BF, wd_g.dtype, mma))

    def down_product(wd_s, op_s):
      return _gemv.mma_result(ctx, C.mma_product(ctx, wd_s, op_s, (BD, NB),
                                                 refs=(True, ctx.tma), swizzle=mma))
    down_layout = C.ROW
  elif down_t:
    # W_down^T [D, F]: [BD, BF] blocks of this CTA's columns and one row reduction per
    # block (as in the other GEMVs), where the [F, D] layout reduces each [BF, BD] block
    # over rows, i.e. across the warpgroup's four warps (through SMEM). h moves from the
    # row layout to the column layout once, through SMEM.
    hc = _row_to_col(ctx, h, BF)
    down_spec = C.plgpu.BlockSpec((BD, BF), lambda j: (j, p),
                                 transforms=C.tile_transforms(BF, wd_g.dtype))

    def down_product(wd_s, _):
      return jnp.sum(C.widen(wd_s[...]) * C.bcast_rows(hc, (BD, BF)), axis=1)
    down_layout = C.ROW
  else:
    down_spec = C.plgpu.BlockSpec((BF, BD), lambda j: (p, j),
                                 transforms=C.tile_transforms(BD, wd_g.dtype))

    def down_product(wd_s, _):
      return jnp.sum(C.widen(wd_s[...]) * C.bcast_cols(h, (BF, BD)), axis=0)
    down_layout = C.COL

  # int8: the down blocks leave scaled (the column scale's [BD] block, one more input)
  down_specs = [down_spec] + ([C.plgpu.BlockSpec((BD,), lambda j: (j,))] if int8 else [])
  down_ins = [wd_g] + ([sd_g] if int8 else [])

  def down_block(op_s, wd_s, *sd_s):
    y = down_product(wd_s, op_s)
    return y * ctx.ld(sd_s[0], down_layout) if sd_s else y

  def down(op_s=None):
    if store_once and ctx.tma:
      # The partial row goes to one [D] fp32 SMEM buffer and leaves with a single TMA
      # store, instead of one waited store per pipeline step (D/BD waits per CTA).
      def once(row_s):
        def down_step(idx, *blocks):
          row_s[pl.ds(idx[0] * BD, BD)] = down_block(op_s, *blocks)

        ctx.pipeline(down_step, grid=(D // BD,), in_specs=down_specs, stages=stages)(*down_ins)
        C.plgpu.commit_smem()
        C.plgpu.copy_smem_to_gmem(row_s, part_g.at[p])
        C.plgpu.wait_smem_to_gmem(0)

      pl.run_scoped(once, C.plgpu.SMEM((D,), jnp.float32))
      return

    def down_step(idx, *blocks):
      ctx.store(down_block(op_s, *blocks), part_g.at[p, pl.ds(idx[0] * BD, BD)])

    # Outputs are stored from the body (the Mosaic-GPU interpreter does not
    # support emit_pipeline out_specs, whose copies are predicated).
    ctx.pipeline(down_step, grid=(D // BD,), in_specs=down_specs, stages=stages)(*down_ins)

  if not mma_down or not ctx.tma:
    down(op if mma_down else None)
    return

  def with_operand(op_s):   # h's operand in SMEM, for every down step's WGMMA
    op_s[...] = op.astype(op_s.dtype)
    C.plgpu.commit_smem()
    down(op_s)

  if s8:
    _gemv.with_s8_scratch(ctx, lambda mm: with_operand(mm[0]), BK=BF, width=BF)
    return
  pl.run_scoped(with_operand, C.plgpu.SMEM(op.shape, jnp.bfloat16,
                                           transforms=C.mma_transforms(mma)))


def _call(x_in, x_parts, scale_D, w_gate_t_FD, w_up_t_FD, w_down, scales, *, eps, mode,
          down_t: bool = False, block_f: int | None = None, block_k: int | None = None,
          block_d: int | None = None, stages: int = 2, store_once: bool = False,
          pdl: str | None = None, prefetch_tiles: int | None = None, gemv: str = "fma",
          mma_swizzle: int | None = None):
  """The kernel's [F/BF, D] fp32 partial rows of the down projection (int8: times the
  down scale; scales = (gate, up, down) scales or Nones). w_down: W_down
  [F, D], or W_down^T [D, F] with down_t=True. gemv / mma_swizzle: the inner products'
  form (kernels/_gemv.py; "mma": bf16 or int8 weights, BK in whole 64-row B tiles, BD in
  whole swizzle rows of the down tile, at most 256 columns with bf16 W_down [F, D])."""
  F, D = w_gate_t_FD.shape
  interp = mode != "compile"
  mma = _gemv.check_form(gemv, mma_swizzle, w_gate_t_FD.dtype, "rmsnorm_swiglu")
  if mma is not None:
    _gemv.check_form(gemv, mma_swizzle, w_down.dtype, "rmsnorm_swiglu")
  int8 = scales[0] is not None
  s8 = mma == _gemv.S8
  # the down phase on the tensor cores: bf16 weights, or int8 ones as A (W_down^T only)
  mma_down = mma is not None and (not int8 or down_t)
  kmult = 32 if mma is None else (128 if s8 else max(64, mma // 2))
  dmult = 32 if not mma_down else (64 if down_t else mma // 2)
  dcap = 512 if interp else 128
  if mma_down and not down_t:
    dcap = min(dcap, 256)   # the WGMMA's N
  rows_out = mma_down and not down_t   # _mma_down_rows
  BF = block_f or C.pick_block(F, 256 if interp else 64, 64, "F")
  BK = block_k or C.pick_block(D, 512 if interp else (256 if s8 else 128), kmult, "D")
  BD = block_d or C.pick_block(D, dcap, dmult, "D")
  if rows_out and not block_d and D // BD > 64:   # wider blocks: at most 64 of them
    BD = min([b for b in range(BD, 257, dmult) if D % b == 0 and D // b <= 64], default=BD)
  C.check_block(F, BF, 64, "F")
  C.check_block(D, BK, kmult, "D")
  C.check_block(D, BD, dmult, "D")
  if s8 and down_t and not interp and BF not in (64, 128):
    raise ValueError(f"rmsnorm_swiglu: block_f={BF} must be 64 or 128 with gemv='mma-s8' "
                     "and W_down^T (h's digits are one 64- or 128-byte row)")
  if rows_out and (BD > 256 or D // BD > 64):
    raise ValueError(f"rmsnorm_swiglu: block_d={BD} must be at most 256 and give at most "
                     f"64 blocks (D / block_d = {D // BD}) with gemv='mma' and W_down "
                     "[F, D] (the WGMMA's N; the accumulator's rows); or use W_down^T "
                     "(w_down_t_DF)")
  R = -(-(D // BD) // 8) * 8   # _mma_down_rows' output rows
  # one prefetch "tile" is a gate tile and an up tile
  C.check_prefetch(prefetch_tiles, 2 * BF * BK * w_gate_t_FD.dtype.itemsize, "rmsnorm_swiglu",
                   pdl, mode)
  kern = C.mosaic_kernel(
      lambda *r, ctx: _body(*r, ctx=ctx, D=D, BF=BF, BK=BK, BD=BD, eps=eps, stages=stages,
                            store_once=store_once, int8=int8, x_parts=x_parts,
                            down_t=down_t, prefetch=prefetch_tiles, mma=mma,
                            mma_down=mma_down),
      out_type=jax.ShapeDtypeStruct((F // BF, R, BD) if rows_out else (F // BF, D),
                                    jnp.float32), grid=(F // BF,),
      grid_names=("f",), mode=mode, name="rmsnorm_swiglu", pdl=pdl)
  args = (*x_in, scale_D, w_gate_t_FD, w_up_t_FD, w_down)
  part = kern(*args, *scales) if int8 else kern(*args)
  return part[:, :D // BD].reshape(F // BF, D) if rows_out else part


def _finish(x, part_PD):
  """x + the sum of the partial rows, rounded to x's dtype. x goes in as one more row of
  the same sum: XLA then compiles the whole epilogue (x finished from the O-projection's
  partials too, if any) as one reduction kernel. With x added after the sum it took two,
  a reduction and a ~2.4 us add per layer (H100, 2026-11-27)."""
  rows = jnp.concatenate([x.astype(jnp.float32)[None], part_PD.astype(jnp.float32)])
  return jnp.sum(rows, axis=0).astype(x.dtype)


def rmsnorm_swiglu(x_D, scale_D, w_gate_t_FD, w_up_t_FD, w_down, w_gate_scale_F=None,
                   w_up_scale_F=None, w_down_scale_D=None, *, eps: float, mode: str, **block):
  """w_down: W_down [F, D], or W_down^T [D, F] with down_t=True. block: down_t,
  block_f, block_k, block_d, stages, store_once, pdl, prefetch_tiles, gemv, mma_swizzle
  (see _call)."""
  part = _call((x_D,), None, scale_D, w_gate_t_FD, w_up_t_FD, w_down,
               (w_gate_scale_F, w_up_scale_F, w_down_scale_D), eps=eps, mode=mode, **block)
  return _finish(x_D, part)


def rmsnorm_swiglu_from_parts(resid_D, opart_SD, o_scale_D, scale_D, w_gate_t_FD, w_up_t_FD,
                              w_down, w_gate_scale_F=None, w_up_scale_F=None,
                              w_down_scale_D=None, *, eps: float, mode: str, **block):
  """rmsnorm_swiglu(finish_x(resid, opart, o_scale)) with x finished inside the kernel
  (no XLA kernel between the output projection and the MLP); the final XLA sum finishes
  x again, identically, for the residual."""
  extra = (o_scale_D.astype(jnp.float32),) if o_scale_D is not None else ()
  part = _call((resid_D, opart_SD) + extra, (opart_SD.shape[0], o_scale_D is not None),
               scale_D, w_gate_t_FD, w_up_t_FD, w_down,
               (w_gate_scale_F, w_up_scale_F, w_down_scale_D), eps=eps, mode=mode, **block)
  return _finish(finish_x(resid_D, opart_SD, o_scale_D), part)
