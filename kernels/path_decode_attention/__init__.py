"""PaTH decode attention with the key-cache update fused in (FlashFormer-style: the
pass that streams K for attention also rewrites it), so a PaTH decode step reads K
once and writes it once instead of reading it twice (path_key_update, then
decode_attention).

Cache layout [Hkv, S, Dh]. The caller writes the new token's k and v into slot
length - 1 first; older keys are carried through K <- K - beta (K w) w^T (fp32), and
q attends over slots < length of the updated cache. Returns (o [Hq, Dh] in q.dtype,
updated K). The Pallas form writes only the live cache blocks of K: rows past them are
unspecified in the returned K (never visible; the next append writes its slot).
commit (bool, may be traced) False returns K (and the gate) unchanged and o meaningless:
a step past the end of the cache, with no branch around the kernel.
"""

from __future__ import annotations

import jax

from kernels import _common as C
from kernels.decode_attention import check_bias, check_gate, check_shapes
from kernels.path_decode_attention import reference


def path_decode_attention(q_HD: jax.Array, k_cache_KSD: jax.Array, v_cache_KSD: jax.Array,
                          w_KD: jax.Array, beta_K: jax.Array, length, *, scale: float, impl: str,
                          bias_HS: jax.Array | None = None, gate_HS: jax.Array | None = None,
                          g_H: jax.Array | None = None, commit=True,
                          interpret: bool | str | None = None, **kw):
  """q [Hq, Dh], K / V [Hkv, S, Dh], w [Hkv, Dh], beta [Hkv], length (1..S) ->
  (o [Hq, Dh], K); bias_HS [Hq, S] (PaTH-FoX's gate, scaled) is added to the scaled
  scores, or with gate_HS and g_H the op updates the gate as decode_attention does and
  returns (o, K, gate). Pallas options as decode_attention (num_splits, block_s, stages)."""
  C.check_impl(impl, "path_decode_attention")
  Hkv, S, Dh = check_shapes("path_decode_attention", q_HD, k_cache_KSD, v_cache_KSD, length)
  check_bias("path_decode_attention", bias_HS, q_HD.shape[0], S)
  check_gate("path_decode_attention", bias_HS, gate_HS, g_H, q_HD.shape[0], S)
  if w_KD.shape != (Hkv, Dh) or beta_K.shape != (Hkv,):
    raise ValueError(f"path_decode_attention: w_KD {w_KD.shape} / beta_K {beta_K.shape} must "
                     f"be [{Hkv}, {Dh}] / [{Hkv}]")
  if impl == "xla":
    return reference.path_decode_attention(q_HD, k_cache_KSD, v_cache_KSD, w_KD, beta_K, length,
                                           scale=scale, bias_HS=bias_HS, gate_HS=gate_HS, g_H=g_H,
                                           commit=commit)
  mode = C.resolve_interpret(interpret)
  return C.inference_only(
      "path_decode_attention", _launch, q_HD, k_cache_KSD, v_cache_KSD, w_KD, beta_K, length,
      bias_HS, (gate_HS, g_H), jax.numpy.asarray(commit), gated=gate_HS is not None,
      scale=scale, mode=mode, **kw)


def _launch(q, k, v, w, beta, n, bias, gate_g, commit, *, gated: bool, **kw):
  """The Pallas kernel, given the bias or the gate (module level: inference_only keys its
  launchers on it)."""
  from kernels.decode_attention import pallas
  return pallas.path_decode_attention(q, k, v, w, beta, n, bias_HS=None if gated else bias,
                                      gate_g=gate_g if gated else None, commit=commit, **kw)
