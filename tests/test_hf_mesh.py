"""hf.load onto a 4-device CPU mesh (own process): every parameter arrives with the sharding
jaxlab.sharding gives its logical axes, each device reads only its block of a sharded
tensor, values equal the unsharded load, and logits still match transformers."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from jaxlab.models import _hf_testing as T  # noqa: E402

_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax, jax.numpy as jnp
    from flax import nnx
    from jaxlab import sharding
    from jaxlab.models import hf
    from jaxlab.models._hf_io import hf_name

    path, ref_file = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 4, jax.devices()
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=2))

    reads = {}  # tensor name -> list of (elements read, full elements)
    real = hf.read_slice
    def spy(files, name, index, transposed):
      out = real(files, name, index, transposed)
      full = int(np.prod(files.shape(name)))
      reads.setdefault(name, []).append((out.size, full))
      return out
    hf.read_slice = spy
    model = hf.load(path, mesh=mesh)
    hf.read_slice = real
    plain = hf.load(path)

    n_sharded = 0
    flat_m = dict(nnx.to_flat_state(nnx.state(model)))
    flat_p = dict(nnx.to_flat_state(nnx.state(plain)))
    for p, var in flat_m.items():
      arr = var.get_value()
      axes = var.get_metadata().get("logical_axes")
      want = sharding.logical_to_sharding(axes, mesh, arr.shape)
      assert arr.sharding.is_equivalent_to(want, arr.ndim), (p, arr.sharding, want)
      np.testing.assert_array_equal(np.asarray(arr), np.asarray(flat_p[p].get_value()))
      name, _ = hf_name(p)
      if not arr.sharding.is_fully_replicated:
        n_sharded += 1
        # Each device holds 1/k of the tensor and read only that block.
        shard = arr.addressable_shards[0].data
        assert shard.size < arr.size, p
        assert max(r for r, _ in reads[name]) == shard.size < reads[name][0][1], (p, reads[name])
    assert n_sharded >= 10, n_sharded
    q = model.layers[0].mixer.q_proj.kernel[...]
    assert q.sharding.spec == jax.P("fsdp", "tensor"), q.sharding.spec

    toks = np.random.RandomState(0).randint(0, 320, (2, 40))
    ref = np.load(ref_file)
    logits = jax.jit(lambda m, t: m(t))(model, jnp.asarray(toks, jnp.int32))
    err = float(np.abs(np.asarray(logits) - ref).max())
    assert err <= 1e-4, err
    print("OK", n_sharded, err)
""")


@pytest.mark.slow
def test_load_onto_mesh_subprocess(tmp_path):
  path = str(tmp_path / "ckpt")
  ref_model = T.save_tiny_checkpoint(path, "qwen2", with_tokenizer=False,
                                     tie_word_embeddings=False)
  toks = np.random.RandomState(0).randint(0, 320, (2, 40))
  with torch.no_grad():
    ref = ref_model(torch.tensor(toks)).logits.numpy()
  np.save(tmp_path / "ref.npy", ref)
  script = tmp_path / "mesh_check.py"
  script.write_text(_SCRIPT)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, str(script), path, str(tmp_path / "ref.npy")], env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
  assert "OK" in r.stdout
