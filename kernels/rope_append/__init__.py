"""RoPE on one token's q and k, and append of its k and v to the KV cache.

Cache layout is head-major [Hkv, S, Dh] (each head's keys contiguous, which is
what the split-K attention kernel streams). cos/sin are the token's [Dh] RoPE
vectors (HF "rotate_half" convention, as jaxlab.models.rope.rope_cos_sin makes
them), so any frequency scaling (linear, llama3, yarn) stays outside the kernel.
"""

from __future__ import annotations

import jax

from kernels import _common as C
from kernels.rope_append import reference


def check_position(pos, S: int, what: str = "pos"):
  """Concrete positions outside [0, S) are an error (no silent wrap or clamp)."""
  try:
    p = int(pos)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return  # traced: handled in-graph (see write_slot)
  if not 0 <= p < S:
    raise ValueError(f"{what}={p} is outside the KV cache (slots 0..{S - 1}); "
                     f"allocate a longer cache")


def rope_append(qkv_N: jax.Array, cos_D: jax.Array, sin_D: jax.Array, k_cache_KSD: jax.Array,
                v_cache_KSD: jax.Array, pos, *, n_heads: int, n_kv_heads: int, impl: str,
                interpret: bool | str | None = None, write: str | None = None,
                pdl: str | None = None):
  """qkv [(Hq + 2 Hkv) Dh] -> (q roped [Hq, Dh], k_cache, v_cache with slot pos written).

  write: how the row lands in the cache. "kernel" (impl="pallas" only, its default): the
  RoPE kernel writes it, into the caches in place (aliased); "select" (impl="xla"'s
  default) or "scatter": an XLA write after the kernel (same result; see
  reference.write_slot). pdl: the Pallas kernel's launch (kernels/_common.PDL_MODES)."""
  C.check_impl(impl, "rope_append")
  write = write or ("kernel" if impl == "pallas" else "select")
  known = reference.WRITES + (("kernel",) if impl == "pallas" else ())
  if write not in known:
    raise ValueError(f"rope_append: unknown write {write!r} for impl={impl!r} "
                     f"(known: {', '.join(known)})")
  Hkv, S, Dh = k_cache_KSD.shape
  if Hkv != n_kv_heads or v_cache_KSD.shape != k_cache_KSD.shape:
    raise ValueError(f"rope_append: k_cache_KSD {k_cache_KSD.shape} / v_cache_KSD "
                     f"{v_cache_KSD.shape} must both be [{n_kv_heads}, S, Dh]")
  if qkv_N.shape != ((n_heads + 2 * n_kv_heads) * Dh,):
    raise ValueError(f"rope_append: qkv_N {qkv_N.shape} must be [{(n_heads + 2 * n_kv_heads) * Dh}]")
  if cos_D.shape != (Dh,) or sin_D.shape != (Dh,) or Dh % 2:
    raise ValueError(f"rope_append: cos_D {cos_D.shape} / sin_D {sin_D.shape} must be [{Dh}] "
                     "with an even head dim")
  check_position(pos, S)
  if impl == "xla":
    return reference.rope_append(qkv_N, cos_D, sin_D, k_cache_KSD, v_cache_KSD, pos,
                                 n_heads=n_heads, n_kv_heads=n_kv_heads, write=write)
  from kernels.rope_append import pallas
  mode = C.resolve_interpret(interpret)
  return C.inference_only(
      "rope_append", pallas.rope_append, qkv_N, cos_D, sin_D, k_cache_KSD, v_cache_KSD, pos,
      n_heads=n_heads, n_kv_heads=n_kv_heads, mode=mode, write=write, pdl=pdl)
