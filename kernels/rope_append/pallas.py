"""Mosaic-GPU kernel: RoPE of the token's q and k heads; cache append in place by XLA.

The q and k heads ([Hq + Hkv, Dh], contiguous at the front of the fused qkv
vector) are viewed as [H, 2, Dh/2] (first/second half of each head), so
rotate_half needs no register shuffles: the kernel reads the two halves as
strided SMEM views and writes (x1 c1 - x2 s1, x2 c2 + x1 s2), where c1, c2
(s1, s2) are the two halves of cos (sin), pre-broadcast over heads.

The one-row cache write stays an XLA dynamic_update_slice on the donated cache,
which XLA performs in place: plgpu.kernel has no input_output_aliases, and the
Ref-based aliasing of pl.kernel lowers for CUDA but does not run in the
Mosaic-GPU interpreter (JAX 0.10.2), so it could not be tested on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import _common as C
from kernels.rope_append import reference


def _body(x_g, cs_g, o_g, *, ctx: C.Ctx):
  f32 = jnp.float32
  H, _, half = x_g.shape
  # One explicit strided layout for all four [H, half] operands (the default
  # vector width would differ between the bf16 halves and the fp32 cos/sin).
  n = H * half
  vec = 2 if n % 256 == 0 else 1
  if not ctx.interpret and n % 128:
    raise ValueError(f"rope kernel: (n_heads + n_kv_heads) * head_dim / 2 = {n} must be a "
                     "multiple of 128 (one warpgroup) to compile for GPU")
  if not ctx.interpret and n == 384 and jnp.dtype(o_g.dtype).itemsize == 2:
    # Mosaic GPU (JAX 0.10.2) rejects the bf16 store layout at exactly this size; 256, 640,
    # 768, 896, 1024, 1152, 1280, 1536 and fp32 384 all lower (checked on CPU).
    raise ValueError(f"rope kernel: {H} q+k heads x head_dim {2 * half} in {o_g.dtype} "
                     "(n = 384) do not compile for GPU; fp32 or another head count does")
  lay = C.plgpu.Layout.WG_STRIDED((H, half), vec_size=vec)

  def rope(x_s, cs_s):
    x1 = ctx.ld(x_s, lay, (slice(None), 0, slice(None))).astype(f32)
    x2 = ctx.ld(x_s, lay, (slice(None), 1, slice(None))).astype(f32)
    c1, c2 = ctx.ld(cs_s, lay, 0), ctx.ld(cs_s, lay, 1)
    s1, s2 = ctx.ld(cs_s, lay, 2), ctx.ld(cs_s, lay, 3)
    return (x1 * c1 - x2 * s1), (x2 * c2 + x1 * s2)

  def inner(cs_s):
    return ctx.load(x_g, lambda x_s: rope(x_s, cs_s))

  y1, y2 = ctx.load(cs_g, inner)
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


def rope_append(qkv_N, cos_D, sin_D, k_cache_KSD, v_cache_KSD, pos, *, n_heads, n_kv_heads,
                mode: str, write: str = "select"):
  Dh = k_cache_KSD.shape[2]
  half = Dh // 2
  H = n_heads + n_kv_heads
  x = qkv_N[:H * Dh].reshape(H, 2, half)
  cs = jnp.stack([jnp.broadcast_to(a.astype(jnp.float32), (H, half))
                  for a in (cos_D[:half], cos_D[half:], sin_D[:half], sin_D[half:])])
  kern = C.mosaic_kernel(_body, out_type=jax.ShapeDtypeStruct((H, 2, half), qkv_N.dtype),
                         grid=(1,), grid_names=("one",), mode=mode, name="rope")
  qk = kern(x, cs).reshape(H, Dh)
  q, k = qk[:n_heads], qk[n_heads:]
  v = qkv_N[H * Dh:].reshape(n_kv_heads, Dh)
  return (q, reference.write_slot(k_cache_KSD, k, pos, write=write),
          reference.write_slot(v_cache_KSD, v, pos, write=write))
