"""jaxlab.models.hf: logits and greedy decoding match transformers (PyTorch CPU, fp32)
for tiny random Llama / Qwen2 / Qwen3 checkpoints; save round-trips through transformers."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from jaxlab.models import _hf_testing as T  # noqa: E402
from jaxlab.models import hf  # noqa: E402
from jaxlab.models.generate import generate, left_pad  # noqa: E402

# fp32 end to end; the brief's bound (observed max |diff| is ~3e-7 with |logits| < 2).
ATOL = 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  made = {}

  def get(variant, **kw):
    key = (variant, tuple(sorted(kw.items())))
    if key not in made:
      d = str(tmp_path_factory.mktemp(variant))
      made[key] = (d, T.save_tiny_checkpoint(d, variant, with_tokenizer=False, **kw))
    return made[key]

  return get


def _tokens(B=2, L=64, vocab=T.TINY["vocab_size"], seed=0):
  return np.random.RandomState(seed).randint(0, vocab, (B, L))


def _hf_logits(model, toks, mask=None):
  with torch.no_grad():
    kw = {} if mask is None else dict(attention_mask=torch.tensor(mask, dtype=torch.long))
    return model(torch.tensor(toks, dtype=torch.long), **kw).logits.numpy()


@pytest.mark.parametrize("variant", list(T.VARIANTS))
def test_logits_match_transformers(ckpt, variant):
  path, ref_model = ckpt(variant)
  model = hf.load(path)
  cfg = model.cfg
  assert cfg.param_dtype == "float32"
  mt, extra = T.VARIANTS[variant]
  assert cfg.qk_norm == (mt == "qwen3") and cfg.attn_bias == (mt == "qwen2")
  assert cfg.tie_embeddings == bool(extra.get("tie_word_embeddings", False))
  assert (cfg.rope_scaling.kind if cfg.rope_scaling else "default") == \
      extra.get("rope_parameters", {}).get("rope_type", "default")
  toks = _tokens()  # past original_max_position_embeddings=32 of the scaled variants
  ref = _hf_logits(ref_model, toks)
  out = np.asarray(model(jnp.asarray(toks, jnp.int32)))
  assert out.shape == ref.shape and out.dtype == np.float32
  err = np.abs(out - ref).max()
  assert err <= ATOL, f"{variant}: max |logits diff| {err:.3e}"


def test_rope_scaling_is_what_makes_it_match(ckpt, tmp_path):
  """Control: the same weights with the scaling removed from config.json differ far beyond
  ATOL, so the parity above really checks the llama3 / yarn frequency rules."""
  for variant in ("llama_rope_llama3", "llama_rope_yarn"):
    path, ref_model = ckpt(variant)
    d = tmp_path / variant
    d.mkdir()
    cfg = json.load(open(os.path.join(path, "config.json")))
    theta = cfg["rope_parameters"]["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    json.dump(cfg, open(d / "config.json", "w"))
    os.symlink(os.path.join(path, "model.safetensors"), d / "model.safetensors")
    toks = _tokens()
    out = np.asarray(hf.load(str(d))(jnp.asarray(toks, jnp.int32)))
    assert np.abs(out - _hf_logits(ref_model, toks)).max() > 100 * ATOL, variant


@pytest.mark.parametrize("variant", ["llama_rope_llama3", "qwen2", "qwen3"])
def test_greedy_decoding_matches_transformers(ckpt, variant):
  from transformers import GenerationConfig

  path, ref_model = ckpt(variant)
  model = hf.load(path)
  toks, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15]])
  gc = GenerationConfig(do_sample=False, max_new_tokens=32, eos_token_id=None, pad_token_id=0,
                        bos_token_id=None)
  with torch.no_grad():
    out = ref_model.generate(torch.tensor(toks, dtype=torch.long),
                             attention_mask=torch.tensor(mask, dtype=torch.long),
                             generation_config=gc)
  ref = out[:, toks.shape[1]:].numpy()
  assert ref.shape == (2, 32)
  got = np.asarray(generate(model, toks, mask, max_new_tokens=32)["tokens"])
  np.testing.assert_array_equal(got, ref)
  assert len(set(ref[0].tolist())) > 4  # not a degenerate repeat of one token


@pytest.mark.parametrize("variant", ["llama_rope_yarn", "qwen2", "qwen3"])
def test_save_round_trip_through_transformers(ckpt, tmp_path, variant):
  from transformers import AutoModelForCausalLM

  path, ref_model = ckpt(variant)
  model = hf.load(path)
  out_dir = tmp_path / "saved"
  hf.save(model, str(out_dir))
  back = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32,
                                              attn_implementation="eager").eval()
  assert type(back) is type(ref_model)
  toks = _tokens(seed=1)
  ref = _hf_logits(ref_model, toks)
  # Exact tensors, so transformers on the saved dir reproduces the original model.
  for (n, p), (n2, p2) in zip(ref_model.state_dict().items(), back.state_dict().items()):
    assert n == n2
    np.testing.assert_array_equal(p.numpy(), p2.numpy(), err_msg=n)
  np.testing.assert_array_equal(_hf_logits(back, toks), ref)
  # And jaxlab reloads its own output.
  again = np.asarray(hf.load(str(out_dir))(jnp.asarray(toks, jnp.int32)))
  assert np.abs(again - ref).max() <= ATOL


def test_old_style_config_keys(ckpt, tmp_path):
  """transformers 4 layout: top-level rope_theta + rope_scaling {type: ...}, torch_dtype."""
  path, ref_model = ckpt("llama_rope_llama3")
  cfg = json.load(open(os.path.join(path, "config.json")))
  rp = cfg.pop("rope_parameters")
  cfg["rope_theta"] = rp.pop("rope_theta")
  cfg["rope_scaling"] = dict(rp, type=rp.pop("rope_type"))
  cfg["torch_dtype"] = cfg.pop("dtype", "float32")
  json.dump(cfg, open(tmp_path / "config.json", "w"))
  os.symlink(os.path.join(path, "model.safetensors"), tmp_path / "model.safetensors")
  toks = _tokens()
  out = np.asarray(hf.load(str(tmp_path))(jnp.asarray(toks, jnp.int32)))
  assert np.abs(out - _hf_logits(ref_model, toks)).max() <= ATOL


def test_sharded_checkpoint(ckpt):
  path, ref_model = ckpt("llama", max_shard_size="60KB")
  index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
  assert len(set(index["weight_map"].values())) >= 3
  assert not os.path.exists(os.path.join(path, "model.safetensors"))
  toks = _tokens()
  out = np.asarray(hf.load(path)(jnp.asarray(toks, jnp.int32)))
  assert np.abs(out - _hf_logits(ref_model, toks)).max() <= ATOL


def test_dtype_argument(ckpt):
  from flax import nnx

  path, _ = ckpt("qwen2")
  model = hf.load(path, dtype="bfloat16")
  assert model.cfg.param_dtype == "bfloat16"
  assert model.embed.embedding[...].dtype == jnp.bfloat16
  # Every parameter is the fp32 checkpoint value rounded to bf16 (cast while reading).
  f32 = hf.load(path)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.bfloat16)),
               nnx.state(model), nnx.state(f32))
  with pytest.raises(ValueError, match="dtype"):
    hf.load(path, dtype="int8")
