"""Data for training and evaluation: synthetic diagnostic tasks and local text corpora.

  task = get_task("mqar", seed=0, num_kv_pairs=8)
  b = task.batch("train", index=0, batch_size=32)   # inputs/targets int32[B, T], loss_mask float32[B, T]
  exact_match(pred_BT, b["targets"], b["loss_mask"])

See docs/data.md for the tasks, their options and defaults.
"""

import importlib

from jaxlab.data.base import DataError, Task
from jaxlab.data.metrics import exact_match, exact_match_counts, exact_match_from_counts
from jaxlab.data.registry import get_task, known_tasks, parse_task_options, task_options

_LAZY = {
    "CorpusTask": "jaxlab.data.corpus",
    "CorpusConfig": "jaxlab.data.corpus",
    "ByteTokenizer": "jaxlab.data.tokenizer",
    "FileTokenizer": "jaxlab.data.tokenizer",
    "load_tokenizer": "jaxlab.data.tokenizer",
    "MQARConfig": "jaxlab.data.synthetic",
    "FlipFlopConfig": "jaxlab.data.synthetic",
    "PermutationConfig": "jaxlab.data.synthetic",
    "permutation_group": "jaxlab.data.synthetic",
}

__all__ = [
    "DataError", "Task", "get_task", "known_tasks", "task_options", "parse_task_options",
    "exact_match", "exact_match_counts", "exact_match_from_counts", *_LAZY,
]


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'jaxlab.data' has no attribute {name!r}")
