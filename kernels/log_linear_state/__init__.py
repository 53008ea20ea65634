"""Log-linear attention decode step (Mamba-2 or Gated DeltaNet flavour) on the
O(log T) level states: merge, transition, insert, read (papers.md 1.1).

state [H, L, dk, dv] fp32 holds tokens 0..t-1; returns (o [H, dv] fp32, new
state). lam [H, L] are the token's level weights, log_decay [H] its g <= 0,
beta [H] the GDN step size (variant="gdn" only).

fenwick=False: the plain Mamba-2 / GDN recurrence on one state (L = 1) that keeps every
token (S <- transition(S) + insert; lam [H, 1] scales the read), for the non-log-linear
mixers; no capacity limit on t.

commit (bool, may be traced; default True): False returns the state unchanged, o still
read from the updated state. The decode driver passes False for a step past the end of
the cache, so no branch (a host round trip on the GPU) sits around the kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import _common as C
from kernels.log_linear_state import reference


def log_linear_state_update(state_HLKV: jax.Array, t, q_HK: jax.Array, k_HK: jax.Array,
                            v_HV: jax.Array, lam_HL: jax.Array, log_decay_H: jax.Array,
                            beta_H: jax.Array | None = None, *, variant: str, impl: str,
                            fenwick: bool = True, commit=True,
                            interpret: bool | str | None = None, **kw):
  C.check_impl(impl, "log_linear_state_update")
  if variant not in reference.VARIANTS:
    raise ValueError(f"log_linear_state_update: unknown variant {variant!r} "
                     f"(known: {', '.join(reference.VARIANTS)})")
  if state_HLKV.ndim != 4:
    raise ValueError(f"log_linear_state_update: state_HLKV {state_HLKV.shape} must be "
                     "[H, L, dk, dv]")
  H, L, dk, dv = state_HLKV.shape
  for name, x, shape in (("q_HK", q_HK, (H, dk)), ("k_HK", k_HK, (H, dk)), ("v_HV", v_HV, (H, dv)),
                         ("lam_HL", lam_HL, (H, L)), ("log_decay_H", log_decay_H, (H,))):
    if x.shape != shape:
      raise ValueError(f"log_linear_state_update: {name} {x.shape} must be {list(shape)}")
  if (variant == "gdn") != (beta_H is not None):
    raise ValueError("log_linear_state_update: beta_H is required for variant='gdn' and "
                     "not accepted for 'mamba2'")
  if beta_H is not None and beta_H.shape != (H,):
    raise ValueError(f"log_linear_state_update: beta_H {beta_H.shape} must be [{H}]")
  if not fenwick and L != 1:
    raise ValueError(f"log_linear_state_update: fenwick=False runs one state (L = 1), got "
                     f"state_HLKV {state_HLKV.shape}")
  tc = C.concrete_int(t)
  if tc is not None and tc < 0:
    raise ValueError(f"log_linear_state_update: t={tc} must be >= 0")
  if fenwick and tc is not None and not 0 <= tc < 2 ** (L - 1):
    raise ValueError(f"log_linear_state_update: t={tc} needs more than L={L} levels "
                     f"(t must be in 0..{2 ** (L - 1) - 1})")
  if impl == "xla":
    return reference.log_linear_state_update(state_HLKV, t, q_HK, k_HK, v_HV, lam_HL,
                                             log_decay_H, beta_H, variant=variant,
                                             fenwick=fenwick, commit=commit)
  mode = C.resolve_interpret(interpret)
  z = reference.ctz_or_neg1(t) if fenwick else jnp.int32(-1)   # -1: nothing to merge
  o, new = C.inference_only(
      "log_linear_state_update", _launch, state_HLKV, z, q_HK, k_HK, v_HV, lam_HL,
      log_decay_H, beta_H, jnp.asarray(commit), gdn=variant == "gdn", mode=mode,
      accumulate=not fenwick, **kw)
  if not fenwick:
    return o, new
  return jnp.where(jnp.asarray(t) < 2 ** (L - 1), o, jnp.nan), new


def _launch(*args, **kw):
  """The Pallas kernel with commit as its last argument (module level: inference_only
  keys its launchers on it)."""
  from kernels.log_linear_state import pallas
  return pallas.log_linear_state_update(*args[:-1], commit=args[-1], **kw)
