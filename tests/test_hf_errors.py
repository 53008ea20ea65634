"""Bad checkpoints fail with one-line CheckpointErrors naming the tensor, file or key."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxlab import cli
from jaxlab.models import hf
from jaxlab.models.hf import CheckpointError


def _llama_config(**kw):
  d = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32,
           intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=48, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, dtype="float32")
  d.update(kw)
  return d


def _llama_tensors(cfg):
  """Random tensors with HF names and shapes for `cfg` (no torch needed)."""
  rs = np.random.RandomState(0)
  d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  hd = d // cfg["num_attention_heads"]
  kv = cfg["num_key_value_heads"] * hd
  t = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    t.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
              p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
              p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
              p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
              p + "mlp.down_proj.weight": (d, f)})
  return {k: (0.02 * rs.randn(*s)).astype(np.float32) for k, s in t.items()}


def _write(path, cfg, tensors):
  os.makedirs(path, exist_ok=True)
  json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  return str(path)


@pytest.fixture
def good(tmp_path):
  cfg = _llama_config()
  return _write(tmp_path / "good", cfg, _llama_tensors(cfg)), cfg


def _one_line(excinfo, *needles):
  msg = str(excinfo.value)
  assert "\n" not in msg, msg
  for n in needles:
    assert n in msg, (n, msg)


def test_good_checkpoint_loads(good):
  path, cfg = good
  model = hf.load(path)
  assert model.cfg.n_layers == 1 and model.cfg.kv_heads == 2 and not model.cfg.tie_embeddings
  t = load_file(os.path.join(path, "model.safetensors"))
  np.testing.assert_array_equal(np.asarray(model.layers[0].mixer.k_proj.kernel[...]),
                                t["model.layers.0.self_attn.k_proj.weight"].T)


def test_bf16_checkpoint_keeps_dtype_and_values(good, tmp_path):
  import ml_dtypes
  _, cfg = good
  t = {k: v.astype(ml_dtypes.bfloat16) for k, v in _llama_tensors(cfg).items()}
  path = _write(tmp_path / "bf16", dict(cfg, dtype="bfloat16"), t)
  model = hf.load(path)
  assert model.cfg.param_dtype == "bfloat16"
  k = model.layers[0].mixer.o_proj.kernel[...]
  assert k.dtype == np.dtype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(np.asarray(k), t["model.layers.0.self_attn.o_proj.weight"].T)
  assert hf.load(path, dtype="float32").embed.embedding[...].dtype == np.float32
  out = tmp_path / "saved"
  hf.save(model, str(out))
  back = load_file(str(out / "model.safetensors"))
  assert back["lm_head.weight"].dtype == np.dtype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(back["lm_head.weight"], t["lm_head.weight"])
  assert json.load(open(out / "config.json"))["dtype"] == "bfloat16"


def test_missing_tensor(good, tmp_path):
  _, cfg = good
  t = _llama_tensors(cfg)
  del t["model.layers.0.mlp.up_proj.weight"]
  path = _write(tmp_path / "bad", cfg, t)
  with pytest.raises(CheckpointError) as e:
    hf.load(path)
  _one_line(e, "missing tensor model.layers.0.mlp.up_proj.weight")


def test_wrong_shape(good, tmp_path):
  _, cfg = good
  t = _llama_tensors(cfg)
  t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)
  path = _write(tmp_path / "bad", cfg, t)
  with pytest.raises(CheckpointError) as e:
    hf.load(path)
  _one_line(e, "model.layers.0.self_attn.k_proj.weight", "[32, 32]", "[16, 32]",
            "model.safetensors")


def test_unexpected_tensor(good, tmp_path):
  _, cfg = good
  t = _llama_tensors(cfg)
  t["model.layers.0.self_attn.q_proj.bias"] = np.zeros((32,), np.float32)
  path = _write(tmp_path / "bad", cfg, t)
  with pytest.raises(CheckpointError) as e:
    hf.load(path)
  _one_line(e, "unexpected tensor model.layers.0.self_attn.q_proj.bias")


def test_non_float_tensor(good, tmp_path):
  _, cfg = good
  t = _llama_tensors(cfg)
  t["model.norm.weight"] = np.ones((32,), np.int32)
  path = _write(tmp_path / "bad", cfg, t)
  with pytest.raises(CheckpointError) as e:
    hf.load(path)
  _one_line(e, "model.norm.weight", "I32")


@pytest.mark.parametrize("arch,mt", [("Gemma2ForCausalLM", "gemma2"),
                                     ("Gemma3ForCausalLM", "gemma3_text"),
                                     ("MistralForCausalLM", "mistral")])
def test_unsupported_architecture(good, tmp_path, arch, mt):
  _, cfg = good
  path = _write(tmp_path / "bad", _llama_config(architectures=[arch], model_type=mt),
                _llama_tensors(cfg))
  with pytest.raises(CheckpointError) as e:
    hf.load(path)
  _one_line(e, f"unsupported architecture: {arch}", "config.json")


@pytest.mark.parametrize("kw,needle", [
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     "unsupported RoPE type 'dynamic'"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}), "needs key 'factor'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(layer_types=["sliding_attention"]), "sliding-window"),
    (dict(num_key_value_heads=3), "n_kv_heads"),
    (dict(hidden_size="32"), "'hidden_size' should be int"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
])
def test_bad_config_values(good, tmp_path, kw, needle):
  _, cfg = good
  path = _write(tmp_path / "bad", _llama_config(**kw), _llama_tensors(cfg))
  with pytest.raises(CheckpointError) as e:
    hf.load(path)
  _one_line(e, needle)


def test_missing_key_and_files(good, tmp_path):
  _, cfg = good
  bad = dict(cfg)
  del bad["num_hidden_layers"]
  path = _write(tmp_path / "nokey", bad, _llama_tensors(cfg))
  with pytest.raises(CheckpointError) as e:
    hf.load(path)
  _one_line(e, "missing key 'num_hidden_layers'")
  with pytest.raises(CheckpointError) as e:
    hf.load(str(tmp_path / "nowhere"))
  _one_line(e, "nowhere", "not a directory")
  os.makedirs(tmp_path / "noweights")
  json.dump(cfg, open(tmp_path / "noweights" / "config.json", "w"))
  with pytest.raises(CheckpointError) as e:
    hf.load(str(tmp_path / "noweights"))
  _one_line(e, "no model.safetensors")
  (tmp_path / "badjson").mkdir()
  (tmp_path / "badjson" / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError) as e:
    hf.load(str(tmp_path / "badjson"))
  _one_line(e, "config.json", "not valid JSON")


@pytest.mark.parametrize("keep", [100, -64])
def test_truncated_safetensors(good, tmp_path, keep):
  path, _ = good
  bad = tmp_path / "trunc"
  shutil.copytree(path, bad)
  f = bad / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[:keep] if keep > 0 else data[:len(data) + keep])
  with pytest.raises(CheckpointError) as e:
    hf.load(str(bad))
  _one_line(e, str(f))


def test_sharded_index_errors(good, tmp_path):
  path, cfg = good
  t = _llama_tensors(cfg)
  d = tmp_path / "sharded"
  d.mkdir()
  json.dump(cfg, open(d / "config.json", "w"))
  names = sorted(t)
  half = len(names) // 2
  save_file({k: t[k] for k in names[:half]}, str(d / "a.safetensors"))
  save_file({k: t[k] for k in names[half:]}, str(d / "b.safetensors"))
  wm = {k: ("a.safetensors" if i < half else "b.safetensors") for i, k in enumerate(names)}
  json.dump({"weight_map": wm}, open(d / "model.safetensors.index.json", "w"))
  assert hf.load(str(d)).cfg.n_layers == 1
  # An index pointing at a file that is gone; then one listing a tensor a file lacks.
  os.rename(d / "b.safetensors", d / "c.safetensors")
  with pytest.raises(CheckpointError) as e:
    hf.load(str(d))
  _one_line(e, "b.safetensors", "missing")
  os.rename(d / "c.safetensors", d / "b.safetensors")
  wm[names[0]] = "b.safetensors"
  json.dump({"weight_map": wm}, open(d / "model.safetensors.index.json", "w"))
  with pytest.raises(CheckpointError) as e:
    hf.load(str(d))
  _one_line(e, names[0], "b.safetensors")


def test_cli_reports_one_line(good, tmp_path, capsys):
  _, cfg = good
  path = _write(tmp_path / "bad", _llama_config(architectures=["Gemma2ForCausalLM"],
                                                model_type="gemma2"), _llama_tensors(cfg))
  rc = cli.main(["generate", "--model", path, "--prompt", "hi"])
  err = capsys.readouterr().err
  assert rc == 2
  assert err.count("\n") == 1 and err.startswith("jaxlab: error:")
  assert "unsupported architecture: Gemma2ForCausalLM" in err


def test_save_rejects_unsavable(tmp_path):
  from flax import nnx
  from jaxlab.models import LM, ModelConfig
  cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, mixer="nope")
  m = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
  with pytest.raises(CheckpointError, match="nope"):
    hf.save(m, str(tmp_path / "x"))
