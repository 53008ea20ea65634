"""Two Mosaic-GPU kernels, no XLA between them: the QKV GEMV (kernels/_gemv.py) leaves
its split-K partials unfinished, and one small kernel finishes them (sum over the K
slices, 1/RMS, int8 row scale, bias, rounding to the model dtype), applies RoPE and
writes the token's k and v rows into the caches in place.

The finishing kernel sees the whole qkv vector as [H', 2, Dh/2] heads (H' = Hq + 2 Hkv;
the v heads rotate by cos = 1, sin = 0, so q, k and v share one register layout) and
stages the partials [S, H', 2, Dh/2] (S * N * 4 bytes, e.g. 48 KB at llama-1b-bench)
in SMEM with one TMA copy. Unfused, the same work took the QKV epilogue's XLA kernels
(sum, 1/RMS, cast) and slice copies for the RoPE kernel's operands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import _common as C
from kernels import _gemv
from kernels.rope_append.pallas import rope_table, tile_layout, tile_ok


def layout_ok(n_heads: int, n_kv_heads: int, head_dim: int, dtype) -> bool:
  """Whether the finishing kernel compiles for GPU at these shapes: its [H', Dh/2]
  register tile (H' = Hq + 2 Hkv) must pass rope_append's tile rule."""
  return tile_ok((n_heads + 2 * n_kv_heads) * head_dim // 2, dtype)


def _body(*refs, ctx: C.Ctx, Hq, Hkv, S, nb, K, eps, has_wscale, has_bias):
  refs = list(refs)
  part_g, ss_g = refs.pop(0), refs.pop(0)
  ws_g = refs.pop(0) if has_wscale else None
  b_g = refs.pop(0) if has_bias else None
  cs_g, pos_g, _k_in, _v_in, q_g, k_g, vc_g = refs
  f32 = jnp.float32
  _, Hp, _, half = part_g.shape
  lay = tile_layout(ctx, Hp, half, q_g.dtype, "qkv_rope_append kernel")
  ctx.begin()
  pos = pos_g[0]
  ok = (pos >= 0) & (pos < k_g.shape[1])
  r = lax.rsqrt(sum(ss_g[s * nb] for s in range(S)) / K + eps)

  def finish(part_s, cs_s, *extra_s):
    extra_s = list(extra_s)
    ws_s = extra_s.pop(0) if has_wscale else None
    b_s = extra_s.pop(0) if has_bias else None
    ys = []
    for j in (0, 1):   # first / second half of every head
      idx = (slice(None), j, slice(None))
      y = sum(ctx.ld(part_s, lay, (s,) + idx) for s in range(S)) * r
      if has_wscale:
        y = y * ctx.ld(ws_s, lay, idx)
      if has_bias:
        y = y + ctx.ld(b_s, lay, idx).astype(f32)
      ys.append(y.astype(q_g.dtype).astype(f32))   # the finished qkv, as rmsnorm_qkv returns it
    y1, y2 = ys
    c1, c2 = ctx.ld(cs_s, lay, 0), ctx.ld(cs_s, lay, 1)
    s1, s2 = ctx.ld(cs_s, lay, 2), ctx.ld(cs_s, lay, 3)
    return y1 * c1 - y2 * s1, y2 * c2 + y1 * s2

  srcs = [part_g, cs_g] + [a for a in (ws_g, b_g) if a is not None]
  y1, y2 = ctx.load_all(srcs, finish)
  if not ctx.tma:
    q_g[:, 0, :] = y1[:Hq].astype(q_g.dtype)
    q_g[:, 1, :] = y2[:Hq].astype(q_g.dtype)

    @pl.when(ok)
    def _():
      for j, y in ((0, y1), (1, y2)):
        k_g[:, pl.ds(pos, 1), j, :] = y[Hq:Hq + Hkv, None].astype(k_g.dtype)
        vc_g[:, pl.ds(pos, 1), j, :] = y[Hq + Hkv:, None].astype(vc_g.dtype)
    return

  def out(o_s):
    o_s[:, 0, :] = y1.astype(o_s.dtype)
    o_s[:, 1, :] = y2.astype(o_s.dtype)
    C.plgpu.commit_smem()
    C.plgpu.copy_smem_to_gmem(o_s.at[pl.ds(0, Hq)], q_g)

    @pl.when(ok)
    def _():
      C.plgpu.copy_smem_to_gmem(o_s.at[pl.ds(Hq, Hkv)], k_g.at[:, pos])
      C.plgpu.copy_smem_to_gmem(o_s.at[pl.ds(Hq + Hkv, Hkv)], vc_g.at[:, pos])

    C.plgpu.wait_smem_to_gmem(0)

  C.pl.run_scoped(out, C.plgpu.SMEM((Hp, 2, half), q_g.dtype))


def qkv_rope_append(x_D, scale_D, w_t_ND, bias_N, cos_D, sin_D, k_cache_KSD, v_cache_KSD, pos,
                    w_scale_N=None, *, eps: float, n_heads: int, n_kv_heads: int, mode: str,
                    pdl=None, **block):
  """pdl applies to both kernels."""
  Hkv, S_cache, Dh = k_cache_KSD.shape
  half = Dh // 2
  Hp = n_heads + 2 * n_kv_heads
  N, K = w_t_ND.shape
  part, ss = _gemv.gemv_partials(x_D, w_t_ND, scale_K=scale_D, mode=mode, name="rmsnorm_qkv",
                                 pdl=pdl, **block)
  S = part.shape[0]
  nb = ss.shape[0] // S
  cs = rope_table(cos_D, sin_D, n_heads + n_kv_heads, n_kv_heads)   # v heads: identity
  heads = lambda a, dt: a.astype(dt).reshape(Hp, 2, half)
  extra = []
  if w_scale_N is not None:
    extra.append(heads(w_scale_N, jnp.float32))
  if bias_N is not None:
    extra.append(heads(bias_N, bias_N.dtype))
  dt = x_D.dtype
  kern = C.mosaic_kernel(
      lambda *r, ctx: _body(*r, ctx=ctx, Hq=n_heads, Hkv=n_kv_heads, S=S, nb=nb, K=K, eps=eps,
                            has_wscale=w_scale_N is not None, has_bias=bias_N is not None),
      out_type=(jax.ShapeDtypeStruct((n_heads, 2, half), dt),
                jax.ShapeDtypeStruct((Hkv, S_cache, 2, half), k_cache_KSD.dtype),
                jax.ShapeDtypeStruct((Hkv, S_cache, 2, half), v_cache_KSD.dtype)),
      grid=(1,), grid_names=("one",), mode=mode, name="qkv_rope_append",
      input_output_aliases={4 + len(extra): 1, 5 + len(extra): 2}, pdl=pdl)
  pos_1 = jnp.reshape(jnp.asarray(pos, jnp.int32), (1,))
  q, k, v = kern(part.reshape(S, Hp, 2, half), ss, *extra, cs, pos_1,
                 k_cache_KSD.reshape(Hkv, S_cache, 2, half),
                 v_cache_KSD.reshape(Hkv, S_cache, 2, half))
  return q.reshape(n_heads, Dh), k.reshape(Hkv, S_cache, Dh), v.reshape(Hkv, S_cache, Dh)
