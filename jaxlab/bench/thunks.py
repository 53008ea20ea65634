"""Which kernels of a compiled XLA:GPU program run inside command buffers (CUDA graphs).

XLA writes each GPU executable's thunk sequence when `--xla_dump_to=DIR` is set:
`<module>.thunk_sequence_after_thunk_passes.txt`, one line per thunk (`NNN: kKind ...`,
nested thunks indented under their command buffer), or only `<module>.thunk_sequence.txt`
when the thunk passes changed nothing (no command buffer formed). Kernels at the top level are
launched one by one from the host; kernels inside a `kCommandBuffer` are replayed as one
graph. For the batch-1 decode step this tells whether the Mosaic GPU custom calls are
what splits the graphs (docs/kernels.md, "Where the time goes"). The optimized HLO
(`<module>.gpu_after_optimizations.txt`) says the same from the other side: XLA wraps
graph-captured instructions into computations named `command_buffer*`, so the summary
also counts the `mosaic_gpu_v2` custom calls inside and outside them.

  XLA_FLAGS=--xla_dump_to=/tmp/dump python -m jaxlab.bench.decode --variants pallas ...
  python -m jaxlab.bench.thunks /tmp/dump [--match _step_unrolled]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import pathlib
import re
import sys

SUFFIX = "thunk_sequence_after_thunk_passes.txt"
_LINE = re.compile(r"^(\s*)(\d+):\s+(k\w+)")


@dataclasses.dataclass(frozen=True)
class ThunkSummary:
  """Thunk kinds of one module: at the top level (launched from the host) and nested
  (inside command buffers or other control-flow thunks)."""
  module: str
  top: dict[str, int]
  nested: dict[str, int]

  @property
  def host_launched_custom_calls(self) -> int:
    return self.top.get("kCustomCall", 0)

  def line(self) -> str:
    fmt = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))
    return (f"{self.module}: top level [{fmt(self.top) or '-'}]; "
            f"nested [{fmt(self.nested) or '-'}]")


def summarize_text(module: str, text: str) -> ThunkSummary:
  """Count thunk kinds by depth: a line indented less than or as much as the first
  thunk line is top level, a more indented one is nested."""
  top, nested = collections.Counter(), collections.Counter()
  base = None
  for raw in text.splitlines():
    m = _LINE.match(raw)
    if not m:
      continue
    indent = len(m.group(1).expandtabs())
    base = indent if base is None else min(base, indent)
    (top if indent <= base else nested)[m.group(3)] += 1
  return ThunkSummary(module, dict(top), dict(nested))


# XLA writes the sequence after its thunk passes only if they changed it; a module with
# no command buffer at all leaves only the initial sequence
INITIAL_SUFFIX = "thunk_sequence.txt"
NO_PASS = " (initial sequence: the thunk passes changed nothing, so no command buffers)"


def summarize_dir(dump_dir: str | pathlib.Path, match: str = "") -> list[ThunkSummary]:
  """One summary per dumped module whose file name contains `match`: its sequence after
  the thunk passes, else its initial one (the module name then says so)."""
  out = {}
  for suffix, note in ((INITIAL_SUFFIX, NO_PASS), (SUFFIX, "")):
    for f in sorted(pathlib.Path(dump_dir).glob(f"*.{suffix}")):
      if match in f.name:
        module = f.name[:-len(suffix)].rstrip(".")
        out[module] = summarize_text(module + note, f.read_text())
  return [out[m] for m in sorted(out)]


HLO_SUFFIX = "gpu_after_optimizations.txt"
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CB_COMPUTATION = re.compile(r"^%?command_buffer[\w.\-]*\s.*\{\s*$", re.M)


def mosaic_calls_per_computation(hlo_text: str, target: str = "mosaic_gpu_v2"
                                 ) -> collections.Counter:
  """Custom calls to `target` in the optimized HLO, counted per computation name."""
  out = collections.Counter()
  current = ""
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      m = _COMPUTATION.match(line)
      if m:
        current = m.group(1)
      continue
    if f'custom_call_target="{target}"' in line:
      out[current] += 1
  return out


def mosaic_calls_by_region(hlo_text: str, target: str = "mosaic_gpu_v2") -> dict[str, int]:
  """The same, split into computations XLA outlined as command buffers and the rest:
  {"command_buffer": n, "other": m}."""
  per = mosaic_calls_per_computation(hlo_text, target)
  inside = sum(v for k, v in per.items() if k.startswith("command_buffer"))
  return {"command_buffer": inside, "other": sum(per.values()) - inside}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxlab.bench.thunks", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("dump_dir", help="the --xla_dump_to directory")
  p.add_argument("--match", default="", help="only modules whose file name contains this")
  args = p.parse_args(argv)
  if not pathlib.Path(args.dump_dir).is_dir():
    print(f"thunks: {args.dump_dir}: no such directory", file=sys.stderr)
    return 2
  sums = summarize_dir(args.dump_dir, args.match)
  hlos = [f for f in sorted(pathlib.Path(args.dump_dir).glob(f"*{HLO_SUFFIX}"))
          if args.match in f.name]
  if not sums and not hlos:
    print(f"thunks: neither *{SUFFIX} nor *{HLO_SUFFIX} in {args.dump_dir} (match "
          f"{args.match!r}); this XLA may name its dumps differently", file=sys.stderr)
    names = sorted(f.name for f in pathlib.Path(args.dump_dir).iterdir())
    print(f"thunks: {len(names)} files there, e.g. " + ", ".join(
        [n for n in names if "after" in n or "thunk" in n][:12] or names[:12]), file=sys.stderr)
    return 1
  for s in sums:
    print(s.line())
    print(f"  custom calls launched from the host: {s.host_launched_custom_calls}")
  for f in hlos:
    text = f.read_text()
    r = mosaic_calls_by_region(text)
    print(f"{f.name}: mosaic_gpu_v2 calls inside command_buffer computations "
          f"{r['command_buffer']}, elsewhere {r['other']}")
    if not _CB_COMPUTATION.search(text):
      # JAX 0.10.2's XLA builds its command buffers from thunks, after the HLO
      print("  (no command_buffer computation in this HLO: where XLA forms command "
            "buffers from thunks, the thunk lines above are the ones to read)")
    top = mosaic_calls_per_computation(text).most_common(5)
    print("  by computation: " + ", ".join(f"{name} {n}" for name, n in top))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
