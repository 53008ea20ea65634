"""LoRA files are PEFT's: PEFT loads jaxlab adapters onto the transformers model and gives
the same logits, and jaxlab loads adapters written by PEFT (subset of layers, rsLoRA)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from jaxlab.models import _hf_testing as T  # noqa: E402
from jaxlab.models import hf, lora  # noqa: E402

ATOL = 1e-4  # fp32 parity bound, as for the base models
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _tokens(seed=0):
  return np.random.RandomState(seed).randint(0, T.TINY["vocab_size"], (2, 24))


def _torch_logits(model, toks):
  with torch.no_grad():
    return model(torch.tensor(toks)).logits.numpy()


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_peft_loads_jaxlab_adapters(tmp_path):
  base_dir = str(tmp_path / "base")
  ref = T.save_tiny_checkpoint(base_dir, "qwen2", with_tokenizer=False)  # q/k/v bias, tied
  toks = _tokens()
  base_logits = _torch_logits(ref, toks)
  model = hf.load(base_dir)
  cfg = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=tuple(lora.TARGETS))
  lora.apply_lora(model, cfg, rngs=nnx.Rngs(3))
  for i, (_, m) in enumerate(lora.lora_modules(model)):
    m.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(i), m.lora_b[...].shape)
  ours = np.asarray(model(jnp.asarray(toks, jnp.int32)))
  assert np.abs(ours - base_logits).max() > 100 * ATOL  # the adapters matter
  ad_dir = str(tmp_path / "adapter")
  lora.save_adapters(model, ad_dir)
  meta = json.load(open(f"{ad_dir}/adapter_config.json"))
  assert meta["base_model_name_or_path"] == base_dir and meta["r"] == 4
  pm = peft.PeftModel.from_pretrained(ref, ad_dir).eval()
  err = np.abs(_torch_logits(pm, toks) - ours).max()
  assert err <= ATOL, err
  # Merged into the base weights and saved, transformers alone reproduces the adapted model.
  lora.remove_lora(model, merge_weights=True)
  merged_dir = str(tmp_path / "merged")
  hf.save(model, merged_dir)
  from transformers import AutoModelForCausalLM
  back = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32,
                                              attn_implementation="eager").eval()
  assert np.abs(_torch_logits(back, toks) - ours).max() <= ATOL


def test_jaxlab_loads_peft_adapters(tmp_path):
  base_dir = str(tmp_path / "base")
  T.save_tiny_checkpoint(base_dir, "llama", with_tokenizer=False)
  ref = T.make_hf_model("llama")  # same seed: same weights as saved
  pc = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"],
                       layers_to_transform=[1], use_rslora=True, init_lora_weights=False)
  pm = peft.get_peft_model(ref, pc).eval()
  ad_dir = str(tmp_path / "peft_adapter")
  pm.save_pretrained(ad_dir)
  cfg = lora.read_adapter_config(ad_dir)
  assert (cfg.rank, cfg.layers, cfg.use_rslora) == (2, (1,), True)
  assert set(cfg.targets) == {"q_proj", "v_proj", "down_proj"}
  model = lora.load_adapters(hf.load(base_dir), ad_dir)
  assert [p for p, _ in lora.lora_modules(model)] == [
      ("layers", 1, "mixer", "q_proj"), ("layers", 1, "mixer", "v_proj"),
      ("layers", 1, "mlp", "down_proj")]
  toks = _tokens(1)
  err = np.abs(np.asarray(model(jnp.asarray(toks, jnp.int32))) - _torch_logits(pm, toks)).max()
  assert err <= ATOL, err
