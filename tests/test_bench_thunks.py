"""The thunk-sequence / optimized-HLO summaries of jaxlab.bench.thunks, on synthetic
dumps in the format XLA:GPU writes (the CPU backend writes no thunk sequence)."""

from __future__ import annotations

from jaxlab.bench import thunks

SEQUENCE = """\
000: kCommandBuffer
  000: kKernel fusion.1
  001: kCustomCall mosaic_gpu_v2
  002: kKernel fusion.2
001: kCustomCall mosaic_gpu_v2
002: kKernel loop_dynamic_slice_fusion
003: kCommandBuffer
  000: kCustomCall mosaic_gpu_v2
"""

HLO = """\
HloModule jit__step_unrolled, entry_computation_layout={()->f32[]}

%command_buffer (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  ROOT %cc = f32[8]{0} custom-call(%p0), custom_call_target="mosaic_gpu_v2", api_version=API_VERSION_TYPED_FFI
}

%command_buffer.1 (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  %a = f32[8]{0} custom-call(%p0), custom_call_target="mosaic_gpu_v2"
  ROOT %b = f32[8]{0} custom-call(%a), custom_call_target="mosaic_gpu_v2"
}

ENTRY %main.3 (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %c = f32[8]{0} call(%x), to_apply=%command_buffer
  ROOT %d = f32[8]{0} custom-call(%c), custom_call_target="mosaic_gpu_v2"
}
"""


def test_thunk_sequence_counts_by_depth():
  s = thunks.summarize_text("m", SEQUENCE)
  assert s.top == {"kCommandBuffer": 2, "kCustomCall": 1, "kKernel": 1}
  assert s.nested == {"kKernel": 2, "kCustomCall": 2}
  assert s.host_launched_custom_calls == 1
  assert "kCommandBuffer 2" in s.line()


def test_hlo_custom_calls_inside_and_outside_command_buffers():
  assert thunks.mosaic_calls_by_region(HLO) == {"command_buffer": 3, "other": 1}
  assert thunks.mosaic_calls_per_computation(HLO) == {"command_buffer": 1, "command_buffer.1": 2,
                                                      "main.3": 1}


def test_cli_reads_a_dump_dir(tmp_path, capsys):
  (tmp_path / f"module_0001.jit__step_unrolled.{thunks.SUFFIX}").write_text(SEQUENCE)
  (tmp_path / f"module_0001.jit__step_unrolled.{thunks.HLO_SUFFIX}").write_text(HLO)
  (tmp_path / f"module_0002.jit_other.{thunks.SUFFIX}").write_text("000: kKernel f\n")
  assert thunks.main([str(tmp_path), "--match", "_step_unrolled"]) == 0
  out = capsys.readouterr().out
  assert "module_0001.jit__step_unrolled: top level" in out and "jit_other" not in out
  assert "custom calls launched from the host: 1" in out
  assert "inside command_buffer computations 3, elsewhere 1" in out
  assert "by computation: command_buffer.1 2" in out
  assert "no command_buffer computation" not in out
  # an HLO without command_buffer computations (XLA forming them from thunks): said so
  (tmp_path / f"module_0001.jit__step_unrolled.{thunks.HLO_SUFFIX}").write_text(
      HLO.replace("command_buffer", "cb"))
  assert thunks.main([str(tmp_path), "--match", "_step_unrolled"]) == 0
  assert "no command_buffer computation in this HLO" in capsys.readouterr().out
  # command_buffer computations without Mosaic calls in them still count as such
  (tmp_path / f"module_0001.jit__step_unrolled.{thunks.HLO_SUFFIX}").write_text(
      HLO.replace('"mosaic_gpu_v2"', '"other"'))
  assert thunks.main([str(tmp_path), "--match", "_step_unrolled"]) == 0
  assert "no command_buffer computation" not in capsys.readouterr().out
  assert thunks.main([str(tmp_path / "missing")]) == 2
  assert thunks.main([str(tmp_path), "--match", "nothing"]) == 1
  assert "files there, e.g." in capsys.readouterr().err


def test_a_module_without_command_buffers_reads_its_initial_sequence(tmp_path):
  """XLA dumps the sequence after the thunk passes only when they changed it: a module
  with no command buffer leaves its initial sequence, which is then read (and named)."""
  (tmp_path / f"module_0003.jit__step_unrolled.{thunks.INITIAL_SUFFIX}").write_text(
      "000: kCustomCall mosaic\n001: kKernel f\n002: kCustomCall mosaic\n")
  (tmp_path / f"module_0004.jit_both.{thunks.INITIAL_SUFFIX}").write_text("000: kKernel f\n")
  (tmp_path / f"module_0004.jit_both.{thunks.SUFFIX}").write_text(SEQUENCE)
  by = {s.module: s for s in thunks.summarize_dir(tmp_path)}
  initial = "module_0003.jit__step_unrolled" + thunks.NO_PASS
  assert set(by) == {initial, "module_0004.jit_both"}
  assert by[initial].host_launched_custom_calls == 2 and by[initial].nested == {}
  assert by["module_0004.jit_both"] == thunks.summarize_text("module_0004.jit_both", SEQUENCE)
