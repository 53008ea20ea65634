"""GQA attention of one query token over the first `length` slots of a KV cache.

Cache layout [Hkv, S, Dh]; query heads h = kv * G + g with G = Hq / Hkv (the
model's grouping). `length` may be traced; slots >= length are never visible.
An optional score bias [Hq, S] is added after scaling: a forget gate's
scale * (G_t - G_j) for FoX / PaTH-FoX layers (papers.md 2.1).
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


def check_bias(op: str, bias_HS, Hq: int, S: int):
  """None, or a float [Hq, S] score bias. Shared with path_decode_attention."""
  if bias_HS is None:
    return
  if bias_HS.shape != (Hq, S) or not jax.numpy.issubdtype(bias_HS.dtype, jax.numpy.floating):
    raise ValueError(f"{op}: bias_HS {bias_HS.shape} {bias_HS.dtype} must be a float "
                     f"[Hq, S] = [{Hq}, {S}] array")


def decode_attention(q_HD: jax.Array, k_cache_KSD: jax.Array, v_cache_KSD: jax.Array, length, *,
                     scale: float, impl: str, bias_HS: jax.Array | None = None,
                     interpret: bool | str | None = None, **kw) -> jax.Array:
  """q [Hq, Dh], caches [Hkv, S, Dh], length (int, 1..S) -> o [Hq, Dh] in q.dtype;
  scores = scale q.k (+ bias_HS [Hq, S], fp32).

  Pallas options: num_splits (split-K factor P), block_s (cache rows per stage),
  stages (TMA pipeline depth).
  """
  C.check_impl(impl, "decode_attention")
  _, S, _ = check_shapes("decode_attention", q_HD, k_cache_KSD, v_cache_KSD, length)
  check_bias("decode_attention", bias_HS, q_HD.shape[0], S)
  if impl == "xla":
    return reference.decode_attention(q_HD, k_cache_KSD, v_cache_KSD, length, scale=scale,
                                      bias_HS=bias_HS)
  from kernels.decode_attention import pallas
  mode = C.resolve_interpret(interpret)
  return C.inference_only(
      "decode_attention",
      lambda q, k, v, n, b: pallas.decode_attention(q, k, v, n, scale=scale, mode=mode,
                                                    bias_HS=b, **kw),
      q_HD, k_cache_KSD, v_cache_KSD, length, bias_HS)
