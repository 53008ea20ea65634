"""Low-rank additive adapters with frozen projectors (the duals of `jaxlab.optim.projected`).

  OneSidedLoRA, side="left":   W = W0 + s P A      P [m, r] fixed, A [r, n] trained
  OneSidedLoRA, side="right":  W = W0 + s A Qᵀ     Q [n, r] fixed, A [m, r] trained
  TwoSidedLoRA:                W = W0 + s P A Qᵀ   P, Q fixed,     A [r, r] trained

The kernel is [in, out] = [m, n] (y = x W, as `jaxlab.models.layers.Linear`). A
starts at zero, so the model starts at W0. W0 is a `Frozen` variable and P, Q are
`Basis` variables: an optimizer built with `wrt=nnx.Param` trains only A (and any
other nnx.Param of the model). Training A with an optimizer U gives the same
weights as training W with `projected(U, projector=P)` (Torroba-Hennigen et al.
2025); `merge_and_reinit` (W0 += s ΔW, A = 0, new P) is the dual of a projector
refresh. Random bases come from `jaxlab.optim.random_factors`, keyed like the
optimizer's, so the two stay in step across refreshes too.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab.optim.projected import (
    Factors,
    leaf_key,
    random_factors,
    resolve_side,
)

IMPLS = ("factored", "reference")
BASIS_KINDS = ("random", "orthogonal")


class Frozen(nnx.Variable):
  """A base weight W0 that the optimizer does not update (merges write into it)."""


class Basis(nnx.Variable):
  """A fixed projector (P or Q) of an adapter."""


class BasisKey(nnx.Variable):
  """The PRNG key from which an adapter's random bases are drawn."""


class RefreshCount(nnx.Variable):
  """How many merge-and-reinit rounds an adapter has done (selects its next basis)."""


class _LowRank(nnx.Module):
  """Shared code of OneSidedLoRA and TwoSidedLoRA."""

  def __init__(self, base_kernel, *, rank: int, side: str, basis: Factors | None, key,
               kind: str, scale: float, bias, impl: str):
    cls = type(self).__name__
    shape = tuple(base_kernel.shape)
    if len(shape) != 2:
      raise ValueError(f"{cls}: base_kernel must be a matrix [in, out], got shape {shape}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
      raise ValueError(f"{cls}: rank must be a positive integer, got {rank!r}")
    m, n = shape
    side = resolve_side(side, shape)
    if (side in ("left", "both") and rank > m) or (side in ("right", "both") and rank > n):
      raise ValueError(f"{cls}: rank={rank} exceeds a projected side of the kernel {shape} "
                       f"(side={side!r})")
    if impl not in IMPLS:
      raise ValueError(f"{cls}: unknown impl {impl!r} (known: {', '.join(IMPLS)})")
    if kind not in BASIS_KINDS:
      raise ValueError(f"{cls}: unknown kind {kind!r} (known: {', '.join(BASIS_KINDS)})")
    if basis is None and key is None:
      raise ValueError(f"{cls}: give a basis (fixed projectors) or a key (random ones)")
    dtype = base_kernel.dtype
    self.side, self.rank, self.scale, self.impl, self.kind = side, rank, float(scale), impl, kind
    self.shape = shape
    self.kernel0 = Frozen(jnp.asarray(base_kernel))
    self.refresh = RefreshCount(jnp.zeros([], jnp.int32))
    self.basis_key = BasisKey(key) if key is not None else None
    if basis is None:
      basis = random_factors(key, 0, shape, rank, side, kind=kind, dtype=dtype)
    basis = Factors(*basis)
    self._check_basis(basis)
    self.P = Basis(jnp.asarray(basis.left, dtype)) if basis.left is not None else None
    self.Q = Basis(jnp.asarray(basis.right, dtype)) if basis.right is not None else None
    low = {"left": (rank, n), "right": (m, rank), "both": (rank, rank)}[side]
    self.A = nnx.Param(jnp.zeros(low, dtype))
    self.bias = nnx.Param(jnp.asarray(bias)) if bias is not None else None

  def _check_basis(self, basis: Factors):
    m, n = self.shape
    want = dict(left=(m, self.rank) if self.side != "right" else None,
                right=(n, self.rank) if self.side != "left" else None)
    for label, mat in (("left", basis.left), ("right", basis.right)):
      got = None if mat is None else tuple(mat.shape)
      if got != want[label]:
        raise ValueError(f"{type(self).__name__}: basis.{label} must have shape {want[label]} "
                         f"for kernel {self.shape}, rank={self.rank}, side={self.side!r}; "
                         f"got {got}")

  def basis(self) -> Factors:
    return Factors(None if self.P is None else self.P[...],
                   None if self.Q is None else self.Q[...])

  def _delta32(self) -> jax.Array:
    """s ΔW [m, n] in at least fp32."""
    ct = jnp.promote_types(self.kernel0[...].dtype, jnp.float32)
    a = self.A[...].astype(ct)
    if self.Q is not None:
      a = a @ self.Q[...].astype(ct).T
    if self.P is not None:
      a = self.P[...].astype(ct) @ a
    return self.scale * a

  def delta(self) -> jax.Array:
    """s ΔW [m, n] materialised (products in >= fp32, returned in the kernel dtype)."""
    return self._delta32().astype(self.kernel0[...].dtype)

  def kernel(self) -> jax.Array:
    """The effective weight W0 + s ΔW (the reference form)."""
    w0 = self.kernel0[...]
    d = self._delta32()
    return (w0.astype(d.dtype) + d).astype(w0.dtype)

  def __call__(self, x):
    """y = x (W0 + s ΔW) (+ bias): "factored" never forms ΔW, "reference" does."""
    if self.impl == "reference":
      y = jnp.einsum("...i,io->...o", x, self.kernel().astype(x.dtype))
    else:
      y = jnp.einsum("...i,io->...o", x, self.kernel0[...].astype(x.dtype))
      h = x
      if self.P is not None:
        h = jnp.einsum("...i,ir->...r", h, self.P[...].astype(x.dtype))
      h = jnp.einsum("...r,rk->...k", h, self.A[...].astype(x.dtype))
      if self.Q is not None:
        h = jnp.einsum("...r,or->...o", h, self.Q[...].astype(x.dtype))
      y = y + self.scale * h
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y

  def merge_and_reinit(self, basis: Factors | None = None):
    """W0 += s ΔW; A = 0; switch to `basis`, or to the next random basis of the key.

    Without a key and without `basis` the projectors are kept. The optimizer
    state of A is the caller's choice: keeping it is the dual of GaLore's refresh.
    """
    self.kernel0[...] = self.kernel()
    self.A[...] = jnp.zeros_like(self.A[...])
    self.refresh[...] = self.refresh[...] + 1
    if basis is None and self.basis_key is not None:
      basis = random_factors(self.basis_key[...], self.refresh[...], self.shape, self.rank,
                             self.side, kind=self.kind, dtype=self.kernel0[...].dtype)
    if basis is not None:
      basis = Factors(*basis)
      self._check_basis(basis)
      if self.P is not None:
        self.P[...] = jnp.asarray(basis.left, self.P[...].dtype)
      if self.Q is not None:
        self.Q[...] = jnp.asarray(basis.right, self.Q[...].dtype)


class OneSidedLoRA(_LowRank):
  """W = W0 + s P A (side "left") or W0 + s A Qᵀ ("right"); "auto" picks the shorter side.

  base_kernel: W0 [in, out]. basis: the fixed projector (a matrix, or Factors);
  without it the basis is drawn from `key` (see `jaxlab.optim.random_factors`).
  """

  def __init__(self, base_kernel, *, rank: int, side: str = "auto", basis=None, key=None,
               kind: str = "random", scale: float = 1.0, bias=None, impl: str = "factored"):
    if side not in ("auto", "left", "right"):
      raise ValueError(f"OneSidedLoRA: unknown side {side!r} (known: auto, left, right)")
    s = resolve_side(side, base_kernel.shape) if len(base_kernel.shape) == 2 else side
    if basis is not None and not isinstance(basis, (tuple, list)):
      basis = Factors(basis, None) if s == "left" else Factors(None, basis)
    super().__init__(base_kernel, rank=rank, side=s, basis=basis, key=key, kind=kind,
                     scale=scale, bias=bias, impl=impl)


class TwoSidedLoRA(_LowRank):
  """W = W0 + s P A Qᵀ with P [in, r], Q [out, r] fixed and A [r, r] trained (Kronecker case)."""

  def __init__(self, base_kernel, *, rank: int, basis=None, key=None, kind: str = "random",
               scale: float = 1.0, bias=None, impl: str = "factored"):
    if basis is not None and (not isinstance(basis, (tuple, list)) or len(basis) != 2):
      raise ValueError("TwoSidedLoRA: basis must be a pair (P, Q)")
    super().__init__(base_kernel, rank=rank, side="both", basis=basis, key=key, kind=kind,
                     scale=scale, bias=bias, impl=impl)


# ---------------------------------------------------------------------------- model surgery


def _is_linear(node) -> bool:
  """A module computing y = x @ kernel (+ bias) with kernel [in, out] held in `kernel`."""
  from jaxlab.models.layers import Linear
  return isinstance(node, (Linear, nnx.Linear))


def _path_name(path) -> str:
  return "/".join(str(p) for p in path)


def apply_adapters(model: nnx.Module, *, rank: int, side: str = "auto", two_sided: bool = False,
                   kind: str = "random", seed: int = 0, scale: float = 1.0,
                   filter: Callable[[str, Any], bool] | None = None,  # noqa: A002
                   impl: str = "factored") -> list[str]:
  """Replace, in place, every Linear layer (jaxlab `Linear` or `nnx.Linear`) of `model`
  whose kernel `filter(name, kernel)` accepts with a OneSidedLoRA (TwoSidedLoRA if
  `two_sided`) around its current kernel. Returns the kernel names ("path/kernel").

  Each adapter's random basis is keyed by `leaf_key(seed, name)`, the key
  `projected(..., projector=kind, seed=seed)` uses for that kernel, so merged
  adapters and the projected optimizer see the same projectors.
  """
  targets = []
  for path, node in nnx.iter_graph(model):
    if path and _is_linear(node):
      name = _path_name(path) + "/kernel"
      kernel = node.kernel[...]
      if filter is None or filter(name, kernel):
        targets.append((path, node, name))
  names = []
  for path, node, name in targets:
    kernel = node.kernel[...]
    bias = None if getattr(node, "bias", None) is None else node.bias[...]
    key = leaf_key(seed, name)
    if two_sided:
      new = TwoSidedLoRA(kernel, rank=rank, key=key, kind=kind, scale=scale, bias=bias, impl=impl)
    else:
      new = OneSidedLoRA(kernel, rank=rank, side=side, key=key, kind=kind, scale=scale,
                         bias=bias, impl=impl)
    parent = model
    for p in path[:-1]:
      parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    if isinstance(path[-1], int):
      parent[path[-1]] = new
    else:
      setattr(parent, path[-1], new)
    names.append(name)
  return names


def adapters(model: nnx.Module) -> list[tuple[str, _LowRank]]:
  """(kernel name, adapter) for every adapter in `model`."""
  return [(_path_name(path) + "/kernel", node) for path, node in nnx.iter_graph(model)
          if isinstance(node, _LowRank)]


def merge_and_reinit(model: nnx.Module,
                     basis_fn: Callable[[str, _LowRank], Factors | None] | None = None):
  """Merge every adapter into its base and re-initialise it (ReLoRA style).

  basis_fn(name, adapter) may return the new Factors (e.g. from an SVD of the full
  gradient); by default each adapter draws its next random basis.
  """
  for name, a in adapters(model):
    a.merge_and_reinit(None if basis_fn is None else basis_fn(name, a))
