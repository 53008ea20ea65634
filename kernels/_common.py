"""Shared plumbing for the batch-1 decode kernels: impl checks, interpret mode,
Mosaic-GPU layout helpers, block-size choice and small GMEM<->SMEM moves.

Every kernel is written for Mosaic GPU (`plgpu.kernel`, Lane semantics, one
warpgroup per CTA). On CPU it runs interpreted (see MODES below). Neither
interpreter knows register layouts, so `Ctx` turns layout casts into no-ops when
interpreting and uses `plgpu.broadcasted_iota` only when compiling; in the fast
"hlo" mode it also swaps the TMA plumbing for direct block reads and writes.
"""

from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

IMPLS = ("xla", "pallas")


def check_impl(impl: str, op: str) -> str:
  """Validate an explicit impl choice; no silent fallback."""
  if impl not in IMPLS:
    raise ValueError(f"{op}: unknown impl {impl!r} (known: {', '.join(IMPLS)})")
  return impl


def concrete_int(x) -> int | None:
  """x as a Python int when it is concrete, None under tracing (then checks are skipped)."""
  try:
    return int(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def check_length(op: str, length, lo: int, S: int):
  """A concrete cache length must be in lo..S (the cache length); traced ones pass."""
  n = concrete_int(length)
  if n is not None and not lo <= n <= S:
    raise ValueError(f"{op}: length={n} must be in {lo}..{S} (the cache length)")


def default_interpret() -> bool:
  """Pallas kernels must be interpreted on CPU (there is no CPU lowering)."""
  return jax.default_backend() == "cpu"


# How a kernel runs:
#   "compile": Mosaic GPU lowering (Hopper); the only mode with real performance.
#   "hlo":     Pallas' HLO interpreter (interpret=True): fast on CPU. TMA pipelines
#              and SMEM staging are replaced by direct block reads/writes of the
#              same blocks (same index maps, same tile math).
#   "mosaic":  the Mosaic-GPU interpreter (InterpretGPUParams): runs the exact
#              kernel (SMEM, TMA copies, barriers, emit_pipeline) on CPU, with
#              NaN-filled uninitialized memory; ~10-50x slower than "hlo".
MODES = ("compile", "hlo", "mosaic")

# Programmatic Dependent Launch (PDL), the `pdl=` option of every Pallas op:
#   None:       plain stream order: a kernel starts when the previous one has finished.
#   "wait":     the kernel may be launched while the previous kernel still runs (its
#               launch, SMEM setup and barrier init overlap that kernel's tail); it
#               calls griddepcontrol.wait before it reads anything and
#               griddepcontrol.launch_dependents right after.
#   "prefetch": "wait", and before the wait the kernel reads its first weight tiles
#               (throwaway SMEM), so they are in L2 when its pipeline asks for them.
#               The weights must not be written inside the step (true for parameters
#               of an unrolled decode step; not for weights sliced inside a scan).
PDL_MODES = ("wait", "prefetch")


def check_pdl(pdl, op: str):
  if pdl is not None and pdl not in PDL_MODES:
    raise ValueError(f"{op}: unknown pdl {pdl!r} (known: None, {', '.join(PDL_MODES)})")
  return pdl


# SMEM for the throwaway prefetch tiles (H100: 227 KB per CTA; the pipeline's own
# buffers are allocated after these are released).
PREFETCH_SMEM_BYTES = 160 * 1024


def check_prefetch(tiles: int | None, tile_bytes: int, op: str, pdl: str | None, mode: str):
  """prefetch_tiles (None: the pipeline depth) goes with pdl="prefetch", is >= 1 and, on
  the GPU, fits PREFETCH_SMEM_BYTES (the interpreters' default blocks are larger)."""
  if tiles is None:
    return
  if pdl != "prefetch":
    raise ValueError(f"{op}: prefetch_tiles={tiles} needs pdl='prefetch' (got pdl={pdl!r})")
  if tiles < 1 or (mode == "compile" and tiles * tile_bytes > PREFETCH_SMEM_BYTES):
    raise ValueError(f"{op}: prefetch_tiles={tiles} must be >= 1 and fit "
                     f"{PREFETCH_SMEM_BYTES // 1024} KB of SMEM ({tile_bytes} bytes a tile)")


def pdl_launch_supported() -> bool:
  """Whether this JAX launches a Mosaic-GPU kernel that calls griddepcontrol.wait with
  programmatic stream serialization (JAX >= 0.11.0). Older JAX emits the same
  instructions, and they are no-ops there: plain stream order."""
  major, minor = (int(p) for p in jax.__version__.split(".")[:2])
  return (major, minor) >= (0, 11)


def resolve_interpret(interpret: bool | str | None) -> str:
  """interpret: None -> "hlo" on CPU else "compile"; True -> "hlo"; False -> "compile";
  or a mode name."""
  if interpret is None:
    return "hlo" if default_interpret() else "compile"
  if interpret is True:
    return "hlo"
  if interpret is False:
    return "compile"
  if interpret in MODES:
    return interpret
  raise ValueError(f"interpret: expected None, a bool or one of {MODES}, got {interpret!r}")


def interpret_params(mode: str):
  """`interpret=` value for plgpu.kernel in a given mode."""
  if mode == "compile":
    return None
  if mode == "hlo":
    return True
  from jaxlab._compat import mosaic_gpu_interpret_params
  cls = mosaic_gpu_interpret_params()
  if cls is None:
    raise RuntimeError("this JAX has no Mosaic-GPU interpreter (InterpretGPUParams); "
                       "use interpret='hlo'")
  return cls()


WGMMA = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)   # [m] vector: one value per row of a WGMMA tile
COL = plgpu.Layout.WGMMA.reduce(0)   # [n] vector: one value per column of a WGMMA tile


def s8_b_layout(width: int):
  """Register layout of the "mma-s8" form's B^T tile [8, width] int8 (kernels/_gemv.py),
  width = its swizzle in bytes (128 or 64): each warp writes two of the 8 rows, each
  thread 8 (width 128) or 4 consecutive elements of one row, in 4-element vectors (16
  bytes of the fp32 vector it is computed from: a wider vector load would cross the
  16-byte unit of an unswizzled SMEM row). Its reduce(0) is the vector's layout."""
  if width == 128:
    return plgpu.Layout.TILED(plgpu.Tiling(((8, 128), (2, 128), (8,), (4,))),
                              warp_dims=(-6,), lane_dims=(-4, -3), vector_dim=-1)
  if width == 64:
    return plgpu.Layout.TILED(plgpu.Tiling(((8, 64), (2, 64), (4,))),
                              warp_dims=(-5,), lane_dims=(-3, -2), vector_dim=-1)
  raise ValueError(f"s8_b_layout: width {width} (expected 128 or 64)")


S8_VEC = s8_b_layout(128).reduce(0)   # [BK] vector of the "mma-s8" form: 8 values a thread


def strided(n: int):
  """[n] vector spread over the warpgroup with no copies: n / 128 consecutive values a
  thread (the cheapest layout for elementwise work; none of WGMMA's)."""
  return plgpu.Layout.WG_STRIDED((n,), vec_size=max(1, n // 128))


@dataclasses.dataclass(frozen=True)
class Ctx:
  """Per-kernel switches that differ between compiling and interpreting.

  Layout casts are no-ops when interpreting (neither interpreter models register
  layouts); in "hlo" mode the TMA plumbing (`pipeline`, `load`, `store`) is
  replaced by direct reads and writes of the same blocks.
  """
  mode: str
  grid_names: tuple[str, ...] = ()
  program_ids: bool = False   # a pallas_call grid (aliased kernels): no axis names
  pdl: str | None = None      # PDL_MODES
  # begin() marks this when called (a fresh list per traced body: see mosaic_kernel)
  begun: list = dataclasses.field(default_factory=list, compare=False, hash=False)
  # _write marks each TMA store, so that mosaic_kernel ends the body with a full wait
  stored: list = dataclasses.field(default_factory=list, compare=False, hash=False)

  def begin(self, prefetch=()):
    """The point after which the kernel may read what earlier kernels of the step wrote.

    Every kernel body calls it, before its first read of an input (with pdl set, the
    GMEM helpers below refuse to run before it). With PDL it waits for the previous
    kernel (griddepcontrol.wait) and then lets the next one launch; launching only
    after the wait keeps at most two kernels in flight, so everything older than the
    previous kernel is finished. prefetch: (GMEM weight tile, SMEM transforms) pairs
    read into throwaway SMEM before the wait ("prefetch" mode; a no-op in "hlo" mode,
    which has no TMA)."""
    self.begun.append(True)
    if self.pdl is None:
      return

    def sync():
      if self.mode == "compile":   # neither interpreter knows griddepcontrol
        plgpu.griddepcontrol_wait()
        plgpu.griddepcontrol_launch_dependents()

    tiles = list(prefetch) if self.pdl == "prefetch" and self.tma else []
    if not tiles:
      sync()
      return
    # the copies are in flight during the wait; their data is dropped
    _staged([src for src, _ in tiles], lambda *_: None, [tr for _, tr in tiles],
            while_in_flight=sync)

  def _check_begun(self, what: str):
    if self.pdl is not None and not self.begun:
      raise RuntimeError(f"kernel {what} before ctx.begin(): with pdl it could read what "
                         "the previous kernel has not finished writing")

  def axis(self, name: str):
    """This CTA's index along grid axis `name`."""
    if self.tma and not self.program_ids:
      return lax.axis_index(name)
    return pl.program_id(self.grid_names.index(name))

  @property
  def interpret(self) -> bool:
    return self.mode != "compile"

  @property
  def tma(self) -> bool:
    return self.mode != "hlo"

  def cast(self, x, layout):
    return x if self.interpret else plgpu.layout_cast(x, layout)

  def ld(self, ref, layout=None, idx=...):
    """ref[idx] in `layout` (cast right after the load so the load uses it)."""
    v = ref[idx]
    return v if layout is None else self.cast(v, layout)

  def iota(self, shape, dim, layout):
    if self.interpret:
      return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=layout)

  def zeros(self, shape, layout):
    return self.cast(jnp.zeros(shape, jnp.float32), layout)

  def pipeline(self, body, *, grid: tuple, in_specs, stages: int = 2, init_carry=None):
    """plgpu.emit_pipeline over a 1-D (possibly dynamic) grid, or its "hlo" twin:
    a fori_loop handing the body views of the same GMEM blocks.

    Inputs only: bodies store their outputs with `store` (the Mosaic-GPU
    interpreter of JAX 0.10.2 cannot run emit_pipeline out_specs, whose copies
    are predicated)."""
    self._check_begun("streams GMEM")
    if self.tma:
      return plgpu.emit_pipeline(body, grid=grid, in_specs=in_specs,
                                 max_concurrent_steps=stages, init_carry=init_carry)
    (steps,) = grid

    def views(specs, refs, idx):
      out = []
      for spec, r in zip(specs, refs):
        bidx = spec.index_map(*idx)
        out.append(r.at[tuple(pl.ds(b * n, n) for b, n in zip(bidx, spec.block_shape))])
      return out

    def run(*refs):
      def step(i, carry):
        idx = (i,)
        args = views(in_specs, refs, idx)
        if init_carry is None:
          body(idx, *args)
          return carry
        return body(idx, *args, carry)

      res = lax.fori_loop(0, steps, step, 0 if init_carry is None else init_carry)
      return None if init_carry is None else res

    return run

  def store(self, val, dst_gmem, transforms=(), rows: int | None = None):
    """Registers -> GMEM slice owned by this CTA (via SMEM + TMA when compiling).
    2-D tiles in the WGMMA layout should pass `tile_transforms` (swizzled SMEM).
    rows: only the first `rows` rows of a 2-D val, or entries of a 1-D one (dst_gmem has
    that many)."""
    if rows is not None and not self.tma:   # "hlo": straight into dst_gmem
      val, rows = val[:rows], None

    def fill(ref):
      ref[...] = val.astype(ref.dtype)

    if rows is None:
      self._write(fill, dst_gmem, transforms)
    else:   # the whole tile to SMEM, its first rows to GMEM
      self._write(fill, dst_gmem, transforms, smem_shape=val.shape,
                  view=lambda s: s.at[pl.ds(0, rows)])

  def store_rows(self, rows, dst_gmem):
    """1-D vectors -> the rows of a [len(rows), n] GMEM slice owned by this CTA, with one
    TMA store and one wait for all of them when compiling (not one per row)."""
    def fill(ref):
      for i, r in enumerate(rows):
        ref[i] = r.astype(ref.dtype)

    self._write(fill, dst_gmem)

  def _write(self, fill, dst_gmem, transforms=(), smem_shape=None, view=None):
    """fill(ref) on dst_gmem directly ("hlo"), or on an SMEM copy then stored by TMA.

    The store waits only until TMA has read the SMEM copy (so the buffer can go), not
    until the write has landed in GMEM: a store inside a loop (a level, a cache block)
    then costs no GMEM round trip per iteration. No kernel reads back what it stores,
    and mosaic_kernel ends every body that stored with one full wait. smem_shape / view:
    an SMEM copy of another shape, of which view(copy) is stored."""
    self._check_begun("stores")
    if not self.tma:
      fill(dst_gmem)
      return
    self.stored.append(True)

    def body(s):
      fill(s)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(s if view is None else view(s), dst_gmem)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    pl.run_scoped(body, plgpu.SMEM(smem_shape or dst_gmem.shape, dst_gmem.dtype,
                                   transforms=transforms))

  def load(self, src_gmem, fn, transforms=()):
    """fn(ref) on a GMEM slice staged into SMEM by TMA (direct ref in "hlo" mode)."""
    self._check_begun("loads")
    if not self.tma:
      return fn(src_gmem)
    return _staged([src_gmem], fn, [transforms])

  def load_all(self, srcs, fn):
    """fn(*refs) on several GMEM blocks staged into SMEM together: every TMA copy is
    in flight before the first wait (one latency, not one per block)."""
    self._check_begun("loads")
    if not self.tma:
      return fn(*srcs)
    return _staged(srcs, fn, [()] * len(srcs))


def _staged(srcs, fn, transforms, while_in_flight=None):
  """fn(*smem copies of srcs): every TMA copy issued, then while_in_flight() (if any),
  then one wait per copy."""
  def body(*scratch):
    smem, bars = scratch[:len(srcs)], scratch[len(srcs):]
    for src, s, bar in zip(srcs, smem, bars):
      plgpu.copy_gmem_to_smem(src, s, bar)
    if while_in_flight is not None:
      while_in_flight()
    for bar in bars:
      plgpu.barrier_wait(bar)
    return fn(*smem)

  return pl.run_scoped(body, *[plgpu.SMEM(s.shape, s.dtype, transforms=t)
                               for s, t in zip(srcs, transforms)],
                       *[plgpu.Barrier(num_arrivals=1) for _ in srcs])


def silu(x):
  """x * sigmoid(x), written as the kernels compute it."""
  return x / (1.0 + jnp.exp(-x))


def widen(w):
  """A weight tile in fp32 for the FMAs. int8 goes through bf16 (exact: |w| <= 128 fits
  bf16's 8 significant bits) because Mosaic GPU converts s8 -> bf16 with a few integer
  ops per register pair (prmt/and/sub), while s8 -> f32 is one I2F per element, a
  quarter-rate instruction that set the int8 MLP's pace on the H100."""
  if w.dtype == jnp.int8:
    w = w.astype(jnp.bfloat16)
  return w.astype(jnp.float32)


def bcast_rows(v, shape):
  """[n] column vector -> [m, n] (same vector in every row)."""
  return lax.broadcast_in_dim(v, shape, (1,))


def bcast_cols(v, shape):
  """[m] row vector -> [m, n] (same value along each row)."""
  return lax.broadcast_in_dim(v, shape, (0,))


def tile_transforms(cols: int, dtype) -> tuple:
  """SMEM tiling + swizzle for a [rows, cols] tile read in the WGMMA layout."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(cols * itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def mma_transforms(swizzle: int) -> tuple:
  """SMEM tiling + swizzle of two bf16 WGMMA operands that share a swizzle (A as TMA lands
  it, B built in registers): rows of swizzle // 2 elements."""
  return (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))


def mma_product(ctx: Ctx, a, b, shape, *, refs=(True, True), swizzle: int | None = None):
  """a @ b, fp32 [shape] (WGMMA layout), for bf16 operands (a may be an int8 weight tile:
  mma_a; swizzle = b's, for its staging tile): SMEM refs on the tensor cores into a
  fresh accumulator, or ("hlo") the same exact products summed by XLA, where `refs`
  says which of a, b are refs (an operand built in registers is an array there)."""
  if not ctx.tma:
    a, b = (t[...] if r else t for t, r in zip((a, b), refs))
    return jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)

  def mm(acc_ref, *stage):
    a_op = mma_a(a, stage[0] if stage else None)
    if stage:
      plgpu.commit_smem()
    plgpu.wgmma(acc_ref, a_op, b)
    return acc_ref[...]   # waits for the WGMMA

  stage = ([plgpu.SMEM(a.shape, jnp.bfloat16, transforms=mma_transforms(swizzle))]
           if stages_mma_a(ctx, a.dtype) else [])
  if not stage:
    return pl.run_scoped(mm, plgpu.ACC(shape, jnp.float32))
  return pl.run_scoped(lambda st: pl.run_scoped(lambda acc: mm(acc, st),
                                                plgpu.ACC(shape, jnp.float32)), *stage)


def mma_a(w, stage=None):
  """WGMMA's A operand for the weight tile ref w: bf16 straight from SMEM, or int8 widened
  to bf16 in registers (exact; WGMMA multiplies like types only, and only A may come
  from registers). The Mosaic-GPU interpreter has no WGMMA with A in registers: there
  the widened tile goes through `stage` (bf16 SMEM, B's swizzle) instead; the caller
  commits it."""
  if w.dtype != jnp.int8:
    return w
  a = w[...].astype(jnp.bfloat16)
  if stage is None:
    return a
  stage[...] = a
  return stage


def stages_mma_a(ctx: Ctx, w_dtype) -> bool:
  """Whether mma_a stages int8 A tiles through SMEM (the Mosaic-GPU interpreter)."""
  return ctx.mode == "mosaic" and jnp.dtype(w_dtype) == jnp.int8


def weight_transforms(cols: int, dtype, mma: int | None) -> tuple:
  """SMEM transforms of a [rows, cols] weight tile: read into registers (the "fma" form, and
  int8 in the "mma" form, widened there to an A operand), or bf16 A straight from SMEM
  ("mma", swizzle `mma` bytes, shared with B). int8 tiles in the "mma-s8" form are A
  straight from SMEM in the first kind (128-byte rows: the swizzle of its B^T)."""
  if mma is None or jnp.dtype(dtype) == jnp.int8:
    return tile_transforms(cols, dtype)
  return mma_transforms(mma)


def pick_block(n: int, cap: int, multiple: int, name: str) -> int:
  """Largest multiple of `multiple` that divides n and is <= cap."""
  if n % multiple:
    raise ValueError(f"{name}={n} must be a multiple of {multiple} for the Pallas decode kernels")
  best = multiple
  b = multiple
  while b <= min(n, cap):
    if n % b == 0:
      best = b
    b += multiple
  return best


def check_block(n: int, block: int, multiple: int, name: str):
  if block <= 0 or block % multiple or n % block:
    raise ValueError(f"block for {name}: {block} must be a positive multiple of {multiple} "
                     f"dividing {name}={n}")


def mosaic_kernel(body, *, out_type, grid: tuple[int, ...], grid_names: tuple[str, ...],
                  mode: str, name: str, input_output_aliases: dict[int, int] | None = None,
                  pdl: str | None = None, approx_math: bool = False):
  """plgpu.kernel (new argument names, one warpgroup per CTA) when compiling or in
  the Mosaic-GPU interpreter; a whole-array pl.pallas_call over the same grid in
  "hlo" mode (the HLO interpreter does not bind plgpu grid axis names).

  input_output_aliases {input index: output index}: the output *is* that input's
  buffer (updated in place; XLA copies only if the input is still live). plgpu.kernel
  has no such argument, so aliased kernels are a Mosaic-GPU pallas_call over GMEM refs
  (grid axes then read with pl.program_id); this runs in all three modes.

  pdl: PDL_MODES or None; the body must call ctx.begin() (checked when it is traced).
  approx_math: exp2 and the like as single approximate instructions when compiling
  (ex2.approx.ftz: 2 ulp, results below 2^-126 flushed to zero)."""
  check_pdl(pdl, name)
  inner = body

  def body(*refs, ctx: Ctx):
    ctx = dataclasses.replace(ctx, pdl=pdl, begun=[], stored=[])
    out = inner(*refs, ctx=ctx)
    if not ctx.begun:
      raise RuntimeError(f"{name}: the kernel body never calls ctx.begin()")
    if ctx.stored:   # Ctx._write waited for its SMEM reads only: now for the GMEM writes
      plgpu.wait_smem_to_gmem(0)
    return out

  if mode == "hlo":
    ctx = Ctx(mode, tuple(grid_names))
    return pl.pallas_call(functools.partial(body, ctx=ctx), out_shape=out_type, grid=grid,
                          interpret=True, name=name,
                          input_output_aliases=dict(input_output_aliases or {}))
  params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane,
                                approx_math=approx_math)
  if input_output_aliases and mode == "compile":
    return _aliased_kernel(body, out_type=out_type, grid=grid, grid_names=grid_names,
                           name=name, aliases=dict(input_output_aliases), params=params)
  if input_output_aliases:
    ctx = Ctx(mode, tuple(grid_names), program_ids=True)
    gmem = lambda: pl.BlockSpec(memory_space=plgpu.GMEM)
    n_out = len(out_type) if isinstance(out_type, (tuple, list)) else None
    call = lambda n_in: pl.pallas_call(
        functools.partial(body, ctx=ctx), out_shape=out_type, grid=grid,
        in_specs=[gmem() for _ in range(n_in)],
        out_specs=gmem() if n_out is None else tuple(gmem() for _ in range(n_out)),
        input_output_aliases=dict(input_output_aliases), interpret=interpret_params(mode),
        compiler_params=params, name=name)
    return lambda *args: call(len(args))(*args)
  ctx = Ctx(mode, tuple(grid_names))
  return plgpu.kernel(
      functools.partial(body, ctx=ctx), out_type=out_type, grid=grid,
      grid_names=grid_names, interpret=interpret_params(mode), compiler_params=params,
      kernel_name=name)


def _aliased_kernel(body, *, out_type, grid, grid_names, name, aliases, params):
  """A compiled kernel whose output o *is* input i's buffer for each {i: o} in aliases.

  The aliased inputs go in as mutable refs (`jax.new_ref`), which pl.kernel takes as
  operands it may write; under jit they are discharged into the custom call's own
  input/output aliasing, so XLA updates the buffer in place when the input is dead
  afterwards (a donated or loop-carried cache). This is the one form that compiles on
  both JAX 0.10.2 and 0.11.x: the latter no longer lowers a Mosaic-GPU pl.pallas_call.
  The body keeps the pallas_call signature (all input refs, then all output refs)."""
  multi = isinstance(out_type, (tuple, list))
  outs = list(out_type) if multi else [out_type]
  if len(set(aliases.values())) != len(aliases) or \
     not all(0 <= o < len(outs) for o in aliases.values()):
    raise ValueError(f"{name}: input_output_aliases {aliases} must map inputs to distinct "
                     f"outputs of {len(outs)}")
  by_out = {o: i for i, o in aliases.items()}
  fresh = [t for o, t in enumerate(outs) if o not in by_out]
  ctx = Ctx("compile", tuple(grid_names))

  def call(*args):
    n_in = len(args)
    for i, o in aliases.items():
      if not (0 <= i < n_in) or args[i].shape != outs[o].shape or args[i].dtype != outs[o].dtype:
        raise ValueError(f"{name}: input {i} cannot alias output {o} ({outs[o]})")

    def refs_body(*refs):
      in_refs, fresh_refs = refs[:n_in], list(refs[n_in:])
      out_refs = [in_refs[by_out[o]] if o in by_out else fresh_refs.pop(0)
                  for o in range(len(outs))]
      return body(*in_refs, *out_refs, ctx=ctx)

    operands = [jax.new_ref(a) if i in aliases else a for i, a in enumerate(args)]
    # pl.kernel, not plgpu.kernel: the latter's custom_vmap wrapper rejects ref operands
    mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, kernel_name=name)
    got = list(pl.kernel(refs_body, out_type=tuple(fresh), mesh=mesh, compiler_params=params,
                         name=name)(*operands))
    result = [jax.freeze(operands[by_out[o]]) if o in by_out else got.pop(0)
              for o in range(len(outs))]
    return tuple(result) if multi else result[0]

  return call


def inference_only(op: str, fn, *args, **options):
  """fn(*args, **options), forward only: a gradient is a clear error (the Pallas decode
  kernels have none; differentiate impl="xla" instead).

  Traced once per (op, fn, options, argument types): the layers of a step that run one
  kernel with one configuration share its trace, so JAX lowers that kernel to Mosaic once
  per step instead of once per layer, and the compiled step is the same (llama-1b-bench,
  16 layers, lowered for an H100: 35 s -> 4 s). fn must be a module-level function and
  options plain values (numbers, strings, tuples, dicts): arrays go in args."""
  return _launcher(op, fn, freeze(options, op))(*args)


class Frozen(tuple):
  """A dict frozen by `freeze`: its sorted (key, frozen value) items."""


class _Leaf(tuple):
  """(type, value) of a plain value: 1, 1.0 and True are equal keys, but not the same."""


def freeze(v, what: str = "option"):
  """v (dicts, lists and tuples of plain values) as a hashable cache key that keeps the
  values' types; `thaw` gives it back (lists as tuples). An array or other unhashable
  value is a TypeError naming `what`."""
  if isinstance(v, (jax.Array, np.ndarray)):
    raise TypeError(f"{what} is an array; pass it as an argument")
  if isinstance(v, dict):
    return Frozen(sorted((k, freeze(x, f"{what}: {k}")) for k, x in v.items()))
  if isinstance(v, (list, tuple)):
    return tuple(freeze(x, what) for x in v)
  try:
    hash(v)
  except TypeError:
    raise TypeError(f"{what}={v!r} is not a plain value") from None
  return _Leaf((type(v), v))


def thaw(v):
  """The value `freeze` froze: dicts as dicts, lists as tuples."""
  if isinstance(v, Frozen):
    return {k: thaw(x) for k, x in v}
  if isinstance(v, _Leaf):
    return v[1]
  return tuple(thaw(x) for x in v) if isinstance(v, tuple) else v


@functools.lru_cache(maxsize=1024)
def _launcher(op: str, fn, options: Frozen):
  kw = thaw(options)

  @jax.custom_vjp
  def f(*a):
    return fn(*a, **kw)

  def fwd(*a):
    raise TypeError(f"{op}: the Pallas kernel is inference-only and has no gradient; "
                    "use impl='xla' to differentiate")

  def bwd(res, g):  # pragma: no cover - fwd always raises
    raise AssertionError

  f.defvjp(fwd, bwd)
  # inline: the step's jaxpr holds the kernel call itself, with no call boundary
  return jax.jit(f, inline=True)
