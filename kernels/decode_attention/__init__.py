"""GQA attention of one query token over the first `length` slots of a KV cache.

Cache layout [Hkv, S, Dh]; query heads h = kv * G + g with G = Hq / Hkv (the
model's grouping). `length` may be traced; slots >= length are never visible.
"""

from __future__ import annotations

import jax

from kernels import _common as C
from kernels.decode_attention import reference


def check_shapes(op: str, q_HD, k_cache_KSD, v_cache_KSD, length):
  """q [Hq, Dh] against caches [Hkv, S, Dh] (Hq a multiple of Hkv) and a concrete length
  in 1..S; returns (Hkv, S, Dh). Shared with path_decode_attention."""
  if q_HD.ndim != 2 or k_cache_KSD.ndim != 3 or v_cache_KSD.shape != k_cache_KSD.shape:
    raise ValueError(f"{op}: q_HD {q_HD.shape}, k_cache_KSD {k_cache_KSD.shape}, "
                     f"v_cache_KSD {v_cache_KSD.shape}: expected [Hq, Dh] and two [Hkv, S, Dh]")
  Hq, Dh = q_HD.shape
  Hkv, S, Dk = k_cache_KSD.shape
  if Dk != Dh or Hq % Hkv:
    raise ValueError(f"{op}: q_HD {q_HD.shape} does not match k_cache_KSD "
                     f"{k_cache_KSD.shape} (head dims equal, Hq a multiple of Hkv)")
  C.check_length(op, length, 1, S)
  return Hkv, S, Dh


def decode_attention(q_HD: jax.Array, k_cache_KSD: jax.Array, v_cache_KSD: jax.Array, length, *,
                     scale: float, impl: str, interpret: bool | str | None = None,
                     **kw) -> jax.Array:
  """q [Hq, Dh], caches [Hkv, S, Dh], length (int, 1..S) -> o [Hq, Dh] in q.dtype.

  Pallas options: num_splits (split-K factor P), block_s (cache rows per stage),
  stages (TMA pipeline depth).
  """
  C.check_impl(impl, "decode_attention")
  check_shapes("decode_attention", q_HD, k_cache_KSD, v_cache_KSD, length)
  if impl == "xla":
    return reference.decode_attention(q_HD, k_cache_KSD, v_cache_KSD, length, scale=scale)
  from kernels.decode_attention import pallas
  mode = C.resolve_interpret(interpret)
  return C.inference_only(
      "decode_attention", lambda *a: pallas.decode_attention(*a, scale=scale, mode=mode, **kw),
      q_HD, k_cache_KSD, v_cache_KSD, length)
