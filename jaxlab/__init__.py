"""jaxlab: research language-model systems in JAX / Flax NNX.

Submodules are imported lazily so that ``import jaxlab`` stays cheap and one
subsystem's import error never hides another's.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("models", "ops", "data", "optim", "sharding", "testing", "config")


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"jaxlab.{name}")
  raise AttributeError(f"module 'jaxlab' has no attribute {name!r}")
