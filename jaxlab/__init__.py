"""jaxlab: research language-model systems in JAX / Flax NNX.

Submodules are imported lazily so that ``import jaxlab`` stays cheap and one
subsystem's import error never hides another's.
"""

import importlib
import os

__version__ = "0.1.0"

# XLA:CPU workaround (jaxlib 0.10.2): with the concurrency-optimized scheduler, the
# log-linear Gated DeltaNet mixer's extend deadlocked on its second call (every XLA
# thread idle) on a 2-core CPU; turning the scheduler off fixed it every time. XLA reads
# XLA_FLAGS when the backend starts, so this only helps if jaxlab is imported before
# the first JAX computation. Opt out with JAXLAB_XLA_WORKAROUNDS=0. See docs/known_issues.md.
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _xla_workarounds():
  if os.environ.get("JAXLAB_XLA_WORKAROUNDS", "1") == "0":
    return
  try:
    from importlib.metadata import version
    jaxlib_version = version("jaxlib")
  except Exception:  # pragma: no cover - no jaxlib metadata
    return
  flags = os.environ.get("XLA_FLAGS", "")
  # Only where the flag is verified to exist (an unknown XLA flag aborts the process).
  if jaxlib_version.startswith("0.10.") and "concurrency_optimized_scheduler" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}".strip()


_xla_workarounds()

_SUBMODULES = ("models", "ops", "data", "optim", "sharding", "testing", "config")


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"jaxlab.{name}")
  raise AttributeError(f"module 'jaxlab' has no attribute {name!r}")
