"""The same train step on 1 device, 8 simulated devices, and 2 processes (jax.distributed)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxlab import sharding as shd
from jaxlab.config import ConfigError

WORKER = Path(__file__).parent / "workers" / "train_losses.py"


def _run(args, ndev, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={ndev}")
  out = subprocess.run([sys.executable, str(WORKER), *args], env=env, capture_output=True,
                       text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("LOSSES ")][-1]
  return json.loads(line[len("LOSSES "):])


def test_logical_rules_map_to_mesh_axes():
  import jax
  mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  assert shd.logical_to_spec(("embed", "mlp")) == shd.P("fsdp", "tensor")
  assert shd.logical_to_spec(("batch", None)) == shd.P(("data", "fsdp"), None)
  # size-1 mesh axes shard nothing
  assert shd.logical_to_spec(("embed", "mlp"), (4, 8), mesh) == shd.P(None, None)


def test_mesh_config_errors():
  with pytest.raises(ConfigError, match="MeshConfig.tensor"):
    shd.MeshConfig(tensor=0)
  with pytest.raises(ConfigError, match="devices"):
    shd.MeshConfig(data=3, fsdp=1, tensor=1).shape(8)


@pytest.mark.slow
def test_eight_devices_match_one_device():
  one = _run(["1,1,1", "--ndev", "1"], ndev=8)
  eight = _run(["2,2,2"], ndev=8)
  assert eight["devices"] == 8
  # fp32; different reduction orders across shards: relative 1e-5 on O(1) losses.
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5, atol=1e-6)
  assert one["losses"][-1] < one["losses"][0]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process():
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen([sys.executable, str(WORKER), "4,1,1", "--distributed", str(port),
                             str(i), "2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      so, se = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, se[-3000:]
    line = [l for l in so.splitlines() if l.startswith("LOSSES ")][-1]
    outs.append(json.loads(line[len("LOSSES "):]))
  single = _run(["4,1,1"], ndev=4)
  for o in outs:
    assert o["devices"] == 4
    np.testing.assert_allclose(o["losses"], single["losses"], rtol=1e-5, atol=1e-6)
