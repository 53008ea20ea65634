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


def peak_mb(compiled) -> float | None:
  """Arguments + outputs + XLA temporaries (minus aliased) of a compiled program, in MiB;
  None where the backend gives no memory analysis."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes) / 2 ** 20


def time_ms(fn, *args, repeats: int) -> list[float]:
  """Wall times (ms) of `repeats` blocking calls of fn(*args), after one warm-up call."""
  import time

  import jax
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(1e3 * (time.perf_counter() - t0))
  return times


def markdown_table(rows: list[dict], columns: list[tuple[str, str]], digits: int = 1) -> str:
  """Markdown table of `rows` with (header, key) columns; floats get `digits` decimals,
  None is an empty cell."""
  def cell(v):
    if v is None:
      return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
  out = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
  out += ["| " + " | ".join(cell(r.get(k)) for _, k in columns) + " |" for r in rows]
  return "\n".join(out)
