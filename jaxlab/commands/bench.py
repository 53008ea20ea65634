"""`jaxlab bench ...`: benchmark commands. Each subcommand's implementation lives in
jaxlab/bench/<name>.py and exposes `add_arguments(parser)` and `main(args)`."""

from __future__ import annotations

import importlib

BENCHES = {
    "train": "tokens/s and compile time of the default training config",
    "attention": "log-linear and PaTH attention: time and peak memory vs T",
    "optim": "optimizer-state bytes and step time: AdamW, GaLore, random projection, one-sided LoRA",
    "decode": "batch-1 decode step: ms/token and achieved bandwidth (XLA vs Pallas)",
    "kernels": "the Pallas decode step's kernel launches as lowered for CUDA: grid, threads, "
               "shared memory, how far each fills an H100 (no GPU needed)",
}


def register(sub):
  p = sub.add_parser("bench", help="benchmarks (results go to docs/benchmarks.md)")
  bsub = p.add_subparsers(dest="bench", metavar="BENCH")
  bsub.required = True
  for name, help_ in BENCHES.items():
    mod = importlib.import_module(f"jaxlab.bench.{name}")
    bp = bsub.add_parser(name, help=help_, description=help_)
    mod.add_arguments(bp)
    bp.set_defaults(func=mod.main)
