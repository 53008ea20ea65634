"""Reference: one decode step of log-linear Mamba-2 / Gated DeltaNet on the level
states (papers.md 1.1, "jit-friendly equivalent"), fp32.

State S [H, L, dk, dv] holds the Fenwick levels of tokens 0..t-1. Step t:
  1. merge: z = ctz(t) (t >= 1): S[z+1] += sum_{l<=z} S[l]; S[0..z] = 0
  2. transition on all levels: Mamba-2 S <- a S;  GDN S <- a (I - beta k k^T) S
  3. insert: S[0] = k v^T (GDN: beta k v^T)
  4. read: o = sum_l lambda_l S[l]^T q
with a = exp(g), g <= 0 the log decay. t must be < 2^(L-1) (else z + 1 would
fall off the last level): a concrete t raises, a traced t gives NaN output.

fenwick=False (L = 1): the plain Mamba-2 / GDN recurrence, one state that keeps every
token: no merge, S <- transition(S) + insert, o = lambda S^T q (any t).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HI = jax.lax.Precision.HIGHEST
VARIANTS = ("mamba2", "gdn")


def ctz_or_neg1(t):
  """Count of trailing zero bits of t (int32), -1 for t = 0."""
  t = jnp.asarray(t, jnp.int32)
  low = t & (-t)
  return jnp.where(t > 0, jax.lax.population_count(low - 1), -1).astype(jnp.int32)


def log_linear_state_update(state_HLKV, t, q_HK, k_HK, v_HV, lam_HL, log_decay_H, beta_H=None,
                            *, variant: str, fenwick: bool = True, commit=True):
  """commit (bool, may be traced): False returns the state unchanged (o is still read from
  the updated one)."""
  f32 = jnp.float32
  H, L, dk, dv = state_HLKV.shape
  S0 = S = state_HLKV.astype(f32)
  z = ctz_or_neg1(t) if fenwick else jnp.int32(-1)   # -1: nothing to merge
  lvl = jnp.arange(L)
  below = (lvl <= z)[None, :, None, None]
  nxt = (lvl == z + 1)[None, :, None, None]
  merged = jnp.sum(jnp.where(below, S, 0.0), axis=1, keepdims=True)
  S = jnp.where(below, 0.0, S) + jnp.where(nxt, merged, 0.0)
  a = jnp.exp(log_decay_H.astype(f32))[:, None, None, None]
  q, k, v = q_HK.astype(f32), k_HK.astype(f32), v_HV.astype(f32)
  if variant == "mamba2":
    S = a * S
    ins = jnp.einsum("hk,hv->hkv", k, v, precision=HI)
  else:
    b = beta_H.astype(f32)
    kS = jnp.einsum("hk,hlkv->hlv", k, S, precision=HI)
    S = a * (S - b[:, None, None, None] * k[:, None, :, None] * kS[:, :, None, :])
    ins = b[:, None, None] * jnp.einsum("hk,hv->hkv", k, v, precision=HI)
  S = S.at[:, 0].set(ins) if fenwick else S.at[:, 0].add(ins)
  o = jnp.einsum("hl,hlkv,hk->hv", lam_HL.astype(f32), S, q, precision=HI)
  if fenwick:
    o = jnp.where(jnp.asarray(t) < 2 ** (L - 1), o, jnp.nan)
  return o, jnp.where(commit, S, S0)


def level(t: int, s: int) -> int:
  """Fenwick level of source token s for query t (papers.md 1.1)."""
  return 0 if s == t else (t ^ s).bit_length()


def mamba2_parallel(q_TK, k_TK, v_TV, lam_TL, g_T):
  """Materialized log-linear Mamba-2 for one head: O = (Q K^T * M^S * M^H) V."""
  import numpy as np
  T = q_TK.shape[0]
  G = np.cumsum(np.asarray(g_T, np.float64))
  lam = np.asarray(lam_TL, np.float64)
  M = np.zeros((T, T))
  for t in range(T):
    for s in range(t + 1):
      M[t, s] = np.exp(G[t] - G[s]) * lam[t, level(t, s)]
  A = np.asarray(q_TK, np.float64) @ np.asarray(k_TK, np.float64).T
  return (A * M) @ np.asarray(v_TV, np.float64)
