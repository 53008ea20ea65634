"""jaxlab.bench.optim at toy size: rows, byte accounting, bad arguments."""

from __future__ import annotations

import pytest

from jaxlab.bench.optim import bench, memory


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_bench_runs():
  rows = bench((4,), steps=2, d_model=32, n_layers=1, batch_size=2, seq_len=8, vocab_size=64,
               methods=("lora",))  # update_every defaults to steps: one merge, one refresh step
  assert [r["method"] for r in rows] == ["lora"]
  assert rows[0]["compile_s"] > 0 and rows[0]["rank"] == 4
  assert rows[0]["refresh_step_ms"] > 0 and rows[0]["merge_ms"] > 0


def test_memory_rows_and_byte_accounting():
  d, r = 32, 4
  rows = memory((r,), d_model=d, n_layers=1, seq_len=8, vocab_size=64)
  by = {row["method"]: row for row in rows}
  assert list(by) == ["adamw", "galore", "random", "lora"]
  # 1 layer: q, k, v, o [d, d]; gate, up [d, 2d]; down [2d, d]. Shorter side is always d.
  # galore stores one [d, r] fp32 projector per kernel on top of what random keeps.
  assert by["galore"]["opt_state_bytes"] - by["random"]["opt_state_bytes"] == 7 * d * r * 4
  # LoRA's Adam state over A equals random's over the projected gradients, minus the
  # projected transformation's own int32 step counter.
  assert by["random"]["opt_state_bytes"] - by["lora"]["opt_state_bytes"] == 4
  assert by["lora"]["basis_bytes"] == 7 * d * r * 4 and by["random"]["basis_bytes"] == 0
  # Adam keeps 2 x params; the projected methods keep less, LoRA trains fewer bytes.
  assert by["adamw"]["opt_state_bytes"] == 2 * by["adamw"]["trainable_bytes"] + 2 * 4
  assert by["random"]["state_vs_adamw"] < by["galore"]["state_vs_adamw"] < 1
  assert by["lora"]["trainable_bytes"] < by["adamw"]["trainable_bytes"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(ranks=()), "ranks"),
    (dict(ranks=(0,)), "ranks"),
    (dict(ranks=(300,)), "exceeds d_model"),
    (dict(ranks=(4,), steps=0), "steps"),
    (dict(ranks=(4,), methods=("sgd",)), "unknown method 'sgd'"),
    (dict(ranks=(4,), steps=2, update_every=0), "update_every"),
])
def test_bench_bad_arguments(kwargs, match):
  ranks = kwargs.pop("ranks")
  with pytest.raises(ValueError, match=match):
    bench(ranks, **kwargs)
  if "steps" not in kwargs:
    with pytest.raises(ValueError, match=match):
      memory(ranks, **kwargs)


def test_experiment_table_and_dual_gap():
  """The report helpers of `python -m jaxlab.optim.experiment` on a hand-made result."""
  from jaxlab.optim.experiment import dual_gap, table

  def run(method, lr, final, nbytes=100):
    return dict(method=method, learning_rate=lr, test_curve=[(0, 5.0), (10, final)],
                train_loss_last10pct=final, opt_state_bytes=nbytes, trainable_bytes=1, seconds=2.0)

  runs = {"adamw@0.001": run("adamw", 1e-3, 2.0, 400), "adamw@0.003": run("adamw", 3e-3, 1.5, 400),
          "random@0.003": run("random", 3e-3, 1.75), "lora@0.003": run("lora", 3e-3, 1.7)}
  result = dict(runs=runs, best={"adamw": "adamw@0.003", "random": "random@0.003",
                                 "lora": "lora@0.003"})
  lines = table(result).splitlines()
  assert lines[0].startswith("| method | test loss @ lr 0.001 | test loss @ lr 0.003 |")
  assert lines[2] == "| adamw | 2.0000 | 1.5000 * | 0 KiB | 1.000 | 2 |"
  assert lines[3] == "| random |  | 1.7500 * | 0 KiB | 0.250 | 2 |"
  assert abs(dual_gap(result) - 0.05) < 1e-12


def test_experiment_rejects_unknown_method():
  from jaxlab.optim.experiment import main
  with pytest.raises(SystemExit):
    main(["--methods", "adamw,sgd"])
