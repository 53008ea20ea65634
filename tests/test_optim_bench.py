"""jaxlab.bench.optim at toy size: rows, byte accounting, bad arguments."""

from __future__ import annotations

import pytest

from jaxlab.bench.optim import bench, memory


def test_bench_runs():
  rows = bench((4,), steps=2, d_model=32, n_layers=1, batch_size=2, seq_len=8, vocab_size=64,
               update_every=1, methods=("lora",))  # update_every=1: the merge path runs too
  assert [r["method"] for r in rows] == ["lora"]
  assert rows[0]["step_ms"] > 0 and rows[0]["compile_s"] > 0 and rows[0]["rank"] == 4


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
])
def test_bench_bad_arguments(kwargs, match):
  ranks = kwargs.pop("ranks")
  with pytest.raises(ValueError, match=match):
    bench(ranks, **kwargs)
  if "steps" not in kwargs:
    with pytest.raises(ValueError, match=match):
      memory(ranks, **kwargs)
