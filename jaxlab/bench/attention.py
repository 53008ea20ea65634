"""`jaxlab bench attention`: time and peak memory of log-linear and PaTH attention forms vs T.

The per-op benchmarks live in jaxlab/bench/log_linear.py and jaxlab/bench/path.py
(each exposes `bench(ts, repeats=...) -> list[dict]`).
"""

from __future__ import annotations

import importlib

OPS = {"log_linear": "jaxlab.bench.log_linear", "path": "jaxlab.bench.path"}


def add_arguments(p):
  p.add_argument("--op", choices=("all", *OPS), default="all")
  p.add_argument("--ts", default="1024,2048,4096,8192,16384",
                 help="comma-separated sequence lengths")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default=None, help="append JSON rows to this file")


def main(args) -> int:
  from jaxlab.bench.common import emit
  from jaxlab.cli import UserError
  try:
    ts = [int(t) for t in args.ts.split(",") if t.strip()]
  except ValueError:
    raise UserError(f"--ts: expected comma-separated integers, got {args.ts!r}") from None
  if not ts or min(ts) <= 0:
    raise UserError(f"--ts: lengths must be positive, got {args.ts!r}")
  ops = list(OPS) if args.op == "all" else [args.op]
  for op in ops:
    mod = importlib.import_module(OPS[op])
    emit(mod.bench(ts, repeats=args.repeats), args.out, title=f"bench attention: {op}")
  return 0
