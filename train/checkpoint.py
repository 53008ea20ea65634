"""Orbax (V1 API, as in orbax-checkpoint 0.12.4) checkpoints of the train state.

Orbax writes each step to a temporary directory and renames it when complete,
so a kill mid-save never corrupts the last good checkpoint. The run's config is
stored beside the checkpoints; resuming with an incompatible config fails with
one line naming the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax

from jaxlab.config import ConfigError


class CheckpointError(ValueError):
  """A checkpoint that cannot be used (corrupt, or from another config)."""


def _ocp():
  from orbax.checkpoint import v1 as ocp
  return ocp


class Checkpoints:
  """Save every `every` steps (and on demand); keep the latest `keep`."""

  def __init__(self, directory, *, every: int, keep: int = 3):
    ocp = _ocp()
    self.dir = Path(directory).absolute()
    self.dir.mkdir(parents=True, exist_ok=True)
    policy = ocp.training.save_decision_policies.FixedIntervalPolicy(max(1, every))
    self._ckpt = ocp.training.Checkpointer(
        self.dir, save_decision_policy=policy,
        preservation_policy=ocp.training.preservation_policies.LatestN(keep))

  @property
  def latest_step(self) -> int | None:
    latest = self._ckpt.latest
    return None if latest is None else int(latest.step)

  def maybe_save(self, step: int, state: Any, *, force: bool = False) -> bool:
    if force:
      if self.latest_step == step:
        return False
      self._ckpt.save(step, state, force=True)
      return True
    return bool(self._ckpt.save(step, state))

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    step = self.latest_step if step is None else step
    try:
      return self._ckpt.load(step, abstract_state)
    except Exception as e:  # noqa: BLE001 - report any restore failure as one line
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise CheckpointError(f"cannot restore checkpoint {self.dir}/{step}: {msg}") from None

  def wait(self):
    self._ckpt.wait()

  def close(self):
    self._ckpt.close()


def write_run_config(run_dir, config: dict):
  """Write DIR/config.json atomically."""
  path = Path(run_dir) / "config.json"
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
  os.replace(tmp, path)


def check_run_config(run_dir, config: dict, *, compatible_keys: tuple[str, ...] = ()):
  """Fail (naming the field) if DIR/config.json differs in a field that shapes the state.

  Fields under `compatible_keys` (e.g. the step budget) may change on resume.
  """
  path = Path(run_dir) / "config.json"
  if not path.exists():
    return
  try:
    old = json.loads(path.read_text())
  except json.JSONDecodeError:
    raise ConfigError(f"{path}: not valid JSON") from None

  def diff(a, b, prefix=""):
    for k in sorted(set(a) | set(b)):
      name = f"{prefix}{k}"
      if name in compatible_keys:
        continue
      va, vb = a.get(k), b.get(k)
      if isinstance(va, dict) and isinstance(vb, dict):
        d = diff(va, vb, name + ".")
        if d:
          return d
      elif va != vb:
        return name, va, vb
    return None

  d = diff(old, config)
  if d:
    name, va, vb = d
    raise ConfigError(f"run dir {run_dir} holds a checkpoint from an incompatible config: "
                      f"{name} was {va!r}, now {vb!r}")
