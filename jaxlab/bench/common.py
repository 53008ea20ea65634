"""Shared benchmark helpers: machine description and result output."""

from __future__ import annotations

import datetime
import json
import os
import platform


def machine() -> str:
  import jax
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  return (f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores, {dev.platform} "
          f"({kind}) x{jax.device_count()}, jax {jax.__version__}")


def today() -> str:
  return datetime.date.today().isoformat()


def emit(rows: list[dict], out: str | None = None, title: str = ""):
  """Print rows as a markdown table (and append JSON lines to `out`)."""
  if not rows:
    print("(no rows)")
    return
  keys = list(dict.fromkeys(k for r in rows for k in r))
  if title:
    print(f"## {title}\n\n{machine()}, {today()}\n")
  print("| " + " | ".join(keys) + " |")
  print("|" + "---|" * len(keys))
  for r in rows:
    print("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
  if out:
    with open(out, "a") as f:
      for r in rows:
        f.write(json.dumps({"machine": machine(), "date": today(), **r}) + "\n")


def _fmt(v):
  if isinstance(v, float):
    return f"{v:.4g}"
  return "" if v is None else str(v)
