"""`jaxlab train lm`: train a small LM on a synthetic task or local corpus, resumably.

The embedded default (no flags) trains a 2-layer attention model on MQAR to high
exact match in a few CPU minutes, prints the result and writes a learning curve.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxlab.config import ConfigError, from_dict, to_dict
from jaxlab.models.config import ModelConfig
from train.trainer import TrainConfig

# The main job's embedded default.
DEFAULT_TASK = "mqar"
DEFAULT_TASK_OPTIONS = {"mqar": dict(num_kv_pairs=4, vocab_size=64, seq_len=32)}
DEFAULT_MODEL = dict(d_model=64, n_layers=2, n_heads=2, max_seq_len=4096)
DEFAULT_TRAIN = dict(steps=1000, batch_size=64, learning_rate=3e-3, warmup_steps=100,
                     eval_every=100, checkpoint_every=100, log_every=10)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMJobConfig:
  """Everything that defines an `lm` run (stored as RUN_DIR/config.json)."""
  task: str = DEFAULT_TASK
  task_options: dict = dataclasses.field(default_factory=dict)
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()


# Fields that may differ when resuming a run (they do not shape the state).
RESUMABLE_FIELDS = ("train.steps", "train.eval_every", "train.eval_batches",
                    "train.eval_batch_size", "train.checkpoint_every", "train.log_every",
                    "train.keep_checkpoints", "train.mesh.data", "train.mesh.fsdp",
                    "train.mesh.tensor")


def build_job(*, task: str | None = None, task_options: dict | None = None,
              model_overrides: dict | None = None, train_overrides: dict | None = None,
              config_file: str | None = None) -> LMJobConfig:
  """Merge defaults < config file < explicit overrides, checking every field by name."""
  from jaxlab.data import get_task
  model = dict(DEFAULT_MODEL)
  train = dict(DEFAULT_TRAIN)
  topts = dict(task_options or {})
  file_topts = {}
  if config_file:
    path = Path(config_file)
    if not path.exists():
      raise FileNotFoundError(f"config file not found: {path}")
    try:
      raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict):
      raise ConfigError(f"{path}: expected a JSON object")
    unknown = set(raw) - {"task", "task_options", "model", "train"}
    if unknown:
      raise ConfigError(f"{path}: unknown field {sorted(unknown)[0]!r} "
                        "(known: model, task, task_options, train)")
    task = task or raw.get("task")
    file_topts = dict(raw.get("task_options", {}))
    model.update(raw.get("model", {}))
    train.update(raw.get("train", {}))
  task = task or DEFAULT_TASK
  topts = {**DEFAULT_TASK_OPTIONS.get(task, {}), **file_topts, **topts}
  model.update(model_overrides or {})
  train.update(train_overrides or {})
  t = get_task(task, seed=int(train.get("seed", 0)), **topts)
  model.setdefault("vocab_size", t.vocab_size)
  model["vocab_size"] = max(int(model["vocab_size"]), t.vocab_size)
  mcfg = from_dict(ModelConfig, model)
  from jaxlab.models.config import validate_mixers
  validate_mixers(mcfg)
  return LMJobConfig(task=task, task_options=topts, model=mcfg, train=from_dict(TrainConfig, train))


def run_job(job: LMJobConfig, run_dir, *, progress: bool = True, plot: bool = True,
            log=print) -> dict[str, Any]:
  from jaxlab.data import get_task
  from train.checkpoint import check_run_config, write_run_config
  from train.loop import run
  from train.metrics import plot_curves, read_metrics
  from train.trainer import Trainer

  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  cfg_dict = to_dict(job)
  check_run_config(run_dir, cfg_dict, compatible_keys=RESUMABLE_FIELDS)
  task = get_task(job.task, seed=job.train.seed, **job.task_options)
  trainer = Trainer(job.model, job.train)
  write_run_config(run_dir, cfg_dict)
  out = run(trainer, task, run_dir, progress=progress, log=log)
  if plot:
    recs = read_metrics(run_dir)
    plot_curves(recs, ["loss", "test/loss", "test/exact_match"], run_dir / "learning_curve.png",
                title=f"{job.task} / {job.model.mixer}")
  return out
