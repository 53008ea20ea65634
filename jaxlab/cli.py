"""The `jaxlab` command line: training jobs, text generation and chat, benchmarks.

Each command group lives in jaxlab/commands/<name>.py and exposes
`register(subparsers)`; the parser calls `args.func(args)`.

Bad input exits non-zero with one line on stderr naming the culprit.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("train", "generate", "bench")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxlab", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True
  for name in COMMAND_MODULES:
    importlib.import_module(f"jaxlab.commands.{name}").register(sub)
  return p


class UserError(Exception):
  """An error caused by the user's input; printed as one line."""


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  from jaxlab.config import ConfigError
  user_errors = (UserError, ConfigError, FileNotFoundError)
  try:
    extra = importlib.import_module("jaxlab.data")
    user_errors = user_errors + tuple(
        getattr(extra, n) for n in ("DataError",) if hasattr(extra, n))
  except ImportError:
    pass
  try:
    from jaxlab.models import hf as _hf  # noqa: F401
    user_errors = user_errors + tuple(
        getattr(_hf, n) for n in ("CheckpointError",) if hasattr(_hf, n))
  except ImportError:
    pass
  try:
    rc = args.func(args)
  except user_errors as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"jaxlab: error: {msg}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("jaxlab: interrupted", file=sys.stderr)
    return 130
  return int(rc or 0)


if __name__ == "__main__":
  sys.exit(main())
