"""Smoke test of the training-shape attention benchmark (python -m jaxlab.bench.attention_gpu)."""

import json

import jax.numpy as jnp
import pytest

from jaxlab.bench import attention_gpu


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_rows_are_measured_and_appended(tmp_path):
  out = tmp_path / "rows.jsonl"
  rows = attention_gpu.bench([32, 64], tokens=64, heads=1, head_dim=16, dtype=jnp.bfloat16,
                             ops=("softmax", "log_linear_mamba2", "path"), repeats=1,
                             out=str(out), log=lambda *_: None)
  assert [(r["op"], r["T"], r["B"]) for r in rows] == [
      ("softmax", 32, 2), ("log_linear_mamba2", 32, 2), ("path", 32, 2),
      ("softmax", 64, 1), ("log_linear_mamba2", 64, 1), ("path", 64, 1)]
  assert all(r["ms"] is not None and r["ms"] > 0 and "failed" not in r["note"] for r in rows)
  assert [json.loads(line) for line in out.read_text().splitlines()] == rows
  table = attention_gpu.format_table(rows)
  assert table.count("\n") == len(rows) + 1


def test_a_failing_shape_is_recorded_not_raised():
  rows = attention_gpu.bench([16], tokens=16, heads=1, head_dim=8, ops=("nope",), repeats=1,
                             log=lambda *_: None)
  assert rows[0]["ms"] is None and "op: unknown 'nope'" in rows[0]["note"]


def test_anchor_ratio_uses_the_published_figure():
  assert attention_gpu.ANCHORS_MS["path"][32768] == 98.1
  assert attention_gpu.ANCHORS_MS["log_linear_mamba2"][2048] == 6.45


def test_protocol_batch_sizes_are_the_issues():
  # T = 2K (B = 8), 8K (B = 2), 32K (B = 1): the shapes the anchors were measured at.
  assert [attention_gpu.batch_size(t, None) for t in (2048, 8192, 32768)] == [8, 2, 1]
  assert attention_gpu.batch_size(2048, 32768) == 16
