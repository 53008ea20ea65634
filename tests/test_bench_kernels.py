"""`jaxlab bench kernels`: launch shapes read from the Pallas step lowered for CUDA."""

from __future__ import annotations

import json

import pytest

from jaxlab.bench.kernels import SMS, Launch, step_launches
from jaxlab.cli import main


def test_launch_arithmetic():
  mlp = Launch("mlp", grid=128, threads=128, smem=72 * 1024)
  assert mlp.fit_per_sm == 3                       # 228 KB // (72 + 1) KB
  assert mlp.per_sm == pytest.approx(128 / SMS)
  assert mlp.warps_per_sm == pytest.approx(4 * 128 / SMS)
  assert mlp.waves == 1
  head = Launch("head", grid=2004, threads=128, smem=38 * 1024)
  assert head.fit_per_sm == 5 and head.waves == 4   # ceil(2004 / (132 * 5))
  assert head.warps_per_sm == 5 * 4                 # capped by what fits
  assert Launch("t", grid=1, threads=1024, smem=0).fit_per_sm == 2   # by threads


def test_llama_1b_launches():
  """The fused 1B layer and the two-kernel MLP: grids follow the weight shapes (64 rows
  per CTA), and every kernel fits an SM."""
  rows = {r.name: r for r in step_launches("llama-1b-bench", "pallas")}
  assert rows["rmsnorm_swiglu"].grid == 8192 // 64
  assert rows["lm_head_argmax"].grid == 32000 // 64
  for r in rows.values():
    assert r.threads == 128 and 0 < r.smem <= 227 * 1024 and r.fit_per_sm >= 1, r
  two = {r.name: r for r in step_launches("llama-1b-bench", "pallas-mlp2k")}
  assert two["mlp_gate_up"].grid == 2 * 8192 // 64
  assert "rmsnorm_swiglu" not in two and "mlp_down" in two


def test_fill_variant_launches():
  """`pallas-mlp2k-fill` (the bench variant) splits the two MLP GEMVs: 512 and 256 CTAs."""
  rows = {r.name: r for r in step_launches("llama-1b-bench", "pallas-mlp2k-fill")}
  assert rows["mlp_gate_up"].grid == 2 * 2 * 8192 // 64
  assert rows["mlp_down"].grid == 2048 // 64 * 8


def test_not_a_pallas_variant():
  with pytest.raises(ValueError, match="xla-unrolled"):
    step_launches("tiny", "xla-unrolled")


def test_cli(tmp_path, capsys):
  out = tmp_path / "k.json"
  assert main(["bench", "kernels", "--config", "tiny", "--variants", "pallas",
               "--json", str(out)]) == 0
  text = capsys.readouterr().out
  assert "lm_head_argmax" in text and "warps/SM" in text
  rows = json.loads(out.read_text())["variants"]["pallas"]
  assert {"name", "grid", "threads", "smem_kb", "fit_per_sm", "waves"} <= set(rows[0])
  assert main(["bench", "kernels", "--config", "tiny", "--kernel-options", "{bad"]) == 2
  assert "--kernel-options" in capsys.readouterr().err
