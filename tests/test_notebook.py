"""The notebooks run top to bottom (quickstart; decode kernels)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def _run(name: str, tmp_path) -> str:
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
  assert "max |full - incremental|" in _run("quickstart.ipynb", tmp_path)


@pytest.mark.slow
def test_decode_kernels_notebook_executes(tmp_path):
  out = _run("decode_kernels.ipynb", tmp_path)
  assert "max |pallas - xla|" in out and "ValueError: " in out
  assert "int8 pallas == int8 xla: True" in out
  assert "two-kernel MLP, chained == generate(): True" in out
  assert "variant" in out and "xla-unrolled" in out   # the bench table
