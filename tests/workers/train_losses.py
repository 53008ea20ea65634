"""Worker for sharding tests: train a tiny LM a few steps and print the losses as JSON.

usage: python train_losses.py MESH(d,f,t) [--ndev N] [--distributed PORT PID NPROC]
"""

import argparse
import json
import os
import sys

p = argparse.ArgumentParser()
p.add_argument("mesh")
p.add_argument("--ndev", type=int, default=None, help="use only the first N devices")
p.add_argument("--distributed", nargs=3, type=int, metavar=("PORT", "PID", "NPROC"))
p.add_argument("--steps", type=int, default=6)
args = p.parse_args()

import jax  # noqa: E402

if args.distributed:
  port, pid, nproc = args.distributed
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                             process_id=pid)
jax.config.update("jax_default_matmul_precision", "highest")

from jaxlab import sharding as shd  # noqa: E402
from jaxlab.data import get_task  # noqa: E402
from jaxlab.models import ModelConfig  # noqa: E402
from train.trainer import TrainConfig, Trainer, to_host  # noqa: E402

d, f, t = (int(x) for x in args.mesh.split(","))
devices = jax.devices()[:args.ndev] if args.ndev else jax.devices()
mesh = shd.make_mesh(shd.MeshConfig(data=d, fsdp=f, tensor=t), devices=devices)
task = get_task("mqar", seed=0, num_kv_pairs=4, vocab_size=64, seq_len=32)
mcfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
tcfg = TrainConfig(steps=args.steps, batch_size=8, learning_rate=1e-2, warmup_steps=0,
                   checkpoint_every=0, eval_every=0)
tr = Trainer(mcfg, tcfg, mesh=mesh)
state = tr.init_state()
losses = []
for step in range(args.steps):
  state, m = tr.train_step(state, task.batch("train", step, 8))
  losses.append(float(to_host(m["loss"])))
print("LOSSES " + json.dumps(dict(losses=losses, process=jax.process_index(),
                                  devices=jax.device_count())), flush=True)
