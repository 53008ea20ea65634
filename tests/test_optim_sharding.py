"""`projected` on an 8-device CPU mesh (in a subprocess: the device count is fixed at start).

Parameters are sharded along one matrix axis; the low-rank state keeps the surviving
axis's sharding, a jitted step (shardings not pinned) returns the state with the
shardings it was given, on Explicit and Auto meshes, and the result equals an
unsharded run to fp32 rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from jaxlab.optim import projected
    from jaxlab.testing import assert_rel_close, tol

    assert jax.device_count() == 8, jax.devices()

    def same_shardings(a, b):
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert (x.shape, x.dtype) == (y.shape, y.dtype)
        assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (x.shape, x.sharding, y.sharding)

    k = jax.random.split(jax.random.key(0), 3)
    host = {"w1": jax.random.normal(k[0], (16, 32)) / 4, "w2": jax.random.normal(k[1], (32, 16)) / 6,
            "b": jnp.zeros(16)}
    x_host = jax.random.normal(k[2], (8, 16))
    checked = 0
    for mode, axis_type in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto)):
      mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
      specs = {"w1": P(None, "model"), "w2": P("model", None), "b": P()}
      params = {n: jax.device_put(v, NamedSharding(mesh, specs[n])) for n, v in host.items()}
      x = jax.device_put(x_host, NamedSharding(mesh, P("data")))
      # (SVD + "both" gives a diagonal PᵀGQ whose off-diagonal is rounding noise; Adam would
      # blow that noise up to full-size steps, so that case runs with SGD.)
      configs = ([("svd", "auto", optax.adam(1e-2)), ("random", "both", optax.adam(1e-2))]
                 if mode == "explicit" else [("svd", "both", optax.sgd(0.1))])
      for projector, side, inner in configs:
        tx = projected(inner, rank=4, projector=projector, side=side, update_every=2)

        def loss(p, x, sharded):
          h = jnp.tanh(x @ p["w1"])
          if sharded and mode == "explicit":
            o = jnp.einsum("bh,hd->bd", h, p["w2"], out_sharding=P("data", None))
          else:
            o = h @ p["w2"]
          return jnp.mean((o + p["b"] - jnp.cos(x)) ** 2)

        def make_step(sharded):
          def step(p, s, x):
            u, s = tx.update(jax.grad(loss)(p, x, sharded), s, p)
            return optax.apply_updates(p, u), s
          return jax.jit(step)

        with jax.set_mesh(mesh):
          state0 = tx.init(params)
          if side != "both":  # left/right moments keep the matrix's surviving mesh axis
            assert state0.inner_state[0].mu["w1"].sharding.spec[1] == "model"
            assert state0.inner_state[0].mu["w2"].sharding.spec[0] == "model"
          step = make_step(True)
          p, s = params, state0
          for _ in range(3):
            p, s = step(p, s, x)
            same_shardings(s, state0)
            same_shardings(p, params)
          if mode == "explicit":  # the type carries the sharding: jit(init) agrees too
            same_shardings(jax.jit(tx.init)(params), state0)
        ref_step = make_step(False)
        p_ref, s_ref = host, tx.init(host)
        for _ in range(3):
          p_ref, s_ref = ref_step(p_ref, s_ref, x_host)
        assert_rel_close(jax.device_get(p), p_ref, rtol=tol(jnp.float32, 3 * 32), name=mode)
        checked += 1
    print("checked", checked)
''')


@pytest.mark.slow
def test_projected_on_eight_cpu_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
  assert "checked 3" in out.stdout
