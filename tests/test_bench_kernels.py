"""`jaxlab bench kernels`: launch shapes read from the Pallas step lowered for CUDA."""

from __future__ import annotations

import dataclasses
import json
import os

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


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
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


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_fill_variant_launches():
  """`pallas-mlp2k-fill` (the bench variant) splits the two MLP GEMVs: 512 and 256 CTAs."""
  rows = {r.name: r for r in step_launches("llama-1b-bench", "pallas-mlp2k-fill")}
  assert rows["mlp_gate_up"].grid == 2 * 2 * 8192 // 64
  assert rows["mlp_down"].grid == 2048 // 64 * 8


def test_not_a_pallas_variant():
  with pytest.raises(ValueError, match="xla-unrolled"):
    step_launches("tiny", "xla-unrolled")


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
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


def test_compiled_kernel_reports():
  """ptxas's registers and spills; a kernel's launch read back from a Mosaic pass log
  equals the one read from the lowered step."""
  from jax._src.interpreters import mlir as jax_mlir
  from jax._src.lib.mlir import ir
  from jax.experimental.mosaic.gpu import core as mgpu_core
  from jax.experimental.mosaic.gpu import dialect as mgpu_dialect

  from jaxlab.bench.kernels import _step_avals, _walk, dumped_launch, launches, ptxas_usage
  assert ptxas_usage(PTXAS_LOG) == (151, 24)
  with pytest.raises(ValueError, match="register"):
    ptxas_usage("ptxas info    : Compile time = 48 ms")
  step, args = _step_avals("tiny", "pallas", None, 64)
  lowered = step.trace(*args).lower(lowering_platforms=("cuda",))
  call = next(op for op in _walk(lowered.compiler_ir("stablehlo").operation)
              if op.name == "stablehlo.custom_call"
              and "mosaic_gpu" in str(op.attributes["call_target_name"]))
  data = bytes(ir.StringAttr(call.attributes["mhlo.backend_config"]["module"]).value_bytes)
  with jax_mlir.make_ir_context() as ctx:
    mgpu_dialect.register_dialect(ctx)
    ctx.allow_unregistered_dialects = True
    # the pass log holds the module after deserialization (func.func, gpu.launch, ...)
    text = str(mgpu_core._run_serde_pass(ir.Module.parse(data), serialize=False))
  assert "gpu.launch" in text and "stable_mosaic_gpu" not in text
  log = (f"// -----// IR Dump Before A: a //----- //\n{text}\n"
         f"// -----// IR Dump Before B: b //----- //\nmodule {{}}\n")
  want = launches(lowered)[0]
  got = dumped_launch(log.splitlines(keepends=True), PTXAS_LOG)
  assert got == dataclasses.replace(want, regs=151, spill=24)
  assert want.name == "rmsnorm_qkv"
  with pytest.raises(ValueError, match="IR dump"):
    dumped_launch(["module {}\n"], PTXAS_LOG)


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


def _sass(lines) -> str:
  """nvdisasm -c style text: labels as given, instructions with addresses."""
  out, addr = [], 0
  for ln in lines:
    if ln.startswith(".L_x_"):
      out.append(ln)
    else:
      out.append(f"        /*{addr:04x}*/                   {ln} ;")
      addr += 16
  return "\n".join(out)


def test_sass_loops_are_natural_loops():
  """A main loop whose latch ptxas put out of line (an unconditional branch back), with an
  inner loop and a barrier wait whose retry path sits at the end of the function and
  branches back into the loop; a short wait loop; a retry path outside any loop."""
  body = lambda n, op="FFMA R1, R2, R3, R1": [op] * n
  sass = _sass(
      body(3, "MOV R0, R1")
      + ["SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R2", "@!P1 BRA `(.L_x_9)", ".L_x_8:"]
      + body(5, "MOV R4, R5")
      + [".L_x_1:"] + body(10) + ["HGMMA.64x32x16.F32.BF16 R40, gdesc[UR8], R40"]
      + [".L_x_2:"] + body(30) + ["@P2 BRA `(.L_x_2)"]            # inner loop: 31
      + ["SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR5], R2", "@!P1 BRA `(.L_x_5)", ".L_x_6:"]
      + body(4) + [".L_x_7:"] + body(2) + ["@P3 BRA `(.L_x_7)"]   # 3 instructions: a wait
      + ["@P0 BRA `(.L_x_3)"] + ["EXIT"]
      + [".L_x_3:"] + body(2, "IADD3 R6, R6, 0x1, RZ") + ["BRA `(.L_x_1)"]   # the latch
      + [".L_x_5:", "NANOSLEEP 0x10", "BRA `(.L_x_6)"]            # retry inside the loop
      + [".L_x_9:", "NANOSLEEP 0x10", "BRA `(.L_x_8)"])           # retry before it
  from jaxlab.bench.kernels import sass_loops
  inner = 31
  outer = 11 + inner + 2 + 4 + 3 + 1 + 3 + 2   # the loop's blocks, its wait retry included
  loops = sass_loops(sass)
  # innermost only: the inner loop; the outer loop contains it
  assert loops == [(inner, 0, inner)], loops
  # without the inner loop's back edge, the main loop is innermost and counts its latch
  # and its out-of-line wait retry, not the retry path before the loop; its shortest
  # trip leaves the retry out
  flat = sass.replace("@P2 BRA `(.L_x_2)", "NOP")
  assert sass_loops(flat) == [(outer, 1, outer - 2)], sass_loops(flat)
  # no loop at all: a wait's retry path branching back is not one
  straight = _sass(body(30) + ["SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R2",
                               "@!P1 BRA `(.L_x_9)", ".L_x_8:"] + body(30) + ["EXIT"]
                   + [".L_x_9:", "NANOSLEEP 0x10", "BRA `(.L_x_8)"])
  assert sass_loops(straight) == []


def test_sass_needs_compile(capsys):
  assert main(["bench", "kernels", "--config", "tiny", "--variants", "pallas", "--sass"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--sass needs --compile" in err[0], err


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


@pytest.mark.slow   # ~45 s each
@pytest.mark.skipif(not _has_cuda_plugin(), reason="needs the jaxlib's CUDA plugin "
                    "(scripts/cuda_aot_venv.sh); no GPU needed")
@pytest.mark.parametrize("config,variant", [("llama-8b-bench", "pallas"),
                                            ("llama-1b-bench", "pallas-mma"),
                                            ("llama-1b-bench", "pallas-mma-1k"),
                                            ("llama-8b-bench", "pallas-mma-attn"),
                                            ("gated-1b-bench", "pallas")])
def test_bench_steps_compile_without_spills(config, variant):
  """The attention kernels at Dh 128 / four heads per KV head (8B; 1428 spilled bytes per
  thread before head-dim chunks and head groups; also with both products on the tensor
  cores), the gate-update and PaTH attention (gated), and the tensor-core GEMVs (1B; also
  the one-kernel MLP's) compile with no spills."""
  from jaxlab.bench.kernels import compiled_launches
  for r in compiled_launches(config, variant):
    assert 0 < r.regs <= 255 and r.spill == 0, r


@pytest.mark.slow   # ~25 s: one 1B layer compiled for an H100
@pytest.mark.skipif(not _has_cuda_plugin(), reason="needs the jaxlib's CUDA plugin "
                    "(scripts/cuda_aot_venv.sh); no GPU needed")
@pytest.mark.parametrize("variant", ["pallas", "pallas-int8"])
def test_mlp_epilogue_is_one_xla_kernel(variant):
  """The one-kernel MLP's epilogue (x finished from the O-projection's partials + the
  MLP's partial rows, rounded) compiles for an H100 as one XLA reduction fusion, with no
  elementwise fusion after it (two kernels per layer before, ~2.4 us the second). With
  int8 weights too: the down scale multiplies the partial rows in the kernel (with it
  on the rows in XLA, x, scaled, took a fusion of its own)."""
  import subprocess
  import sys
  code = ("from jaxlab.bench.kernels import h100_lowered; "
          f"hlo = h100_lowered('llama-1b-bench', '{variant}').compile().as_text(); "
          "print([l.split('=')[0].strip() for l in hlo.split('ENTRY')[1].splitlines() "
          "if ' fusion(' in l])")
  env = {**os.environ, "JAX_PLATFORMS": "", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  fusions = r.stdout.strip().splitlines()[-1]
  # one layer: the MLP epilogue and the LM head's argmax are the two reductions; nothing
  # elementwise consumes the epilogue (the embedding row, selects and slices are the step's)
  assert "convert_fusion" not in fusions and "add_fusion" not in fusions, fusions


@pytest.mark.slow   # ~30 s: one 1B layer compiled for an H100, twice
@pytest.mark.skipif(not _has_cuda_plugin(), reason="needs the jaxlib's CUDA plugin "
                    "(scripts/cuda_aot_venv.sh); no GPU needed")
@pytest.mark.parametrize("variant", ["pallas", "pallas-mma-attn"])
def test_step_compiles_to_one_command_buffer(variant, tmp_path):
  """Compiled for an H100 (with its driver version), the whole Pallas step is one command
  buffer (a CUDA graph): no Mosaic kernel is launched from the host. Without a driver
  version in the target, XLA keeps every custom call out of its command buffers."""
  import subprocess
  import sys

  from jaxlab.bench import kernels, thunks

  def compile_step(target: str, dump) -> list:
    code = ("import sys; import jaxlab.bench.kernels as k; k.H100_TARGET = sys.argv[1]; "
            f"k.h100_lowered('llama-1b-bench', '{variant}').compile()")
    env = {**os.environ, "JAX_PLATFORMS": "", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}"}
    r = subprocess.run([sys.executable, "-c", code, target], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return thunks.summarize_dir(dump, "_step_unrolled")

  [s] = compile_step(kernels.H100_TARGET, tmp_path / "with")
  assert s.top == {"kCommandBuffer": 1}, s.line()
  assert s.nested.get("kCustomCall", 0) >= 6, s.line()   # the layer's Mosaic kernels + head
  assert s.host_launched_custom_calls == 0
  no_driver = kernels.H100_TARGET.replace(' driver_version: "13.0.0"', "")
  assert no_driver != kernels.H100_TARGET
  [s] = compile_step(no_driver, tmp_path / "without")
  assert s.host_launched_custom_calls >= 6, s.line()


def _has_nvdisasm() -> bool:
  from jaxlab.bench.kernels import _nvdisasm
  try:
    _nvdisasm()
  except RuntimeError:
    return False
  return True


@pytest.mark.slow   # ~60 s
@pytest.mark.skipif(not (_has_cuda_plugin() and _has_nvdisasm()),
                    reason="needs the jaxlib's CUDA plugin and nvdisasm (scripts/"
                    "cuda_aot_venv.sh + pip install nvidia-cuda-nvdisasm); no GPU needed")
def test_sass_loops_of_the_compiled_1b_step():
  """--sass on the 1B step with the tensor-core GEMVs: the one-kernel MLP's two loops (gate
  + up: 2 x [64, 128] @ [128, 32] = 16 HGMMA.64x32x16; down: [64, 64] @ [64, 128] = 4
  HGMMA.64x128x16), one loop of 8 in each GEMV kernel, none in attention's main loop."""
  from jaxlab.bench.kernels import compiled_launches
  rows = {r.name: r for r in compiled_launches("llama-1b-bench", "pallas-mma-1k", sass=True)}
  assert [h for _, h, _ in rows["rmsnorm_swiglu"].loops] == [16, 4]
  for name in ("rmsnorm_qkv", "out_proj_residual", "lm_head_argmax"):
    assert [h for _, h, _ in rows[name].loops] == [8], (name, rows[name].loops)
  assert all(h == 0 for _, h, _ in rows["decode_attention"].loops)
  # the MLP's CUDA-core loops had 979 and 647 instructions (docs/kernels.md)
  assert all(n < 400 for n, _, _ in rows["rmsnorm_swiglu"].loops), rows["rmsnorm_swiglu"].loops


@pytest.mark.slow   # ~60 s
@pytest.mark.skipif(not (_has_cuda_plugin() and _has_nvdisasm()),
                    reason="needs the jaxlib's CUDA plugin and nvdisasm (scripts/"
                    "cuda_aot_venv.sh + pip install nvidia-cuda-nvdisasm); no GPU needed")
def test_sass_loop_of_attention_on_the_tensor_cores():
  """scores="mma-pv" (pallas-mma-attn, 1B): attention's main loop issues its two products
  as 8 HGMMA (q.K^T and P.V, 4 each) and its shortest trip is under 600 instructions
  (1418 with the scores alone on the tensor cores, 1766 with neither), with no spills."""
  from jaxlab.bench.kernels import compiled_launches
  rows = {r.name: r for r in compiled_launches("llama-1b-bench", "pallas-mma-attn", sass=True)}
  attn = rows["decode_attention"]
  main = [loop for loop in attn.loops if loop[1]]
  assert [h for _, h, _ in main] == [8], attn.loops
  assert main[0][2] < 600 and attn.spill == 0, attn


@pytest.mark.slow   # ~60 s
@pytest.mark.skipif(not (_has_cuda_plugin() and _has_nvdisasm()),
                    reason="needs the jaxlib's CUDA plugin and nvdisasm (scripts/"
                    "cuda_aot_venv.sh + pip install nvidia-cuda-nvdisasm); no GPU needed")
def test_sass_loops_of_the_int8_step_on_the_tensor_cores():
  """pallas-int8-mma (1B): int8 tiles widened to bf16 in registers as WGMMA's A. The MLP's
  gate / up loop issues 16 HGMMA and its down loop (W_down^T) 8, each GEMV kernel's loop
  8; no spills; and each loop about half the CUDA-core form's (2026-11-27: gate / up
  1425, down 855, QKV 694, LM head 689 instructions; the tensor-core form 719, 361, 387,
  392), so the widening is all that is left of the per-element work."""
  from jaxlab.bench.kernels import compiled_launches
  rows = {r.name: r for r in compiled_launches("llama-1b-bench", "pallas-int8-mma", sass=True)}
  assert [h for _, h, _ in rows["rmsnorm_swiglu"].loops] == [16, 8]
  gate_up, down = (n for n, _, _ in rows["rmsnorm_swiglu"].loops)
  assert gate_up < 900 and down < 450, rows["rmsnorm_swiglu"].loops
  for name in ("rmsnorm_qkv", "lm_head_argmax"):
    assert [h for _, h, _ in rows[name].loops] == [8], (name, rows[name].loops)
    assert rows[name].loops[0][0] < 450, (name, rows[name].loops)
  assert [h for _, h, _ in rows["out_proj_residual"].loops] == [8]
  for r in rows.values():
    assert 0 < r.regs <= 255 and r.spill == 0, r


@pytest.mark.slow   # ~40 s
@pytest.mark.skipif(not (_has_cuda_plugin() and _has_nvdisasm()),
                    reason="needs the jaxlib's CUDA plugin and nvdisasm (scripts/"
                    "cuda_aot_venv.sh + pip install nvidia-cuda-nvdisasm); no GPU needed")
def test_sass_loops_of_the_int8_step_on_the_int8_tensor_cores():
  """pallas-int8-s8 (1B): int8 tiles as s8 WGMMA's A straight from SMEM against the
  vector's digits, 256-column steps. Each GEMV kernel's loop issues 8 IGMMA.64x8x32 per
  step, the MLP's gate / up loop 16 and its down loop (W_down^T, [128, 64] tiles) 4; no
  spills; and per weight byte well under the "mma" form's loops (2026-11-28, per 16 KB of
  int8: QKV 247 against 774, gate / up 413 against 1438, down 314 against 1444, LM head
  308 against 784, the merged O-projection 764 against 1790)."""
  from jaxlab.bench.kernels import compiled_launches
  rows = {r.name: r for r in compiled_launches("llama-1b-bench", "pallas-int8-s8", sass=True)}
  assert [g for _, g, _ in rows["rmsnorm_swiglu"].loops] == [16, 4], rows["rmsnorm_swiglu"]
  gate_up, down = (n for n, _, _ in rows["rmsnorm_swiglu"].loops)
  assert gate_up < 500 and down < 200, rows["rmsnorm_swiglu"].loops
  for name, most in (("rmsnorm_qkv", 300), ("lm_head_argmax", 370),
                     ("out_proj_residual", 900)):
    assert [g for _, g, _ in rows[name].loops] == [8], (name, rows[name].loops)
    assert rows[name].loops[0][0] < most, (name, rows[name].loops)
  for r in rows.values():
    assert 0 < r.regs <= 255 and r.spill == 0, r
