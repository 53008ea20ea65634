"""Pure-functional JAX ops (log-linear attention, PaTH attention, ...).

Exports are resolved lazily so that one op's import cost or error does not
affect the others.
"""

import importlib

_EXPORTS = {
    "log_linear_attention": "jaxlab.ops.log_linear",
    "log_linear_gated_delta": "jaxlab.ops.log_linear",
    "log_linear_attention_step": "jaxlab.ops.log_linear",
    "log_linear_gated_delta_step": "jaxlab.ops.log_linear",
    "LogLinearState": "jaxlab.ops.log_linear",
    "path_attention": "jaxlab.ops.path",
    "path_prefill": "jaxlab.ops.path",
    "path_extend": "jaxlab.ops.path",
    "path_decode_step": "jaxlab.ops.path",
    "PathCache": "jaxlab.ops.path",
}


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'jaxlab.ops' has no attribute {name!r}")


def __dir__():
  return sorted(_EXPORTS)
