"""`jaxlab bench attention`: time and peak memory of log-linear and PaTH attention forms vs T.

--protocol forms (default): every form (naive / chunked / recurrent, naive / blockwise) of each
op vs T; the per-op benchmarks live in jaxlab/bench/log_linear.py and jaxlab/bench/path.py.
--protocol training: the issues' GPU protocol (fwd+bwd at a fixed token budget, bf16, ratio to
the published anchors), jaxlab/bench/attention_gpu.py.
"""

from __future__ import annotations

import importlib

OPS = {"log_linear": "jaxlab.bench.log_linear", "path": "jaxlab.bench.path"}


def add_arguments(p):
  p.add_argument("--protocol", choices=("forms", "training"), default="forms",
                 help="forms: every implementation vs T (CPU-sized); training: fwd+bwd at "
                      "T = 2K/8K/32K at B = 8/2/1, 16 heads, bf16 (the GPU protocol)")
  p.add_argument("--op", choices=("all", *OPS), default="all")
  p.add_argument("--ts", default=None,
                 help="comma-separated sequence lengths (default forms: 1024,...,16384; "
                      "training: 2048,8192,32768)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default=None, help="append JSON rows to this file")


def main(args) -> int:
  from jaxlab.bench.common import emit
  from jaxlab.cli import UserError
  default = "2048,8192,32768" if args.protocol == "training" else "1024,2048,4096,8192,16384"
  args.ts = args.ts or default
  try:
    ts = [int(t) for t in args.ts.split(",") if t.strip()]
  except ValueError:
    raise UserError(f"--ts: expected comma-separated integers, got {args.ts!r}") from None
  if not ts or min(ts) <= 0:
    raise UserError(f"--ts: lengths must be positive, got {args.ts!r}")
  if args.protocol == "training":
    from jaxlab.bench import attention_gpu
    names = {"all": attention_gpu.OPS, "log_linear": ("softmax", "log_linear_mamba2", "log_linear_gdn"),
             "path": ("softmax", "path")}[args.op]
    rows = attention_gpu.bench(ts, ops=names, repeats=args.repeats, out=args.out)
    print(attention_gpu.format_table(rows))
    return 0
  ops = list(OPS) if args.op == "all" else [args.op]
  for op in ops:
    mod = importlib.import_module(OPS[op])
    emit(mod.bench(ts, repeats=args.repeats), args.out, title=f"bench attention: {op}")
  return 0
