"""Mosaic-GPU kernels: log-linear Mamba-2 / GDN decode step on the level states.

Default, one CTA per level (grid (H, dv / BV, L)): CTA (h, j, l) reads its level tile
S[h, l, :, j-block] ([dk, BV], fp32) and, in registers:
  - empties it if l <= z (z = ctz(t), a scalar; "merge up to the lowest set bit"); the
    CTA of level z + 1 also reads levels 0..z and adds them to its own,
  - applies the transition (scalar decay, or GDN's a (I - beta k k^T)),
  - overwrites level 0 with the inserted k v^T (fenwick=False, the plain recurrence with
    one level and z = -1: adds it),
  - stores its part of the read, o_l = lambda_l S[l]^T q (summed over l in XLA), and the
    new tile (the old one when `commit` is 0: a step that must not change the state,
    e.g. past the end of the cache, without a branch around the kernel).
split_levels=False: one CTA per (h, j) streams the L tiles in level order through a TMA
pipeline, keeping the running merge sum and o in registers (the first form: L dependent
load / store round trips per CTA on H x dv / BV CTAs, 32 at hybrid-1b-bench).
One read and one write of the O(L dk dv) state per token either way; no KV cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import _common as C


def _setup(z_g, q_g, k_g, v_g, ld_g, b_g, *, ctx: C.Ctx, h, j, dk, BV, gdn, accumulate):
  """Begin the kernel and read this CTA's inputs: (z, commit, q as [dk, BV], update), where
  update(S1, lvl) is a (merged) level tile after the transition and the insert."""
  ctx.begin()
  z = z_g[0]
  commit = z_g[1] != 0
  a = jnp.exp(ld_g[h])
  beta = b_g[h]
  q = C.bcast_cols(ctx.load(q_g.at[h], lambda s: ctx.ld(s, C.ROW)), (dk, BV))
  k = C.bcast_cols(ctx.load(k_g.at[h], lambda s: ctx.ld(s, C.ROW)), (dk, BV))
  v = C.bcast_rows(ctx.load(v_g.at[h, pl.ds(j * BV, BV)], lambda s: ctx.ld(s, C.COL)), (dk, BV))
  ins = k * v * beta if gdn else k * v

  def update(S1, lvl):
    if gdn:
      S2 = a * (S1 - beta * k * C.bcast_rows(jnp.sum(k * S1, axis=0), (dk, BV)))
    else:
      S2 = a * S1
    return S2 + jnp.where(lvl == 0, ins, 0.0) if accumulate else jnp.where(lvl == 0, ins, S2)

  return z, commit, q, update


def _body(z_g, q_g, k_g, v_g, lam_g, ld_g, b_g, st_g, o_g, new_g, *, ctx: C.Ctx, L, dk, BV,
          gdn, stages, accumulate):
  h, j = ctx.axis("h"), ctx.axis("j")
  z, commit, q, update = _setup(z_g, q_g, k_g, v_g, ld_g, b_g, ctx=ctx, h=h, j=j, dk=dk, BV=BV,
                                gdn=gdn, accumulate=accumulate)
  tr = C.tile_transforms(BV, jnp.float32)

  def step(idx, s_s, carry):
    merged, o = carry
    lvl = idx[0]
    S = s_s[...]
    below = lvl <= z
    S3 = update(jnp.where(below, 0.0, S) + jnp.where(lvl == z + 1, merged, 0.0), lvl)
    merged = merged + jnp.where(below, S, 0.0)
    o = o + lam_g[h, lvl] * jnp.sum(S3 * q, axis=0)
    ctx.store(jnp.where(commit, S3, S), new_g.at[h, pl.ds(lvl * dk, dk), pl.ds(j * BV, BV)],
              transforms=tr)
    return merged, o

  carry0 = (ctx.zeros((dk, BV), C.WGMMA), ctx.zeros((BV,), C.COL))
  _, o = ctx.pipeline(
      step, grid=(L,),
      in_specs=[C.plgpu.BlockSpec((dk, BV), lambda l: (l, j), transforms=tr)],
      stages=stages, init_carry=carry0)(st_g.at[h])
  ctx.store(o, o_g.at[h, pl.ds(j * BV, BV)])


def _body_levels(z_g, q_g, k_g, v_g, lam_g, ld_g, b_g, st_g, o_g, new_g, *, ctx: C.Ctx, dk,
                 BV, gdn, accumulate):
  h, j, lvl = ctx.axis("h"), ctx.axis("j"), ctx.axis("l")
  z, commit, q, update = _setup(z_g, q_g, k_g, v_g, ld_g, b_g, ctx=ctx, h=h, j=j, dk=dk, BV=BV,
                                gdn=gdn, accumulate=accumulate)
  tr = C.tile_transforms(BV, jnp.float32)
  S = ctx.load(st_g.at[h, pl.ds(lvl * dk, dk), pl.ds(j * BV, BV)], lambda s: s[...], tr)
  # Level z + 1 takes the sum of levels 0..z (z + 1 more tiles, streamed two at a time,
  # in one CTA); the others read none.
  n_merge = jnp.where(lvl == z + 1, z + 1, 0)
  merged = ctx.pipeline(
      lambda idx, s_s, acc: acc + s_s[...], grid=(n_merge,),
      in_specs=[C.plgpu.BlockSpec((dk, BV), lambda l: (l, j), transforms=tr)], stages=2,
      init_carry=ctx.zeros((dk, BV), C.WGMMA))(st_g.at[h])
  S3 = update(jnp.where(lvl <= z, 0.0, S) + merged, lvl)
  ctx.store(lam_g[h, lvl] * jnp.sum(S3 * q, axis=0), o_g.at[lvl, h, pl.ds(j * BV, BV)])
  ctx.store(jnp.where(commit, S3, S), new_g.at[h, pl.ds(lvl * dk, dk), pl.ds(j * BV, BV)],
            transforms=tr)


def log_linear_state_update(state_HLKV, z, q_HK, k_HK, v_HV, lam_HL, log_decay_H, beta_H, *,
                            gdn: bool, mode: str, block_v: int | None = None, stages: int = 2,
                            accumulate: bool = False, pdl=None, commit=True,
                            split_levels: bool = True):
  """split_levels: one CTA per level (default) or per (head, column block) streaming the
  levels (stages: that form's TMA pipeline depth)."""
  H, L, dk, dv = state_HLKV.shape
  f32 = jnp.float32
  # fp32 [BV] rows: TMA copies need a multiple of 128 bytes (one warpgroup), so BV % 32 == 0.
  BV = block_v or C.pick_block(dv, 64 if dk <= 64 else 32, 32, "dv")
  C.check_block(dv, BV, 32, "dv")
  if dk % 64:
    raise ValueError(f"log_linear_state_update: dk={dk} must be a multiple of 64 for the "
                     "Pallas kernel (WGMMA row tiles)")
  new_type = jax.ShapeDtypeStruct((H, L * dk, dv), f32)
  if split_levels:
    kern = C.mosaic_kernel(
        lambda *r, ctx: _body_levels(*r, ctx=ctx, dk=dk, BV=BV, gdn=gdn, accumulate=accumulate),
        out_type=(jax.ShapeDtypeStruct((L, H, dv), f32), new_type),
        grid=(H, dv // BV, L), grid_names=("h", "j", "l"), mode=mode,
        name="log_linear_state_update", pdl=pdl)
  else:
    kern = C.mosaic_kernel(
        lambda *r, ctx: _body(*r, ctx=ctx, L=L, dk=dk, BV=BV, gdn=gdn, stages=stages,
                              accumulate=accumulate),
        out_type=(jax.ShapeDtypeStruct((H, dv), f32), new_type),
        grid=(H, dv // BV), grid_names=("h", "j"), mode=mode, name="log_linear_state_update",
        pdl=pdl)
  z_1 = jnp.stack([jnp.asarray(z, jnp.int32), jnp.asarray(commit).astype(jnp.int32)])
  beta = jnp.zeros((H,), f32) if beta_H is None else beta_H.astype(f32)
  o, new = kern(z_1, q_HK.astype(f32), k_HK.astype(f32), v_HV.astype(f32), lam_HL.astype(f32),
                log_decay_H.astype(f32), beta, state_HLKV.astype(f32).reshape(H, L * dk, dv))
  if split_levels:
    o = jnp.sum(o, axis=0)
  return o, new.reshape(H, L, dk, dv)
