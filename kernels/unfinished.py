"""A residual-stream vector handed from one decode kernel to the next unfinished.

A split-K GEMV ends in partial rows that something must add up. Summing them in XLA costs
a kernel launch between two Mosaic kernels; the next GEMV can instead add them to its
input vector block by block as it streams it (kernels/_gemv.py, the "rows" vector).
`Unfinished` is that hand-over: the ops that take x_D accept it where x_D is an array.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Unfinished(NamedTuple):
  """x = dtype(... dtype(dtype(base + sum(rows[0])) + sum(rows[1])) ...).

  base_D [D] is in the model dtype; rows is a tuple of fp32 [R_i, D] groups (e.g. one
  GEMV's split-K partials), each summed in row order and then rounded to base's dtype,
  as the epilogue of the op that produced it would have done."""
  base_D: jax.Array
  rows: tuple = ()

  @property
  def shape(self):
    return self.base_D.shape

  @property
  def dtype(self):
    return self.base_D.dtype

  @property
  def ndim(self) -> int:
    return self.base_D.ndim

  def plus(self, rows_RD: jax.Array) -> "Unfinished":
    """This value with one more group of partial rows to add."""
    return Unfinished(self.base_D, self.rows + (rows_RD,))


def as_unfinished(x) -> Unfinished:
  return x if isinstance(x, Unfinished) else Unfinished(x)


def check(op: str, x) -> None:
  """An Unfinished x: fp32 [R, D] groups matching base [D] (a one-line error otherwise)."""
  if not isinstance(x, Unfinished):
    return
  for r in x.rows:
    if r.ndim != 2 or r.shape[1:] != x.base_D.shape or r.dtype != jnp.float32:
      raise ValueError(f"{op}: unfinished x_D rows {r.shape} {r.dtype} must be fp32 "
                       f"[R, {x.base_D.shape[0] if x.base_D.ndim else '?'}]")


def finish(x) -> jax.Array:
  """The finished vector (an array passes through unchanged): the sums in the order the
  kernels add them, so a kernel finishing x on the fly sees the same x bit for bit."""
  if not isinstance(x, Unfinished):
    return x
  dtype = x.base_D.dtype
  y = x.base_D.astype(jnp.float32)
  for rows in x.rows:
    s = rows[0]
    for r in range(1, rows.shape[0]):
      s = s + rows[r]
    y = (y + s).astype(dtype).astype(jnp.float32)
  return y.astype(dtype)
