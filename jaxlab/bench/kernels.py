"""`jaxlab bench kernels`: the launch shape of every kernel in the Pallas decode step.

Lowers one layer cycle of the step for CUDA (Mosaic GPU, Hopper; no GPU needed) and reads
each kernel's grid, threads per CTA and shared memory out of its Mosaic module. From
those it says how far each launch can fill an H100 / H200 (132 SMs): how many CTAs fit
on one SM by shared memory and threads, and how many the grid puts on each SM. A
memory-bound GEMV needs several warps per SM to keep enough loads in flight; the
sixth session's figures (docs/kernels.md) had the LM head (500 CTAs) at 80% of the GEMV
bandwidth and the MLP (128 CTAs, one warpgroup per SM) at 64%. Registers are not
counted unless `--compile` is given.

`--compile` compiles the step for an H100 with no GPU present (XLA's deviceless
ahead-of-time compilation through the CUDA PJRT plugin: Mosaic GPU runs its whole
pipeline, LLVM and ptxas included). Each kernel then also gets its registers per thread
and spill bytes from ptxas, and "fit / SM" counts registers too. A kernel that fails to
compile fails here, before any GPU time is spent on it. It needs the CUDA plugin of the
installed jaxlib (`pip install --no-deps jax-cuda13-plugin==V jax-cuda13-pjrt==V`, V =
jaxlib's version; `scripts/cuda_aot_venv.sh` makes such a venv beside the dev one) and
ptxas on PATH.

`--sass` (with `--compile`) also disassembles each kernel (Mosaic's PTX dump through
ptxas for sm_90a, then nvdisasm: on PATH or from the `nvidia-cuda-nvdisasm` wheel) and
lists its main loops: SASS instructions per trip of each innermost loop, the figure
docs/kernels.md uses to compare the CUDA-core and tensor-core GEMV forms, and, where a
loop has branches (a first-step setup, a tail-only fix-up), the instructions of its
shortest trip ("all/shortest").
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import re
import tempfile

SMS = 132                     # H100 SXM and H200
SMEM_PER_SM = 228 * 1024      # bytes of shared memory per SM (227 KB usable by one CTA)
SMEM_RESERVED_PER_CTA = 1024  # the runtime's own shared memory per resident CTA
THREADS_PER_SM = 2048
CTAS_PER_SM = 32
REGS_PER_SM = 65536
REG_ALLOC_PER_WARP = 256      # registers are handed to warps in blocks of 256


@dataclasses.dataclass(frozen=True)
class Launch:
  """One Mosaic GPU kernel launch: grid (CTAs), threads per CTA, dynamic SMEM bytes."""
  name: str
  grid: int
  threads: int
  smem: int
  regs: int | None = None    # registers per thread (ptxas; --compile only)
  spill: int | None = None   # spill store + load bytes per thread (ptxas)
  loops: tuple[tuple[int, int, int], ...] | None = None   # (SASS instructions, H/IGMMA,
  #   shortest trip) per innermost loop, in code order (--sass only; sass_loops)

  @property
  def fit_per_sm(self) -> int:
    """CTAs of this kernel that can be resident on one SM at once (by SMEM, threads
    and, when known, registers)."""
    by_smem = SMEM_PER_SM // (self.smem + SMEM_RESERVED_PER_CTA)
    fit = min(by_smem, THREADS_PER_SM // self.threads, CTAS_PER_SM)
    if self.regs is not None:
      per_warp = -(-self.regs * 32 // REG_ALLOC_PER_WARP) * REG_ALLOC_PER_WARP
      fit = min(fit, REGS_PER_SM // (per_warp * -(-self.threads // 32)))
    return fit

  @property
  def per_sm(self) -> float:
    """CTAs the grid puts on each SM (spread evenly)."""
    return self.grid / SMS

  @property
  def warps_per_sm(self) -> float:
    """Resident warps per SM while the whole grid runs (capped by what fits)."""
    return min(self.per_sm, self.fit_per_sm) * self.threads / 32

  @property
  def waves(self) -> int:
    """Rounds of CTAs the grid needs when every SM holds fit_per_sm at a time."""
    return -(-self.grid // (SMS * self.fit_per_sm))

  def row(self) -> dict:
    out = dict(name=self.name, grid=self.grid, threads=self.threads, smem_kb=self.smem / 1024,
               fit_per_sm=self.fit_per_sm, per_sm=round(self.per_sm, 2),
               warps_per_sm=round(self.warps_per_sm, 1), waves=self.waves)
    if self.regs is not None:
      out.update(regs=self.regs, spill_bytes=self.spill)
    if self.loops is not None:
      out["loops"] = [dict(instructions=n, hgmma=h, shortest_trip=t) for n, h, t in self.loops]
    return out


def _walk(op):
  for region in op.regions:
    for block in region.blocks:
      for inner in block.operations:
        yield inner
        yield from _walk(inner)


def _const(value) -> int:
  return int(str(value.owner.attributes["value"]).split(":")[0])


def launches(lowered) -> list[Launch]:
  """Every Mosaic GPU kernel launch in a `jax.stages.Lowered` (lowered for CUDA), in
  program order."""
  from jax._src.lib.mlir import ir

  out = []
  for op in _walk(lowered.compiler_ir("stablehlo").operation):
    if op.name != "stablehlo.custom_call" or "mosaic_gpu" not in str(
        op.attributes["call_target_name"]):
      continue
    data = bytes(ir.StringAttr(op.attributes["mhlo.backend_config"]["module"]).value_bytes)
    out.append(mosaic_launch(data))
  return out


def mosaic_launch(module) -> Launch:
  """The launch of one Mosaic GPU module (bytes, or its text as Mosaic dumps it): the
  kernel's name (the module's), and grid, threads and dynamic SMEM from its single
  gpu.launch."""
  from jax._src.interpreters import mlir as jax_mlir
  from jax._src.lib.mlir import ir
  from jax.experimental.mosaic.gpu import dialect as mgpu_dialect

  with jax_mlir.make_ir_context() as ctx, ir.Location.unknown():
    mgpu_dialect.register_dialect(ctx)
    ctx.allow_unregistered_dialects = True
    parsed = ir.Module.parse(module)
    name = ir.StringAttr(parsed.operation.attributes["sym_name"]).value
    found = [k for k in _walk(parsed.operation) if k.operation.name.endswith("gpu.launch")]
    if len(found) != 1:
      raise ValueError(f"kernel {name}: expected one gpu.launch in its Mosaic module, "
                       f"found {len(found)}")
    # gpu.launch operands: async token, grid x/y/z, block x/y/z, dynamic SMEM bytes
    gx, gy, gz, bx, by, bz, smem = (_const(v) for v in list(found[0].operands)[1:8])
  return Launch(name, gx * gy * gz, bx * by * bz, smem)


def _check_variant(config: str, variant: str):
  from jaxlab.bench.decode import _DECODER_VARIANTS, CONFIGS
  if config not in CONFIGS:
    raise ValueError(f"--config: unknown config {config!r} (known: {', '.join(CONFIGS)})")
  if _DECODER_VARIANTS.get(variant, ("",))[0] != "pallas":
    known = [v for v, spec in _DECODER_VARIANTS.items() if spec[0] == "pallas"]
    raise ValueError(f"--variants: {variant!r} is not a Pallas variant (known: "
                     f"{', '.join(known)})")


def _step_avals(config: str, variant: str, kernel_options, kv_len: int):
  """(step, (weights, state, token) avals) of a `bench decode` Pallas variant's layer cycle."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxlab.bench.decode import _DECODER_VARIANTS, _VARIANT_OPTIONS, CONFIGS
  from jaxlab.models import LM, ModelConfig
  from jaxlab.models.decode import init_state, prepare_weights, step_function

  _check_variant(config, variant)
  _, layers, quantize, share = _DECODER_VARIANTS[variant]
  options = {**dict(kernel_options or {}), **_VARIANT_OPTIONS.get(variant, {})}  # as bench decode
  kwargs = dict(CONFIGS[config][0])
  kwargs["n_layers"] = len(kwargs.get("mixer_pattern") or (1,))
  cfg = ModelConfig(**kwargs)
  layout = dict(options.get("layout", {}))
  weights = jax.eval_shape(lambda: prepare_weights(
      LM(cfg, rngs=nnx.Rngs(0)), quantize, w_down=layout.get("w_down", "FD"),
      mlp=layout.get("mlp", "1k")))
  step, cache_len = step_function(cfg, "pallas", kv_len + 64, interpret=False, layers=layers,
                                  kernel_options=options, share_layers=share)
  state = jax.eval_shape(lambda: init_state(cfg, cache_len))
  return step, (weights, state, jax.ShapeDtypeStruct((), jnp.int32))


def step_launches(config: str, variant: str = "pallas", *, kernel_options=None,
                  kv_len: int = 1024) -> list[Launch]:
  """The launches of one layer cycle (plus the LM head) of a `bench decode` Pallas
  variant at a `bench decode` config, lowered for CUDA on any machine."""
  step, args = _step_avals(config, variant, kernel_options, kv_len)
  return launches(step.trace(*args).lower(lowering_platforms=("cuda",)))


# An H100 SXM as XLA's GPU compiler sees it, for deviceless compilation (the figures of
# NVIDIA's H100 80GB HBM3 device query). The driver version is the lent H100's (580, CUDA
# 13.0): without one, XLA puts no custom call (no Mosaic kernel) into a command buffer,
# which a real GPU does.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536 driver_version: "13.0.0"
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 13 minor: 0 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

_REGS = re.compile(r"Used (\d+) registers")
_GMMA = re.compile(r"\b[HI]GMMA\.")   # a bf16 (HGMMA) or int8 (IGMMA) WGMMA instruction
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_DUMP_HEADER = "// -----// IR Dump"


def ptxas_usage(text: str) -> tuple[int, int]:
  """(registers per thread, spill store + load bytes) from one kernel's `ptxas -v` log."""
  regs = _REGS.search(text)
  if regs is None:
    raise ValueError("no register count in the ptxas log")
  spill = _SPILL.search(text)
  return int(regs.group(1)), (int(spill.group(1)) + int(spill.group(2)) if spill else 0)


MIN_LOOP = 20   # smaller loops are waits on barriers, not a kernel's main loops
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"^(@!?U?P\w+\s+)?BRA\s+`?\(?(\.L_x_\d+)")
_END = re.compile(r"^(EXIT|RET\b)")


def sass_loops(sass: str) -> list[tuple[int, int, int]]:
  """(instructions per trip, tensor-core instructions (HGMMA: bf16, IGMMA: int8), instructions
  of the shortest trip) of each
  innermost natural loop of at least MIN_LOOP instructions in `nvdisasm -c` output,
  ordered by where the loop starts. The first two count every instruction of the loop;
  the shortest trip, header to header, skips the branches a trip may leave out (a setup
  done in the first trip only, a fix-up of the last block, a wait's retry path).

  A natural loop: an edge back to a block that dominates its source (ptxas may put a
  loop's latch out of line). A barrier wait's out-of-line retry path also branches back
  into the main code, but its entry does not dominate it, so it is not a loop."""
  instrs, labels = [], {}
  for line in sass.splitlines():
    m = _SASS_LABEL.match(line)
    if m:
      labels[m.group(1)] = len(instrs)
      continue
    m = _SASS_LINE.match(line)
    if m:
      instrs.append(m.group(1))
  n = len(instrs)
  # basic blocks: leaders at 0, at branch targets and after branches / ends
  leaders = {0} | {i for i in labels.values() if i < n}
  for i, ins in enumerate(instrs):
    if (_BRANCH.match(ins) or _END.match(ins)) and i + 1 < n:
      leaders.add(i + 1)
  starts = sorted(leaders)
  block_of = {}
  for b, a in enumerate(starts):
    for i in range(a, starts[b + 1] if b + 1 < len(starts) else n):
      block_of[i] = b
  nb = len(starts)
  succ = [set() for _ in range(nb)]
  for b, a in enumerate(starts):
    last = (starts[b + 1] if b + 1 < nb else n) - 1
    ins, br = instrs[last], _BRANCH.match(instrs[last])
    if br and br.group(2) in labels and labels[br.group(2)] < n:
      succ[b].add(block_of[labels[br.group(2)]])
    unconditional_end = (br and not br.group(1)) or (_END.match(ins) is not None)
    if not unconditional_end and b + 1 < nb:
      succ[b].add(b + 1)
  pred = [set() for _ in range(nb)]
  for b in range(nb):
    for c in succ[b]:
      pred[c].add(b)
  # dominators (iterative; entry = block 0; unreachable blocks dominate nothing)
  full = set(range(nb))
  dom = [full.copy() for _ in range(nb)]
  dom[0] = {0}
  changed = True
  while changed:
    changed = False
    for b in range(1, nb):
      ps = [dom[p] for p in pred[b]]
      new = (set.intersection(*ps) if ps else set()) | {b}
      if new != dom[b]:
        dom[b], changed = new, True
  size = lambda b: (starts[b + 1] if b + 1 < nb else n) - starts[b]
  loops, header = [], {}
  for b in range(nb):
    for h in succ[b]:
      if h in dom[b]:   # back edge b -> h: the natural loop's blocks
        body, stack = {h, b}, [b] if b != h else []   # (never past the header)
        while stack:
          for p in pred[stack.pop()]:
            if p not in body:
              body.add(p)
              stack.append(p)
        loops.append(frozenset(body))
        header[loops[-1]] = h
  big = [L for L in set(loops) if sum(size(b) for b in L) >= MIN_LOOP]
  inner = [L for L in big if not any(M < L for M in big)]
  out = []
  for L in sorted(inner, key=min):
    idx = [i for b in L for i in range(starts[b], starts[b] + size(b))]
    out.append((len(idx), sum(bool(_GMMA.search(instrs[i])) for i in idx),
                _shortest_trip(L, header[L], succ, size)))
  return out


def _shortest_trip(loop, head: int, succ, size) -> int:
  """Fewest instructions from the loop's header back to it, through the loop's blocks."""
  import heapq
  dist, todo, best = {head: size(head)}, [(size(head), head)], None
  while todo:
    d, b = heapq.heappop(todo)
    if d > dist[b]:
      continue
    for c in succ[b]:
      if c == head:
        best = d if best is None else min(best, d)
      elif c in loop and d + size(c) < dist.get(c, d + size(c) + 1):
        dist[c] = d + size(c)
        heapq.heappush(todo, (dist[c], c))
  return best


def _nvdisasm() -> str:
  """nvdisasm: on PATH, or from the nvidia-cuda-nvdisasm wheel."""
  import shutil
  found = shutil.which("nvdisasm")
  if found:
    return found
  try:
    import nvidia
    for root in nvidia.__path__:
      for cand in sorted(pathlib.Path(root).glob("*/bin/nvdisasm")):
        return str(cand)
  except ImportError:
    pass
  raise RuntimeError("--sass needs nvdisasm (pip install nvidia-cuda-nvdisasm, or a CUDA "
                     "toolkit on PATH)")


def _disassemble(ptx: pathlib.Path) -> str:
  import subprocess
  cubin = ptx.with_suffix(".cubin")
  subprocess.run(["ptxas", "-arch=sm_90a", str(ptx), "-o", str(cubin)], check=True,
                 capture_output=True)
  return subprocess.run([_nvdisasm(), "-c", str(cubin)], check=True, capture_output=True,
                        text=True).stdout


def first_dumped_module(lines) -> str:
  """The module before Mosaic's first pass, from its pass log (`*.mlir-passes.log`: one
  "// -----// IR Dump Before ..." header per pass, the module after each)."""
  body, seen = [], 0
  for line in lines:
    if line.startswith(_DUMP_HEADER):
      seen += 1
      if seen == 2:
        break
    elif seen == 1:
      body.append(line)
  if not body:
    raise ValueError("no IR dump in the Mosaic pass log")
  return "".join(body)


def dumped_launch(pass_log_lines, ptxas: str) -> Launch:
  """One kernel as Mosaic GPU dumped it when compiling: its launch (read from the module
  in its pass log, as `launches` reads the lowered one) and ptxas's registers."""
  regs, spill = ptxas_usage(ptxas)
  launch = mosaic_launch(first_dumped_module(pass_log_lines))
  return dataclasses.replace(launch, regs=regs, spill=spill)


def h100_lowered(config: str, variant: str, options=None, kv_len: int = 1024):
  """step_launches' step lowered for H100_TARGET with no GPU (the jaxlib's CUDA plugin,
  run with JAX_PLATFORMS unset): `.compile()` it for the optimized HLO."""
  import jax
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET,
                                        topology="1x1x1")
  except Exception as e:  # noqa: BLE001 - any failure here means: no usable CUDA plugin
    raise SystemExit(f"no deviceless CUDA compilation here ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}); install the CUDA plugin of "
                     "this jaxlib: pip install --no-deps jax-cuda13-plugin==V jax-cuda13-pjrt==V")
  rep = jax.sharding.NamedSharding(topologies.make_mesh(topo, (1,), ("x",)),
                                   jax.sharding.PartitionSpec())
  step, args = _step_avals(config, variant, options or {}, kv_len)
  args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), args)
  return step.trace(*args).lower()


def _compile_worker(config: str, variant: str, options_json: str, kv_len: int):
  """Subprocess body of compiled_launches: compile the step for H100_TARGET (Mosaic GPU
  dumps each kernel's pass log and ptxas log into $MOSAIC_GPU_DUMP_TO) and print the
  lowered launches as one JSON line."""
  lowered = h100_lowered(config, variant, json.loads(options_json), kv_len)
  rows = launches(lowered)
  lowered.compile()
  print(json.dumps([dataclasses.asdict(r) for r in rows]))


def compiled_launches(config: str, variant: str = "pallas", *, kernel_options=None,
                      kv_len: int = 1024, sass: bool = False) -> list[Launch]:
  """step_launches' kernels with ptxas's registers and spills, from compiling the step
  for an H100 in a fresh process (deviceless; needs the jaxlib's CUDA plugin, not a GPU).
  A kernel that does not compile raises RuntimeError with the compiler's last line.
  sass: also each kernel's main loops (sass_loops)."""
  import subprocess
  import sys
  _check_variant(config, variant)
  if sass:
    _nvdisasm()   # fail before the compile, not after
  with tempfile.TemporaryDirectory() as d:
    env = {**os.environ, "MOSAIC_GPU_DUMP_TO": d, "MOSAIC_GPU_DUMP_PTXAS": "1",
           "MOSAIC_GPU_DUMP_MLIR_PASSES": "1", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
           "JAX_PLATFORMS": ""}
    if sass:
      env["MOSAIC_GPU_DUMP_PTX"] = "1"
    code = ("import sys; from jaxlab.bench.kernels import _compile_worker; "
            "_compile_worker(*sys.argv[1:4], int(sys.argv[4]))")
    r = subprocess.run([sys.executable, "-c", code, config, variant,
                        json.dumps(kernel_options or {}), str(kv_len)],
                       env=env, capture_output=True, text=True)
    if r.returncode:
      lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
      raise RuntimeError(f"{config} {variant}: compiling for the H100 failed: "
                         f"{lines[-1] if lines else f'exit {r.returncode}'}")
    expected = [Launch(**row) for row in json.loads(r.stdout.strip().splitlines()[-1])]
    dumped = []
    for log in sorted(pathlib.Path(d).glob("*.ptxas")):
      with open(log.with_suffix(".mlir-passes.log")) as f:
        k = dumped_launch(f, log.read_text())
      if sass:
        k = dataclasses.replace(k, loops=tuple(sass_loops(_disassemble(log.with_suffix(
            ".ptx")))))
      dumped.append(k)
  out = []
  for e in expected:
    match = [k for k in dumped if (k.name, k.grid, k.threads, k.smem) ==
             (e.name, e.grid, e.threads, e.smem)]
    if not match:
      raise RuntimeError(f"kernel {e.name}: lowered but no compiled twin in Mosaic's dumps")
    out.append(match[0])
  return out


def table(rows: list[Launch]) -> str:
  regs = any(r.regs is not None for r in rows)
  loops = any(r.loops is not None for r in rows)
  head = (f"{'kernel':24s} {'grid':>5s} {'thr':>4s} {'SMEM KB':>8s} "
          + (f"{'regs':>4s} {'spill':>5s} " if regs else "")
          + f"{'fit/SM':>6s} {'CTAs/SM':>7s} {'warps/SM':>8s} {'waves':>5s}"
          + ("  main loops: SASS instructions[/shortest trip] (HGMMA/IGMMA)" if loops else ""))
  lines = [head]
  for r in rows:
    lines.append(f"{r.name:24s} {r.grid:5d} {r.threads:4d} {r.smem / 1024:8.1f} "
                 + (f"{r.regs:4d} {r.spill:5d} " if regs else "")
                 + f"{r.fit_per_sm:6d} {r.per_sm:7.2f} {r.warps_per_sm:8.1f} {r.waves:5d}"
                 + ("  " + ", ".join(f"{n}{'' if t == n else f'/{t}'} ({h})"
                                     for n, h, t in r.loops) if r.loops else ""))
  return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser):
  from jaxlab.bench.decode import CONFIGS
  p.add_argument("--config", default="llama-1b-bench", choices=sorted(CONFIGS),
                 help="model shape (one layer cycle is lowered)")
  p.add_argument("--variants", default="pallas,pallas-mlp2k",
                 help="comma-separated Pallas variants of `jaxlab bench decode`")
  p.add_argument("--kernel-options", default=None,
                 help="JSON kernel options added to each variant's own")
  p.add_argument("--json", default=None, help="also write the rows to this JSON file")
  p.add_argument("--compile", action="store_true",
                 help="also compile the step for an H100 (no GPU needed; needs the CUDA plugin "
                      "of the installed jaxlib and ptxas): adds registers and spills per "
                      "kernel, and fails on a kernel that does not compile")
  p.add_argument("--sass", action="store_true",
                 help="with --compile: also each kernel's main loops, SASS instructions per "
                      "trip (needs nvdisasm: pip install nvidia-cuda-nvdisasm)")


def main(args) -> int:
  from jaxlab.cli import UserError
  try:
    options = json.loads(args.kernel_options) if args.kernel_options else None
  except json.JSONDecodeError as e:
    raise UserError(f"--kernel-options: not JSON ({e})") from None
  if args.sass and not args.compile:
    raise UserError("--sass needs --compile (it reads the compiled kernels)")
  out = {}
  for variant in [v for v in args.variants.split(",") if v]:
    find = (functools.partial(compiled_launches, sass=args.sass) if args.compile
            else step_launches)
    try:
      rows = find(args.config, variant, kernel_options=options)
    except (ValueError, RuntimeError) as e:
      raise UserError(str(e).splitlines()[0]) from None
    how = ("compiled for an H100 (registers from ptxas)" if args.compile else
           "lowered for CUDA (registers not counted)")
    print(f"== {args.config} {variant}: kernels of one layer cycle + LM head, {how}; {SMS} SMs, "
          f"{SMEM_PER_SM // 1024} KB SMEM, {THREADS_PER_SM} threads and {REGS_PER_SM} "
          "registers per SM")
    print(table(rows))
    out[variant] = [r.row() for r in rows]
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"config": args.config, "variants": out}, f, indent=1)
  return 0
