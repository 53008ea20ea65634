"""`jaxlab bench kernels`: the launch shape of every kernel in the Pallas decode step.

Lowers one layer cycle of the step for CUDA (Mosaic GPU, Hopper; no GPU needed) and reads
each kernel's grid, threads per CTA and shared memory out of its Mosaic module. From
those it says how far each launch can fill an H100 / H200 (132 SMs): how many CTAs fit
on one SM by shared memory and threads, and how many the grid puts on each SM. A
memory-bound GEMV needs several warps per SM to keep enough loads in flight; the
sixth session's figures (docs/kernels.md) had the LM head (500 CTAs) at 80% of the GEMV
bandwidth and the MLP (128 CTAs, one warpgroup per SM) at 64%. Registers are not
counted: they are known only after ptxas, on the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

SMS = 132                     # H100 SXM and H200
SMEM_PER_SM = 228 * 1024      # bytes of shared memory per SM (227 KB usable by one CTA)
SMEM_RESERVED_PER_CTA = 1024  # the runtime's own shared memory per resident CTA
THREADS_PER_SM = 2048
CTAS_PER_SM = 32


@dataclasses.dataclass(frozen=True)
class Launch:
  """One Mosaic GPU kernel launch: grid (CTAs), threads per CTA, dynamic SMEM bytes."""
  name: str
  grid: int
  threads: int
  smem: int

  @property
  def fit_per_sm(self) -> int:
    """CTAs of this kernel that can be resident on one SM at once."""
    by_smem = SMEM_PER_SM // (self.smem + SMEM_RESERVED_PER_CTA)
    return min(by_smem, THREADS_PER_SM // self.threads, CTAS_PER_SM)

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
    return dict(name=self.name, grid=self.grid, threads=self.threads, smem_kb=self.smem / 1024,
                fit_per_sm=self.fit_per_sm, per_sm=round(self.per_sm, 2),
                warps_per_sm=round(self.warps_per_sm, 1), waves=self.waves)


_NAME = re.compile(r"/(\w+)/(?:mpmd_map|pallas_call)")


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
  from jax._src.interpreters import mlir as jax_mlir
  from jax._src.lib.mlir import ir
  from jax.experimental.mosaic.gpu import dialect as mgpu_dialect

  out = []
  for op in _walk(lowered.compiler_ir("stablehlo").operation):
    if op.name != "stablehlo.custom_call" or "mosaic_gpu" not in str(
        op.attributes["call_target_name"]):
      continue
    m = _NAME.search(str(op.location))
    name = m.group(1) if m else "?"
    data = bytes(ir.StringAttr(op.attributes["mhlo.backend_config"]["module"]).value_bytes)
    with jax_mlir.make_ir_context() as ctx, ir.Location.unknown():
      mgpu_dialect.register_dialect(ctx)
      ctx.allow_unregistered_dialects = True
      module = ir.Module.parse(data)
      found = [k for k in _walk(module.operation) if k.name.endswith("gpu.launch")]
      if len(found) != 1:
        raise ValueError(f"kernel {name}: expected one gpu.launch in its Mosaic module, "
                         f"found {len(found)}")
      # gpu.launch operands: async token, grid x/y/z, block x/y/z, dynamic SMEM bytes
      gx, gy, gz, bx, by, bz, smem = (_const(v) for v in list(found[0].operands)[1:8])
    out.append(Launch(name, gx * gy * gz, bx * by * bz, smem))
  return out


def step_launches(config: str, variant: str = "pallas", *, kernel_options=None,
                  kv_len: int = 1024) -> list[Launch]:
  """The launches of one layer cycle (plus the LM head) of a `bench decode` Pallas
  variant at a `bench decode` config, lowered for CUDA on any machine."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxlab.bench.decode import _DECODER_VARIANTS, _VARIANT_OPTIONS, CONFIGS
  from jaxlab.models import LM, ModelConfig
  from jaxlab.models.decode import init_state, prepare_weights, step_function

  if config not in CONFIGS:
    raise ValueError(f"--config: unknown config {config!r} (known: {', '.join(CONFIGS)})")
  if _DECODER_VARIANTS.get(variant, ("",))[0] != "pallas":
    known = [v for v, spec in _DECODER_VARIANTS.items() if spec[0] == "pallas"]
    raise ValueError(f"--variants: {variant!r} is not a Pallas variant (known: "
                     f"{', '.join(known)})")
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
  token = jax.ShapeDtypeStruct((), jnp.int32)
  return launches(step.trace(weights, state, token).lower(lowering_platforms=("cuda",)))


def table(rows: list[Launch]) -> str:
  head = (f"{'kernel':24s} {'grid':>5s} {'thr':>4s} {'SMEM KB':>8s} {'fit/SM':>6s} "
          f"{'CTAs/SM':>7s} {'warps/SM':>8s} {'waves':>5s}")
  lines = [head]
  for r in rows:
    lines.append(f"{r.name:24s} {r.grid:5d} {r.threads:4d} {r.smem / 1024:8.1f} "
                 f"{r.fit_per_sm:6d} {r.per_sm:7.2f} {r.warps_per_sm:8.1f} {r.waves:5d}")
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


def main(args) -> int:
  from jaxlab.cli import UserError
  try:
    options = json.loads(args.kernel_options) if args.kernel_options else None
  except json.JSONDecodeError as e:
    raise UserError(f"--kernel-options: not JSON ({e})") from None
  out = {}
  for variant in [v for v in args.variants.split(",") if v]:
    try:
      rows = step_launches(args.config, variant, kernel_options=options)
    except ValueError as e:
      raise UserError(str(e).splitlines()[0]) from None
    print(f"== {args.config} {variant}: kernels of one layer cycle + LM head, as lowered for "
          f"CUDA ({SMS} SMs, {SMEM_PER_SM // 1024} KB SMEM and {THREADS_PER_SM} threads per SM; "
          f"registers not counted)")
    print(table(rows))
    out[variant] = [r.row() for r in rows]
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"config": args.config, "variants": out}, f, indent=1)
  return 0
