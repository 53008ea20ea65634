"""Metrics sinks: JSONL (one object per line, `step` first) and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _clean(v):
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return f if math.isfinite(f) else None if math.isnan(f) else f


class MetricsWriter:
  """Appends to DIR/metrics.jsonl and DIR/tb/. `truncate_after(step)` drops lines from a
  killed run past the checkpoint we resume from, so the file never has duplicates."""

  def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True):
    self.dir = Path(run_dir)
    self.dir.mkdir(parents=True, exist_ok=True)
    self.path = self.dir / "metrics.jsonl"
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(self.dir / "tb"), flush_secs=10)

  def truncate_after(self, step: int):
    if not self.path.exists():
      return
    keep = []
    with open(self.path) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by a kill
        if int(rec.get("step", -1)) <= step:
          keep.append(json.dumps(rec))
    tmp = self.path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: dict):
    rec = {"step": int(step)}
    rec.update({k: _clean(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    if self._tb is not None:
      for k, v in rec.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(run_dir) -> list[dict]:
  path = Path(run_dir) / "metrics.jsonl"
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return out


def plot_curves(records: list[dict], keys: list[str], path, *, title: str = ""):
  """PNG of metric curves vs step (one panel per key)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = [k for k in keys if any(k in r and r[k] is not None for r in records)]
  fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.5 * max(1, len(keys)), 3.4))
  axes = [axes] if len(keys) <= 1 else list(axes)
  for ax, k in zip(axes, keys):
    pts = [(r["step"], r[k]) for r in records if r.get(k) is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_title(k)
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
