"""Training loop: compile once, resume after SIGKILL bit for bit, metrics, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlab.cli import main as cli_main
from jaxlab.config import ConfigError
from jaxlab.data import get_task
from jaxlab.models import ModelConfig
from train.trainer import TrainConfig, Trainer

TINY = ["train", "lm", "--task", "mqar", "--task-option", "num_kv_pairs=2", "--task-option", "vocab_size=16",
        "--task-option", "seq_len=12", "--d-model", "16", "--layers", "1", "--heads", "2",
        "--batch-size", "4", "--eval-every", "10", "--no-progress"]


def _cli(args, env_extra=None, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "jaxlab.cli", *args], env=env,
                        capture_output=True, text=True, timeout=timeout)


def _final_params(run_dir, step):
  from orbax.checkpoint import v1 as ocp
  return ocp.load_pytree(Path(run_dir) / "checkpoints" / str(step))


def test_train_step_compiles_once_and_learns():
  task = get_task("mqar", seed=0, num_kv_pairs=2, vocab_size=16, seq_len=12)
  tr = Trainer(ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2),
               TrainConfig(steps=30, batch_size=8, learning_rate=1e-2, warmup_steps=0))
  state = tr.init_state()
  state, m0 = tr.train_step(state, task.batch("train", 0, 8))
  n = tr._train_step._cache_size()
  losses = []
  for i in range(1, 30):
    state, m = tr.train_step(state, task.batch("train", i, 8))
    losses.append(float(m["loss"]))
  assert tr._train_step._cache_size() == n == 1
  assert np.mean(losses[-5:]) < float(m0["loss"])
  # state dtypes/shapes unchanged by the step
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
      lambda x: (x.shape, x.dtype), tr.abstract_state)


def test_bf16_compute_keeps_fp32_master_weights():
  task = get_task("mqar", seed=0, num_kv_pairs=2, vocab_size=16, seq_len=12)
  tr = Trainer(ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2),
               TrainConfig(steps=3, batch_size=4, compute_dtype="bfloat16"))
  state = tr.init_state()
  state, m = tr.train_step(state, task.batch("train", 0, 4))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
  assert np.isfinite(float(m["loss"]))


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_sigkill_and_resume_is_bit_for_bit(tmp_path):
  args = TINY + ["--steps", "24", "--checkpoint-every", "5", "--seed", "3"]
  a, b = tmp_path / "a", tmp_path / "b"
  r = _cli(args + ["--run-dir", str(a)])
  assert r.returncode == 0, r.stderr[-2000:]
  killed = _cli(args + ["--run-dir", str(b)], env_extra={"JAXLAB_DEBUG_KILL_AT_STEP": "13"})
  assert killed.returncode == -9, killed.stderr[-2000:]
  steps_before = sorted(int(p.name) for p in (b / "checkpoints").iterdir() if p.name.isdigit())
  assert steps_before and max(steps_before) == 10
  r = _cli(args + ["--run-dir", str(b)])
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resumed from step 10" in r.stdout
  pa, pb = _final_params(a, 24), _final_params(b, 24)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), pa, pb)
  ma = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
  mb = [json.loads(l) for l in (b / "metrics.jsonl").read_text().splitlines()]
  assert ma == mb  # identical records, no duplicates from the killed run
  assert ma[-1]["step"] == 24 and "loss" in ma[-1]
  assert (a / "learning_curve.png").stat().st_size > 1000
  assert any((a / "tb").iterdir())


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_resume_with_incompatible_config_names_the_field(tmp_path, capsys):
  args = TINY + ["--steps", "2", "--run-dir", str(tmp_path)]
  assert cli_main(args) == 0
  rc = cli_main(TINY[:-9] + ["--d-model", "32", "--layers", "1", "--heads", "2", "--steps", "2",
                              "--no-progress", "--run-dir", str(tmp_path)])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "model.d_model" in err[0]
  assert (tmp_path / "checkpoints" / "2").exists()  # nothing already written is lost


@pytest.mark.parametrize("extra, culprit", [
    (["--d-model", "0"], "d_model"),
    (["--heads", "3"], "n_heads"),
    (["--task-option", "bogus=1"], "bogus"),
    (["--mixer", "nonsense"], "nonsense"),
    (["CORPUS"], "/nonexistent/x.txt"),
])
def test_bad_input_is_one_line(tmp_path, capsys, extra, culprit):
  args = TINY + ["--steps", "1", "--run-dir", str(tmp_path / "r")] + extra
  if extra == ["CORPUS"]:
    args = ["train", "lm", "--task", "corpus", "--task-option", "data_files=/nonexistent/x.txt",
            "--steps", "1", "--run-dir", str(tmp_path / "r")]
  rc = cli_main(args)
  err = capsys.readouterr().err.strip().splitlines()
  assert rc != 0
  assert len(err) == 1 and culprit in err[0], err


def test_bad_config_file(tmp_path, capsys):
  bad = tmp_path / "c.json"
  bad.write_text(json.dumps({"model": {"d_modle": 3}}))
  assert cli_main(["train", "lm", "--config", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
  assert "d_modle" in capsys.readouterr().err
  bad.write_text("{not json")
  assert cli_main(["train", "lm", "--config", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
  assert "c.json" in capsys.readouterr().err


def test_train_config_validation():
  with pytest.raises(ConfigError, match="TrainConfig.steps"):
    TrainConfig(steps=0)
  with pytest.raises(ConfigError, match="schedule"):
    TrainConfig(schedule="exp")
