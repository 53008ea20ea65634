"""Task registry: `get_task(name, seed=, **options)` and `known_tasks()`.

Options are checked against the task's frozen config dataclass, so an unknown
option or a wrong type fails with a one-line ValueError naming it.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Mapping, Sequence

from jaxlab.config import ConfigError, from_dict
from jaxlab.data.base import Task, check_seed


def _mqar(seed: int, options: Mapping[str, Any]) -> Task:
  from jaxlab.data.synthetic import MQARConfig, MQARTask
  return MQARTask(_config("mqar", MQARConfig, options), seed)


def _flipflop(seed: int, options: Mapping[str, Any]) -> Task:
  from jaxlab.data.synthetic import FlipFlopConfig, FlipFlopTask
  return FlipFlopTask(_config("flipflop", FlipFlopConfig, options), seed)


def _group(name: str):
  def build(seed: int, options: Mapping[str, Any]) -> Task:
    from jaxlab.data.synthetic import PermutationConfig, PermutationTask
    return PermutationTask(name, _config(name, PermutationConfig, options), seed)
  return build


def _corpus(seed: int, options: Mapping[str, Any]) -> Task:
  from jaxlab.data.corpus import CorpusConfig, CorpusTask
  return CorpusTask(_config("corpus", CorpusConfig, CorpusConfig.normalize(options)), seed=seed)


def _config_class(name: str):
  if name == "mqar":
    from jaxlab.data.synthetic import MQARConfig as cls
  elif name == "flipflop":
    from jaxlab.data.synthetic import FlipFlopConfig as cls
  elif name in ("s5", "a5"):
    from jaxlab.data.synthetic import PermutationConfig as cls
  else:
    from jaxlab.data.corpus import CorpusConfig as cls
  return cls


_TASKS: dict[str, Callable[[int, Mapping[str, Any]], Task]] = {
    "mqar": _mqar,
    "flipflop": _flipflop,
    "s5": _group("s5"),
    "a5": _group("a5"),
    "corpus": _corpus,
}


def _config(task: str, cls, options: Mapping[str, Any]):
  fields = {f.name for f in dataclasses.fields(cls) if f.init}
  for k in options:
    if k not in fields:
      raise ConfigError(f"task {task!r}: unknown option {k!r} (known: {', '.join(sorted(fields))})")
  try:
    return from_dict(cls, options)
  except ConfigError as e:
    raise ConfigError(f"task {task!r}: {e}") from None


def known_tasks() -> list[str]:
  """Names `get_task` accepts. "corpus" needs the `data_files` option."""
  return sorted(_TASKS)


def get_task(name: str, *, seed: int = 0, **options) -> Task:
  """Build task `name` with its options (see docs/data.md); ValueError names a bad one."""
  if name not in _TASKS:
    raise ValueError(f"unknown task {name!r} (known: {', '.join(known_tasks())})")
  return _TASKS[name](check_seed(seed), options)


def task_options(name: str) -> dict[str, Any]:
  """The options of task `name` and their defaults (a required option maps to None)."""
  if name not in _TASKS:
    raise ValueError(f"unknown task {name!r} (known: {', '.join(known_tasks())})")
  out = {}
  for f in dataclasses.fields(_config_class(name)):
    if f.default is not dataclasses.MISSING:
      out[f.name] = f.default
    elif f.default_factory is not dataclasses.MISSING:
      out[f.name] = f.default_factory()
    else:
      out[f.name] = None
  return out


def parse_task_options(name: str, items: Sequence[str] | None) -> dict[str, Any]:
  """Turn CLI strings "key=value" into typed options for `get_task(name, **options)`.

  Values are converted by the option's declared type (int, float, bool, str,
  None via "none", tuples via comma-separated lists).
  """
  if name not in _TASKS:
    raise ValueError(f"unknown task {name!r} (known: {', '.join(known_tasks())})")
  cls = _config_class(name)
  hints = typing.get_type_hints(cls)
  out: dict[str, Any] = {}
  for item in items or ():
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ConfigError(f"task {name!r}: option {item!r} is not of the form key=value")
    if key not in hints:
      raise ConfigError(f"task {name!r}: unknown option {key!r} "
                        f"(known: {', '.join(sorted(hints))})")
    out[key] = _parse_value(name, key, hints[key], raw.strip())
  return out


def _parse_value(task: str, key: str, tp, raw: str):
  args = typing.get_args(tp)
  if type(None) in args:
    if raw.lower() in ("none", "null", ""):
      return None
    tp = next(a for a in args if a is not type(None))
  if typing.get_origin(tp) is tuple:
    inner = typing.get_args(tp)[0]
    return tuple(_parse_value(task, key, inner, r.strip()) for r in raw.split(",") if r.strip())
  try:
    if tp is bool:
      if raw.lower() in ("true", "1", "yes"):
        return True
      if raw.lower() in ("false", "0", "no"):
        return False
      raise ValueError
    if tp is int:
      return int(raw)
    if tp is float:
      return float(raw)
  except ValueError:
    raise ConfigError(f"task {task!r}: option {key!r} expects {tp.__name__}, got {raw!r}") from None
  return raw
