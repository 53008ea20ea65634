"""GQA attention of one query token over the first `length` slots of a KV cache.

Cache layout [Hkv, S, Dh]; query heads h = kv * G + g with G = Hq / Hkv (the
model's grouping). `length` may be traced; slots >= length are never visible.
An optional score bias [Hq, S] is added after scaling: a forget gate's
scale * (G_t - G_j) for FoX / PaTH-FoX layers (papers.md 2.1). Or the op updates the gate
itself (gate_HS = G_{t-1} - G_j and this token's g_H): older slots + g_t, the new slot 0,
scale * the result as the bias, and returns the updated gate too; the Pallas kernel does
it in its pass over the cache (one read and one write of the gate row, no XLA kernel).
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


def check_gate(op: str, bias_HS, gate_HS, g_H, Hq: int, S: int):
  """None and None, or a float gate row [Hq, S] with this token's float g [Hq] (and no
  bias_HS: the op makes the bias from the gate). Shared with path_decode_attention."""
  if gate_HS is None and g_H is None:
    return
  if gate_HS is None or g_H is None or bias_HS is not None:
    raise ValueError(f"{op}: gate_HS and g_H go together, and without bias_HS (the op "
                     "makes the bias from the updated gate)")
  check_bias(op, gate_HS, Hq, S)
  if g_H.shape != (Hq,) or not jax.numpy.issubdtype(g_H.dtype, jax.numpy.floating):
    raise ValueError(f"{op}: g_H {g_H.shape} {g_H.dtype} must be a float [Hq] = [{Hq}] array")


def decode_attention(q_HD: jax.Array, k_cache_KSD: jax.Array, v_cache_KSD: jax.Array, length, *,
                     scale: float, impl: str, bias_HS: jax.Array | None = None,
                     gate_HS: jax.Array | None = None, g_H: jax.Array | None = None,
                     commit=True, interpret: bool | str | None = None, **kw):
  """q [Hq, Dh], caches [Hkv, S, Dh], length (int, 1..S) -> o [Hq, Dh] in q.dtype;
  scores = scale q.k (+ bias_HS [Hq, S], fp32).

  gate_HS [Hq, S] fp32 (G_{t-1} - G_j) and g_H [Hq] (log forget gate of the token at slot
  length - 1) instead of bias_HS: returns (o, gate) with gate = the updated row (older
  slots + g, slot length - 1 zero) and scores = scale (q.k + gate). Slots past length - 1
  of the returned gate are unspecified in the Pallas form (never visible; the next step
  zeroes its slot). commit (bool, may be traced) False returns the gate unchanged and o
  meaningless: a step past the end of the cache, with no branch around the kernel.

  Pallas options: num_splits (split-K factor P), block_s (cache rows per stage),
  block_d (head-dim columns per chunk), block_g (query heads per CTA), scores ("fma";
  "mma": q.K on the tensor cores; "mma-pv": q.K and p.V there; both bf16), stages (TMA
  pipeline depth).
  """
  C.check_impl(impl, "decode_attention")
  _, S, _ = check_shapes("decode_attention", q_HD, k_cache_KSD, v_cache_KSD, length)
  check_bias("decode_attention", bias_HS, q_HD.shape[0], S)
  check_gate("decode_attention", bias_HS, gate_HS, g_H, q_HD.shape[0], S)
  if impl == "xla":
    return reference.decode_attention(q_HD, k_cache_KSD, v_cache_KSD, length, scale=scale,
                                      bias_HS=bias_HS, gate_HS=gate_HS, g_H=g_H,
                                      commit=commit)
  mode = C.resolve_interpret(interpret)
  return C.inference_only(
      "decode_attention", _launch, q_HD, k_cache_KSD, v_cache_KSD, length, bias_HS,
      (gate_HS, g_H), jax.numpy.asarray(commit), gated=gate_HS is not None, scale=scale,
      mode=mode, **kw)


def _launch(q, k, v, n, bias, gate_g, commit, *, gated: bool, **kw):
  """The Pallas kernel, given the bias or the gate (module level: inference_only keys its
  launchers on it)."""
  from kernels.decode_attention import pallas
  return pallas.decode_attention(q, k, v, n, bias_HS=None if gated else bias,
                                 gate_g=gate_g if gated else None, commit=commit, **kw)
