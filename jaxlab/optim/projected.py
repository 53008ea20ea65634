"""Linear gradient transformations: project matrix gradients to rank r, step there, map back.

For a matrix parameter W [m, n] with gradient G [m, n] and projectors P [m, r], Q [n, r]:

  side="left":   g = Pᵀ G     [r, n]    update = P u
  side="right":  g = G Q      [m, r]    update = u Qᵀ
  side="both":   g = Pᵀ G Q   [r, r]    update = P u Qᵀ   (Kronecker-factored)

`inner` (any optax transformation that needs only gradients: scale_by_adam, sgd,
...) runs on g, so its state has the low-rank shape. By the duality of
Torroba-Hennigen et al. (2025) this is the same trajectory as training only A in
the adapter W = W0 + P A (left), W0 + A Qᵀ (right) or W0 + P A Qᵀ (both); see
`jaxlab.models.lowrank` and docs/optim.md.

Projectors: "svd" (top singular vectors of the current gradient, GaLore; stored
in the state), "random" (Gaussian, columns of unit expected norm) and
"orthogonal" (orthonormalised Gaussian), both regenerated from (seed, parameter
name, refresh index) at every step, so they cost no state; or a fixed pytree of
user matrices. The projector is refreshed when count % update_every == 0.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

PROJECTORS = ("svd", "random", "orthogonal")
SIDES = ("auto", "left", "right", "both")
REFRESH_STATE = ("keep", "reset")

Filter = Callable[[str, Any], bool]


class Factors(NamedTuple):
  """The projectors of one matrix: left P [m, r] and/or right Q [n, r] (None if unused)."""
  left: Any
  right: Any


class ProjectedState(NamedTuple):
  """State of `projected`.

  count: int32 steps taken. inner_state: the inner transformation's state over
  low-rank gradients (projected leaves) and full gradients (the others).
  projectors: per parameter, the stored Factors ("svd") or None (random kinds
  and fixed matrices store nothing).
  """
  count: jax.Array
  inner_state: optax.OptState
  projectors: Any


class _Plan(NamedTuple):
  name: str
  side: str            # "left" | "right" | "both"
  low_shape: tuple[int, int]


# ---------------------------------------------------------------------------- helpers


def leaf_name(path) -> str:
  """A parameter's name: its key path joined by '/', without NNX's trailing '/value'."""
  s = jax.tree_util.keystr(tuple(path), simple=True, separator="/")
  return s[: -len("/value")] if s.endswith("/value") else s


def is_matrix(name: str, leaf) -> bool:
  """Default filter: project every 2-D parameter."""
  del name
  return len(leaf.shape) == 2


def resolve_side(side: str, shape) -> str:
  """'auto' projects the shorter side: left (P [m, r]) when m <= n, else right."""
  if side != "auto":
    return side
  m, n = shape
  return "left" if m <= n else "right"


def low_rank_shape(shape, rank: int, side: str) -> tuple[int, int]:
  m, n = shape
  return {"left": (rank, n), "right": (m, rank), "both": (rank, rank)}[side]


def leaf_key(seed: int, name: str) -> jax.Array:
  """The PRNG key of one parameter's random projector (stable under adding other params)."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def random_basis(key, dim: int, rank: int, kind: str = "random", dtype=jnp.float32) -> jax.Array:
  """A [dim, rank] sketch. "random": N(0, 1/dim) entries, so each column has unit expected
  norm like an orthonormal basis; "orthogonal": its QR factor (exactly orthonormal)."""
  g = jax.random.normal(key, (dim, rank), jnp.float32)
  if kind == "random":
    return (g * (1.0 / math.sqrt(dim))).astype(dtype)
  if kind == "orthogonal":
    q, r = jnp.linalg.qr(g)
    return (q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)).astype(dtype)
  raise ValueError(f"random_basis: unknown kind {kind!r} (known: random, orthogonal)")


def random_factors(key, refresh, shape, rank: int, side: str, kind: str = "random",
                   dtype=jnp.float32) -> Factors:
  """The random Factors of one matrix for refresh number `refresh` (may be traced)."""
  k = jax.random.fold_in(key, refresh)
  m, n = shape
  left = random_basis(jax.random.fold_in(k, 0), m, rank, kind, dtype) if side != "right" else None
  right = random_basis(jax.random.fold_in(k, 1), n, rank, kind, dtype) if side != "left" else None
  return Factors(left, right)


def svd_factors(grad_MN, rank: int, side: str, dtype=None) -> Factors:
  """GaLore projectors: top-`rank` left (U) / right (V) singular vectors of the gradient, in fp32."""
  dtype = grad_MN.dtype if dtype is None else dtype
  u, _, vh = jnp.linalg.svd(grad_MN.astype(jnp.float32), full_matrices=False)
  left = u[:, :rank].astype(dtype) if side != "right" else None
  right = vh[:rank, :].T.astype(dtype) if side != "left" else None
  return Factors(left, right)


def _known_sharding(x):
  """x's NamedSharding when it is known while tracing or placing: a concrete array's (or a
  ShapeDtypeStruct's), or the one in a tracer's type when the mesh has Explicit axes."""
  if isinstance(x, jax.core.Tracer):
    try:
      s = jax.typeof(x).sharding
    except Exception:  # noqa: BLE001 - no sharding in the type
      return None
    if isinstance(s, jax.sharding.NamedSharding) and any(
        t == jax.sharding.AxisType.Explicit for t in s.mesh.axis_types):
      return s
    return None
  s = getattr(x, "sharding", None)
  return s if isinstance(s, jax.sharding.NamedSharding) else None


def _spec2(sharding):
  """The (row, column) mesh axes of a matrix sharding."""
  spec = tuple(sharding.spec) + (None, None)
  return spec[0], spec[1]


def _traced_explicit(x) -> bool:
  return isinstance(x, jax.core.Tracer) and _known_sharding(x) is not None


def _einsum(spec, a, b, out_sharding, mesh_sharding):
  """einsum with an output sharding when the operands are sharded by type (Explicit mode)."""
  if mesh_sharding is None:
    return jnp.einsum(spec, a, b)
  ns = jax.sharding.NamedSharding(mesh_sharding.mesh, jax.sharding.PartitionSpec(*out_sharding))
  return jnp.einsum(spec, a, b, out_sharding=ns)


def project(g_MN, f: Factors):
  """Pᵀ G, G Q or Pᵀ G Q (a surviving sharded axis of G stays sharded)."""
  ns = _known_sharding(g_MN) if _traced_explicit(g_MN) else None
  a, b = _spec2(ns) if ns is not None else (None, None)
  if f.left is not None:
    g_MN = _einsum("mr,mn->rn", f.left.astype(g_MN.dtype), g_MN, (None, b), ns)
    a = None
  if f.right is not None:
    g_MN = _einsum("mn,nr->mr", g_MN, f.right.astype(g_MN.dtype), (a, None), ns)
  return g_MN


def project_back(u, f: Factors, like=None):
  """P u, u Qᵀ or P u Qᵀ, sharded like the matrix `like` in Explicit mode."""
  ns = _known_sharding(like) if like is not None and _traced_explicit(like) else None
  a, b = _spec2(ns) if ns is not None else (None, None)
  if f.right is not None:
    u = _einsum("mr,nr->mn", u, f.right.astype(u.dtype), (None if f.left is not None else a, b),
                ns)
  if f.left is not None:
    u = _einsum("mr,rn->mn", f.left.astype(u.dtype), u, (a, b), ns)
  return u


def _replicated(x):
  """x gathered to every device when it is sharded by type (SVD needs whole matrices)."""
  ns = _known_sharding(x) if _traced_explicit(x) else None
  if ns is None or all(a is None for a in ns.spec):
    return x
  return jax.reshard(x, jax.sharding.NamedSharding(ns.mesh, jax.sharding.PartitionSpec()))


def state_bytes(tree) -> int:
  """Bytes held by the arrays (or ShapeDtypeStructs) of a pytree."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "shape") and hasattr(x, "dtype"))


def _positive_int(value, arg: str, fn: str):
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{fn}: {arg} must be a positive integer, got {value!r}")


def _zeros_like_leaf(x):
  """Concrete zeros for an array or a ShapeDtypeStruct (keeping its sharding if it has one)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = getattr(x, "sharding", None)
    if sharding is not None:
      return jnp.zeros(x.shape, x.dtype, device=sharding)
    return jnp.zeros(x.shape, x.dtype)
  return x


def _replicated_zeros(shape, dtype, like):
  """Zeros replicated over the mesh of `like` (a leaf whose sharding is known), else plain."""
  ns = None if like is None else _known_sharding(like)
  if ns is None:
    return jnp.zeros(shape, dtype)
  out = jax.sharding.NamedSharding(ns.mesh, jax.sharding.PartitionSpec())
  if isinstance(like, jax.core.Tracer):
    return jnp.zeros(shape, dtype, out_sharding=out)
  return jnp.zeros(shape, dtype, device=out)


def _replicate_in_context(x):
  """Pin x replicated on the context mesh (jax.set_mesh) if there is one with Auto axes;
  otherwise XLA may shard a stored SVD projector differently from its initial value."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not isinstance(x, jax.core.Tracer) or _traced_explicit(x):
    return x
  return jax.lax.with_sharding_constraint(
      x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _low_rank_zeros(leaf, plan: _Plan):
  """Zeros of the low-rank shape, sharded as `update` will produce them: the matrix's
  surviving axis keeps its mesh axis (when the matrix's sharding is known)."""
  ns = _known_sharding(leaf)
  if ns is None:
    return jnp.zeros(plan.low_shape, leaf.dtype)
  a, b = _spec2(ns)
  spec = {"left": (None, b), "right": (a, None), "both": (None, None)}[plan.side]
  out = jax.sharding.NamedSharding(ns.mesh, jax.sharding.PartitionSpec(*spec))
  if isinstance(leaf, jax.core.Tracer):
    return jnp.zeros(plan.low_shape, leaf.dtype, out_sharding=out)
  return jnp.zeros(plan.low_shape, leaf.dtype, device=out)


# ---------------------------------------------------------------------------- factory


def projected(
    inner: optax.GradientTransformation,
    *,
    rank: int,
    projector: str | Any = "svd",
    update_every: int = 200,
    side: str = "auto",
    scale: float = 1.0,
    refresh_state: str = "keep",
    filter: Filter | None = None,  # noqa: A002 - optax-style argument name
    seed: int = 0,
) -> optax.GradientTransformation:
  """Run `inner` on rank-`rank` projections of matrix gradients (GaLore-style).

  Args:
    inner: a gradient-only optax transformation (scale_by_adam, sgd, adam, ...). It
      receives low-rank gradients for projected leaves, full gradients for the rest,
      and params=None (so put decoupled weight decay after this, as `galore` does).
    rank: rank r of every projection; must not exceed a projected side.
    projector: "svd" | "random" | "orthogonal", or a pytree like the params whose
      leaves are a fixed matrix (P [m, r] for side left, Q [n, r] for right), a pair
      (P, Q) (Kronecker-factored) or None (not projected). Fixed ones never refresh.
    update_every: refresh the projector when count % update_every == 0.
    side: "auto" (shorter side: left when m <= n), "left", "right" or "both".
    scale: multiplies the back-projected update of projected leaves.
    refresh_state: "keep" the inner state across refreshes (GaLore) or "reset" it
      (re-initialise the whole inner state, like a fresh optimizer for a re-initialised
      adapter).
    filter: (name, leaf) -> bool choosing projected leaves (default: every 2-D
      leaf). Not allowed with fixed projectors (None leaves decide there).
    seed: seed of the random projectors.
  """
  fn = "projected"
  if not (hasattr(inner, "init") and hasattr(inner, "update")):
    raise ValueError(f"{fn}: inner must be an optax GradientTransformation, got {inner!r}")
  _positive_int(rank, "rank", fn)
  _positive_int(update_every, "update_every", fn)
  if side not in SIDES:
    raise ValueError(f"{fn}: unknown side {side!r} (known: {', '.join(SIDES)})")
  if refresh_state not in REFRESH_STATE:
    raise ValueError(f"{fn}: unknown refresh_state {refresh_state!r} (known: keep, reset)")
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
    raise ValueError(f"{fn}: scale must be a finite number, got {scale!r}")
  if not isinstance(seed, int) or isinstance(seed, bool):
    raise ValueError(f"{fn}: seed must be an integer, got {seed!r}")
  fixed = not isinstance(projector, str)
  if not fixed and projector not in PROJECTORS:
    raise ValueError(f"{fn}: unknown projector {projector!r} "
                     f"(known: {', '.join(PROJECTORS)}, or a pytree of fixed matrices)")
  if fixed and filter is not None:
    raise ValueError(f"{fn}: filter must be None with fixed projectors "
                     "(a None projector leaf leaves that parameter unprojected)")
  select = is_matrix if filter is None else filter
  scale = float(scale)

  def plans_for(tree):
    """(leaves, treedef, plans, fixed factors) from a params/updates tree (static shapes)."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    fixed_leaves = [None] * len(with_path)
    if fixed:
      try:
        fixed_leaves = treedef.flatten_up_to(projector)
      except (ValueError, TypeError) as e:
        raise ValueError(f"{fn}: the projector pytree does not match the params: {e}") from None
    plans, factors = [], []
    for (path, leaf), fx in zip(with_path, fixed_leaves):
      name = leaf_name(path)
      shape = tuple(leaf.shape)
      if fixed:
        chosen = fx is not None
      else:
        chosen = bool(select(name, leaf))
      if not chosen:
        plans.append(None)
        factors.append(None)
        continue
      if len(shape) != 2:
        what = "projector pytree" if fixed else "filter"
        raise ValueError(f"{fn}: the {what} selected parameter {name!r} of shape {shape}; "
                         "only 2-D matrices can be projected")
      m, n = shape
      if fixed:
        if isinstance(fx, (tuple, list)):
          if len(fx) != 2:
            raise ValueError(f"{fn}: projector for {name!r} must be a matrix or a pair (P, Q)")
          f = Factors(fx[0], fx[1])
          s = "both"
        else:
          s = resolve_side(side, shape)
          if s == "both":
            raise ValueError(f"{fn}: side='both' needs a pair (P, Q) as the projector of {name!r}")
          f = Factors(fx, None) if s == "left" else Factors(None, fx)
        want = {"left": (m, None), "right": (None, n), "both": (m, n)}[s]
        for mat, dim, label in ((f.left, want[0], "P"), (f.right, want[1], "Q")):
          if mat is None:
            continue
          if tuple(mat.shape) != (dim, rank):
            raise ValueError(f"{fn}: projector {label} for {name!r} (shape {shape}) must have "
                             f"shape {(dim, rank)} for rank={rank}, got {tuple(mat.shape)}")
      else:
        s = resolve_side(side, shape)
        f = None
      for dim, axis in ((m, "rows (m)"), (n, "columns (n)")):
        uses = (s in ("left", "both")) if axis.startswith("rows") else (s in ("right", "both"))
        if uses and rank > dim:
          raise ValueError(f"{fn}: rank={rank} exceeds the {axis} = {dim} of parameter "
                           f"{name!r} with shape {shape}; lower rank or exclude it with filter=")
      plans.append(_Plan(name, s, low_rank_shape(shape, rank, s)))
      factors.append(f)
    leaves = [leaf for _, leaf in with_path]
    return leaves, treedef, plans, factors

  def inner_init(leaves, treedef, plans):
    low = [_low_rank_zeros(x, p) if p is not None else _zeros_like_leaf(x)
           for x, p in zip(leaves, plans)]
    return inner.init(treedef.unflatten(low))

  def init_fn(params):
    leaves, treedef, plans, _ = plans_for(params)
    stored = []
    for x, p in zip(leaves, plans):
      if p is None or fixed or projector != "svd":
        stored.append(None)
        continue
      m, n = x.shape
      stored.append(Factors(
          _replicated_zeros((m, rank), x.dtype, x) if p.side != "right" else None,
          _replicated_zeros((n, rank), x.dtype, x) if p.side != "left" else None))
    sharded = [x for x in leaves if _known_sharding(x) is not None]
    return ProjectedState(count=_replicated_zeros([], jnp.int32, sharded[0] if sharded else None),
                          inner_state=inner_init(leaves, treedef, plans),
                          projectors=treedef.unflatten(stored))

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef, plans, fixed_factors = plans_for(updates)
    count = state.count
    refresh = (count % update_every) == 0
    refresh_idx = count // update_every
    stored = treedef.flatten_up_to(state.projectors)

    factors, new_stored, low = [], [], []
    for g, p, st, fx in zip(leaves, plans, stored, fixed_factors):
      if p is None:
        factors.append(None)
        new_stored.append(None)
        low.append(g)
        continue
      if fixed:
        f = fx
        new_stored.append(None)
      elif projector == "svd":
        dtypes = tuple(None if a is None else a.dtype for a in st)
        def fresh(g=g, p=p, dtypes=dtypes):
          f = svd_factors(_replicated(g), rank, p.side)
          return Factors(*(None if a is None else a.astype(d) for a, d in zip(f, dtypes)))
        f = jax.lax.cond(refresh, fresh, lambda st=st: st)
        f = Factors(*(None if a is None else _replicate_in_context(a) for a in f))
        new_stored.append(f)
      else:
        f = random_factors(leaf_key(seed, p.name), refresh_idx, g.shape, rank, p.side,
                           kind=projector, dtype=g.dtype)
        new_stored.append(None)
      factors.append(f)
      low.append(project(g, f))

    inner_state = state.inner_state
    if refresh_state == "reset" and not fixed:
      blank = inner_init(leaves, treedef, plans)
      inner_state = jax.tree.map(
          lambda b, s: jnp.where(refresh, b.astype(s.dtype), s), blank, inner_state)
    try:
      low_updates, inner_state = inner.update(treedef.unflatten(low), inner_state, None)
    except ValueError as e:
      if "requires the current value of parameters" not in str(e):
        raise
      raise ValueError(
          f"{fn}: inner needs params (e.g. adamw's weight decay), but projected leaves have "
          "none in the low-rank space; use a gradient-only inner (scale_by_adam, adam, sgd) "
          "and chain optax.add_decayed_weights after projected, as galore() does") from None

    out = []
    for u, g, p, f in zip(treedef.flatten_up_to(low_updates), leaves, plans, factors):
      if p is None:
        out.append(u)
      else:
        out.append((scale * project_back(u, f, like=g)).astype(g.dtype))
    return treedef.unflatten(out), ProjectedState(
        count=optax.safe_int32_increment(count), inner_state=inner_state,
        projectors=treedef.unflatten(new_stored))

  return optax.GradientTransformation(init_fn, update_fn)


def galore(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int,
    update_every: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    side: str = "auto",
    refresh_state: str = "keep",
    filter: Filter | None = None,  # noqa: A002
) -> optax.GradientTransformation:
  """GaLore-AdamW (Zhao et al. 2024): SVD projector of the shorter side refreshed every
  `update_every` steps, Adam moments kept across refreshes, `scale` on the projected
  update, decoupled weight decay on the full weights, then the learning rate."""
  return optax.chain(
      projected(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), rank=rank, projector="svd",
                update_every=update_every, side=side, scale=scale,
                refresh_state=refresh_state, filter=filter),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
