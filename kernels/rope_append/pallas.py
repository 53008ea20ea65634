"""Mosaic-GPU kernel: RoPE of the token's q and k heads and the cache append, in place.

The q and k heads ([Hq + Hkv, Dh], contiguous at the front of the fused qkv
vector) are viewed as [H, 2, Dh/2] (first/second half of each head), so
rotate_half needs no register shuffles: the kernel reads the two halves as
strided SMEM views and writes (x1 c1 - x2 s1, x2 c2 + x1 s2), where c1, c2
(s1, s2) are the two halves of cos (sin), pre-broadcast over heads.

write="kernel" (the default here): the same kernel stores the rotated k rows and
the v rows into cache slot `pos` (TMA from SMEM), and the caches are aliased
input -> output, so the step runs one launch where the XLA write took four (read
old row, select, update; for K and for V). A `pos` outside [0, S) writes nothing.
write="select" | "scatter": the row is written by XLA (reference.write_slot), the
earlier form, kept to measure against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import _common as C
from kernels.rope_append import reference

def tile_ok(n: int, dtype) -> bool:
  """Whether a [heads, Dh/2] strided register tile of n elements compiles for GPU: whole
  warpgroups (n a multiple of 128), and not n = 384 in a 2-byte dtype (Mosaic GPU, JAX
  0.10.2, rejects that store layout; 256, 640, 768, 896, 1024, 1152, 1280, 1536 and fp32
  384 lower, checked on CPU)."""
  return n % 128 == 0 and not (n == 384 and jnp.dtype(dtype).itemsize == 2)


def tile_layout(ctx: C.Ctx, H: int, half: int, dtype, what: str):
  """The strided layout of the RoPE kernels' [H, half] operands (one explicit layout for
  all of them: the default vector width would differ between bf16 halves and fp32 cos/sin);
  a one-line error for a tile that cannot compile."""
  n = H * half
  if not ctx.interpret and not tile_ok(n, dtype):
    raise ValueError(f"{what}: {H} heads x head_dim {2 * half} in {jnp.dtype(dtype)} "
                     f"(n = {n}) do not compile for GPU (n must be a multiple of 128, and not "
                     "384 in bf16)")
  return C.plgpu.Layout.WG_STRIDED((H, half), vec_size=2 if n % 256 == 0 else 1)


def rope_table(cos_D, sin_D, n_rot: int, n_id: int = 0):
  """[4, n_rot + n_id, Dh/2] fp32: the halves of cos and sin broadcast over n_rot heads,
  then n_id heads that pass through unrotated (cos = 1, sin = 0)."""
  half = cos_D.shape[0] // 2
  rows = lambda a, pad: jnp.concatenate([jnp.broadcast_to(a.astype(jnp.float32), (n_rot, half)),
                                         jnp.full((n_id, half), pad, jnp.float32)])
  return jnp.stack([rows(cos_D[:half], 1.0), rows(cos_D[half:], 1.0),
                    rows(sin_D[:half], 0.0), rows(sin_D[half:], 0.0)])


def _rope_regs(x_g, cs_g, *, ctx: C.Ctx, out_dtype):
  """(y1, y2): the rotated first / second halves [H, half] of every q and k head, fp32."""
  f32 = jnp.float32
  H, _, half = x_g.shape
  lay = tile_layout(ctx, H, half, out_dtype, "rope kernel")
  ctx.begin()

  def rope(x_s, cs_s):
    x1 = ctx.ld(x_s, lay, (slice(None), 0, slice(None))).astype(f32)
    x2 = ctx.ld(x_s, lay, (slice(None), 1, slice(None))).astype(f32)
    c1, c2 = ctx.ld(cs_s, lay, 0), ctx.ld(cs_s, lay, 1)
    s1, s2 = ctx.ld(cs_s, lay, 2), ctx.ld(cs_s, lay, 3)
    return (x1 * c1 - x2 * s1), (x2 * c2 + x1 * s2)

  return ctx.load(cs_g, lambda cs_s: ctx.load(x_g, lambda x_s: rope(x_s, cs_s)))


def _body(x_g, cs_g, o_g, *, ctx: C.Ctx):
  """RoPE only: o = rotated q and k heads [H, 2, half]."""
  y1, y2 = _rope_regs(x_g, cs_g, ctx=ctx, out_dtype=o_g.dtype)
  if ctx.tma:
    def out(o_s):
      o_s[:, 0, :] = y1.astype(o_s.dtype)
      o_s[:, 1, :] = y2.astype(o_s.dtype)
      C.plgpu.commit_smem()
      C.plgpu.copy_smem_to_gmem(o_s, o_g)
      C.plgpu.wait_smem_to_gmem(0)
    C.pl.run_scoped(out, C.plgpu.SMEM(o_g.shape, o_g.dtype))
  else:
    o_g[:, 0, :] = y1.astype(o_g.dtype)
    o_g[:, 1, :] = y2.astype(o_g.dtype)


def _body_append(x_g, cs_g, v_g, pos_g, _k_in, _v_in, q_g, k_g, vc_g, *, ctx: C.Ctx):
  """RoPE + append: q_g [Hq, 2, half] gets the rotated q heads; k_g / vc_g (the caches
  [Hkv, S, 2, half], aliased to the inputs) get the rotated k rows and the v rows at
  slot pos when 0 <= pos < S."""
  Hq = q_g.shape[0]
  Hkv, S = k_g.shape[:2]
  y1, y2 = _rope_regs(x_g, cs_g, ctx=ctx, out_dtype=q_g.dtype)   # calls ctx.begin()
  pos = pos_g[0]
  ok = (pos >= 0) & (pos < S)
  if not ctx.tma:
    q_g[:, 0, :] = y1[:Hq].astype(q_g.dtype)
    q_g[:, 1, :] = y2[:Hq].astype(q_g.dtype)

    @pl.when(ok)
    def _():
      k_g[:, pl.ds(pos, 1), 0, :] = y1[Hq:, None].astype(k_g.dtype)
      k_g[:, pl.ds(pos, 1), 1, :] = y2[Hq:, None].astype(k_g.dtype)
      vc_g[:, pl.ds(pos, 1)] = v_g[...][:, None].astype(vc_g.dtype)
    return

  def out(o_s, v_s, bar):
    C.plgpu.copy_gmem_to_smem(v_g, v_s, bar)
    o_s[:, 0, :] = y1.astype(o_s.dtype)
    o_s[:, 1, :] = y2.astype(o_s.dtype)
    C.plgpu.commit_smem()
    C.plgpu.copy_smem_to_gmem(o_s.at[pl.ds(0, Hq)], q_g)
    C.plgpu.barrier_wait(bar)

    @pl.when(ok)
    def _():
      C.plgpu.copy_smem_to_gmem(o_s.at[pl.ds(Hq, Hkv)], k_g.at[:, pos])
      C.plgpu.copy_smem_to_gmem(v_s, vc_g.at[:, pos])

    C.plgpu.wait_smem_to_gmem(0)

  C.pl.run_scoped(out, C.plgpu.SMEM(x_g.shape, q_g.dtype), C.plgpu.SMEM(v_g.shape, v_g.dtype),
                  C.plgpu.Barrier(num_arrivals=1))


def rope_append(qkv_N, cos_D, sin_D, k_cache_KSD, v_cache_KSD, pos, *, n_heads, n_kv_heads,
                mode: str, write: str = "kernel", pdl=None):
  Hkv, S, Dh = k_cache_KSD.shape
  half = Dh // 2
  H = n_heads + n_kv_heads
  x = qkv_N[:H * Dh].reshape(H, 2, half)
  cs = rope_table(cos_D, sin_D, H)
  v = qkv_N[H * Dh:].reshape(n_kv_heads, 2, half)
  if write == "kernel":
    if not k_cache_KSD.dtype == v_cache_KSD.dtype == qkv_N.dtype:
      raise ValueError(f"rope_append: write='kernel' needs the caches in qkv's dtype "
                       f"({qkv_N.dtype}), got k {k_cache_KSD.dtype} / v {v_cache_KSD.dtype}; "
                       "pass write='select' or 'scatter'")
    kern = C.mosaic_kernel(
        _body_append, out_type=(jax.ShapeDtypeStruct((n_heads, 2, half), qkv_N.dtype),
                                jax.ShapeDtypeStruct((Hkv, S, 2, half), k_cache_KSD.dtype),
                                jax.ShapeDtypeStruct((Hkv, S, 2, half), v_cache_KSD.dtype)),
        grid=(1,), grid_names=("one",), mode=mode, name="rope_append",
        input_output_aliases={4: 1, 5: 2}, pdl=pdl)
    pos_1 = jnp.reshape(jnp.asarray(pos, jnp.int32), (1,))
    q, k, vc = kern(x, cs, v, pos_1, k_cache_KSD.reshape(Hkv, S, 2, half),
                    v_cache_KSD.reshape(Hkv, S, 2, half))
    return q.reshape(n_heads, Dh), k.reshape(Hkv, S, Dh), vc.reshape(Hkv, S, Dh)
  kern = C.mosaic_kernel(_body, out_type=jax.ShapeDtypeStruct((H, 2, half), qkv_N.dtype),
                         grid=(1,), grid_names=("one",), mode=mode, name="rope", pdl=pdl)
  qk = kern(x, cs).reshape(H, Dh)
  q, k = qk[:n_heads], qk[n_heads:]
  return (q, reference.write_slot(k_cache_KSD, k, pos, write=write),
          reference.write_slot(v_cache_KSD, v.reshape(n_kv_heads, Dh), pos, write=write))
