"""Test helpers: dtype-aware tolerances and the RMS-ratio metric used by the papers.

Tolerances follow dtype and reduction size; never widen one to turn a test green.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Unit roundoff per dtype.
_EPS = {
    jnp.dtype(jnp.float64): 2.0 ** -53,
    jnp.dtype(jnp.float32): 2.0 ** -24,
    jnp.dtype(jnp.bfloat16): 2.0 ** -8,
    jnp.dtype(jnp.float16): 2.0 ** -11,
}


def eps(dtype) -> float:
  return _EPS[jnp.dtype(dtype)]


def tol(dtype, reduction: int = 1, factor: float = 8.0) -> float:
  """Relative tolerance for a result accumulated over `reduction` terms.

  Rounding error of a length-n sum grows like sqrt(n) * u for random-sign
  terms; `factor` absorbs the constant. fp32 with n <= 64 gives about 1e-6.
  """
  return factor * eps(dtype) * math.sqrt(max(1, reduction))


def rms_ratio(ref, out) -> float:
  """RMS(ref - out) / RMS(ref), the papers' 'ratio' metric."""
  ref = np.asarray(ref, np.float64)
  out = np.asarray(out, np.float64)
  den = np.sqrt(np.mean(ref ** 2))
  num = np.sqrt(np.mean((ref - out) ** 2))
  return float(num / den) if den > 0 else float(num)


def assert_ratio(ref, out, threshold: float, name: str = "output"):
  r = rms_ratio(ref, out)
  assert np.all(np.isfinite(np.asarray(out, np.float64))), f"{name}: non-finite values"
  assert r <= threshold, f"{name}: RMS ratio {r:.3e} > {threshold:.3e}"


def assert_close(actual, expected, *, rtol: float, atol: float = 0.0, name: str = ""):
  """Like chex.assert_trees_all_close, with max/mean abs error in the message."""
  a = jax.tree.map(lambda x: np.asarray(x, np.float64), actual)
  e = jax.tree.map(lambda x: np.asarray(x, np.float64), expected)
  for la, le in zip(jax.tree.leaves(a), jax.tree.leaves(e)):
    err = np.abs(la - le)
    bound = atol + rtol * np.abs(le)
    if not np.all(err <= bound):
      raise AssertionError(
          f"{name} not close: max abs err {err.max():.3e}, mean {err.mean():.3e}, "
          f"rtol={rtol:.1e} atol={atol:.1e}")
  chex.assert_trees_all_equal_shapes(actual, expected)


def assert_rel_close(actual, expected, *, rtol: float, name: str = ""):
  """Norm-relative closeness: ||a - e|| <= rtol * ||e|| per leaf."""
  for la, le in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    la = np.asarray(la, np.float64)
    le = np.asarray(le, np.float64)
    assert la.shape == le.shape, f"{name}: shape {la.shape} != {le.shape}"
    assert np.all(np.isfinite(la)), f"{name}: non-finite values"
    num = np.linalg.norm((la - le).ravel())
    den = np.linalg.norm(le.ravel())
    assert num <= rtol * max(den, 1e-30), (
        f"{name}: relative error {num / max(den, 1e-30):.3e} > {rtol:.1e} "
        f"(max abs err {np.abs(la - le).max():.3e})")


assert_trees_all_equal = chex.assert_trees_all_equal
assert_tree_all_finite = chex.assert_tree_all_finite
assert_shape = chex.assert_shape
