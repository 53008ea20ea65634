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


PTXAS_LOG = """ptxas info    : Compiling entry function 'mlp_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for mlp_mosaic_gpu_kernel
    0 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 151 registers, used 2 barriers, 1 bytes smem
"""
PASS_LOG_HEAD = """// -----// IR Dump Before ResolveTrivialLocationsPass //----- //
    %235 = gpu.launch async [%0] blocks(%arg2, %arg3, %arg4) in (%arg8 = %c256, %arg9 = %c2, \
%arg10 = %c1_0) threads(%arg5, %arg6, %arg7) in (%arg11 = %c128_1, %arg12 = %c1_2, \
%arg13 = %c1_3) dynamic_shared_memory_size %c73760_i32 {
"""


def test_compiled_kernel_reports():
  """ptxas's registers and spills, and the launch from Mosaic's pass log, as dumped."""
  from jaxlab.bench.kernels import dumped_launch, ptxas_usage
  assert ptxas_usage(PTXAS_LOG) == (151, 24)
  k = dumped_launch("mlp", PASS_LOG_HEAD, PTXAS_LOG)
  assert (k.name, k.grid, k.threads, k.smem, k.regs, k.spill) == ("mlp", 512, 128, 73760, 151, 24)
  with pytest.raises(ValueError, match="register"):
    ptxas_usage("ptxas info    : Compile time = 48 ms")
  with pytest.raises(ValueError, match="gpu.launch"):
    dumped_launch("mlp", "module {}", PTXAS_LOG)


def test_registers_limit_the_fit():
  """Registers go to warps in blocks of 256: 151 per thread -> 4864 per warp, 19456 per
  4-warp CTA, 3 CTAs in 64K; 254 -> 2; 105 -> 4 (SMEM alone would allow 6)."""
  base = dict(grid=128, threads=128, smem=35 * 1024)
  assert Launch("a", **base).fit_per_sm == 6
  assert Launch("a", **base, regs=151, spill=0).fit_per_sm == 3
  assert Launch("a", **base, regs=254, spill=0).fit_per_sm == 2
  assert Launch("a", **base, regs=105, spill=0).fit_per_sm == 4
  assert Launch("a", **base, regs=64, spill=0).fit_per_sm == 6   # SMEM binds again
  # 97 per thread is 3104 per warp, rounded up to 3328: 4 CTAs (5 without the rounding)
  assert Launch("a", **base, regs=97, spill=0).fit_per_sm == 4
  row = Launch("a", **base, regs=254, spill=0).row()
  assert row["regs"] == 254 and row["spill_bytes"] == 0
  assert "regs" not in Launch("a", **base).row()


def _has_cuda_plugin() -> bool:
  import importlib.util
  try:
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None
               for v in (12, 13))
  except ModuleNotFoundError:   # no jax_plugins package at all
    return False


@pytest.mark.slow
@pytest.mark.skipif(_has_cuda_plugin(), reason="the CUDA plugin is installed here")
def test_compile_without_plugin_is_one_line(capsys):
  """Without the jaxlib's CUDA plugin, --compile says what to install, in one line."""
  assert main(["bench", "kernels", "--config", "tiny", "--variants", "pallas", "--compile"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "jax-cuda13-plugin" in err[0], err


@pytest.mark.slow
@pytest.mark.skipif(not _has_cuda_plugin(), reason="needs the jaxlib's CUDA plugin "
                    "(scripts/cuda_aot_venv.sh); no GPU needed")
def test_compiled_launches_tiny():
  """The tiny step compiles for an H100 with no GPU: every lowered kernel has a compiled
  twin with registers, and no kernel spills."""
  from jaxlab.bench.kernels import compiled_launches
  rows = compiled_launches("tiny", "pallas")
  lowered = step_launches("tiny", "pallas")
  assert [(r.name, r.grid, r.smem) for r in rows] == [(r.name, r.grid, r.smem) for r in lowered]
  for r in rows:
    assert 0 < r.regs <= 255 and r.spill == 0, r
