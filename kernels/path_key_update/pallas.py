"""Mosaic-GPU kernel: PaTH key-cache update for the live slots only.

Grid (Hkv, P) with the same dynamic split of the live blocks as decode
attention. Each CTA streams K blocks [BS, Dh] through SMEM, computes
kw = K w (row reduction, fp32), K - beta kw w^T, and stores the block.
Only blocks holding slots < length are read or written (the update costs one
read and one write of the live K cache, papers.md 2.3); the output rows past
the last live block are left unwritten: they are never visible to attention,
and the next append writes slot `length` explicitly. (A fused variant would
apply the update while decode attention streams K; see docs/kernels.md.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import _common as C


def _body(len_g, w_g, b_g, k_g, o_g, *, ctx: C.Ctx, S, Dh, BS, P, stages):
  h = ctx.axis("h")
  p = ctx.axis("p")
  f32 = jnp.float32
  ctx.begin()
  length = len_g[0]
  nb = (length + BS - 1) // BS
  per = (nb + P - 1) // P
  n_blocks = jnp.clip(nb - p * per, 0, per)
  start = jnp.minimum(p * per, S // BS - 1)
  beta = b_g[h].astype(f32)
  w = ctx.load(w_g.at[h], lambda s: ctx.ld(s, C.COL).astype(f32))
  w2 = C.bcast_rows(w, (BS, Dh))

  def step(idx, k_s):
    k = k_s[...].astype(f32)
    kw = jnp.sum(k * w2, axis=1)                                   # [BS], ROW
    y = k - C.bcast_cols(kw * beta, (BS, Dh)) * w2
    ctx.store(y, o_g.at[h, pl.ds((start + idx[0]) * BS, BS)],
              transforms=C.tile_transforms(Dh, o_g.dtype))

  ctx.pipeline(step, grid=(n_blocks,),
               in_specs=[C.plgpu.BlockSpec((BS, Dh), lambda i: (start + i, 0),
                                           transforms=C.tile_transforms(Dh, k_g.dtype))],
               stages=stages)(k_g.at[h])


def path_key_update(k_cache_KSD, w_KD, beta_K, length, *, mode: str, num_splits=None,
                    block_s=None, stages=2, pdl=None):
  Hkv, S, Dh = k_cache_KSD.shape
  interp = mode != "compile"
  BS = block_s or C.pick_block(S, 64, 64, "S (cache length)")
  C.check_block(S, BS, 64, "S (cache length)")   # WGMMA row tiles: 64-row blocks
  P = num_splits or max(1, min(S // BS, (2 if interp else 128) // Hkv))
  kern = C.mosaic_kernel(
      lambda *r, ctx: _body(*r, ctx=ctx, S=S, Dh=Dh, BS=BS, P=P, stages=stages),
      out_type=jax.ShapeDtypeStruct(k_cache_KSD.shape, k_cache_KSD.dtype),
      grid=(Hkv, P), grid_names=("h", "p"), mode=mode, name="path_key_update", pdl=pdl)
  length_1 = jnp.reshape(jnp.asarray(length, jnp.int32), (1,))
  return kern(length_1, w_KD, beta_K.astype(jnp.float32), k_cache_KSD)
