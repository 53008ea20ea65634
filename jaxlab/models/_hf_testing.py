"""Tiny random Hugging Face checkpoints for tests and benchmarks (needs torch + transformers).

Nothing is downloaded: models are random-initialized with transformers on CPU in
fp32 with eager attention, and the tokenizer is a small byte-level BPE trained
here on a fixed corpus.
"""

from __future__ import annotations

import os

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=256,
            initializer_range=0.2)

# name -> (model_type, config overrides)
VARIANTS = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_mha_mlp_bias": ("llama", dict(num_key_value_heads=4, mlp_bias=True)),
    "llama_rope_llama3": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=32))),
    "llama_rope_yarn": ("llama", dict(max_position_embeddings=128, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32))),
    "llama_rope_linear": ("llama", dict(rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=32)),
}

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today? fine, thanks.",
    "jax and flax make small language models easy to test",
    "tokens stream out one at a time: naïve café über 東京",
]


def hf_classes(model_type: str):
  import transformers as tf
  return {
      "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
      "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
      "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
  }[model_type]


def make_hf_model(variant: str = "llama", *, seed: int = 0, perturb: float = 0.1, **overrides):
  """A random fp32 transformers CausalLM (eval mode, eager attention). Norm scales and
  biases get noise of size `perturb` so that they are not trivially 1 / 0."""
  import torch

  model_type, extra = VARIANTS[variant]
  cfg_cls, model_cls = hf_classes(model_type)
  kw = dict(TINY, **extra)
  kw.update(overrides)
  kw.setdefault("bos_token_id", 0)
  kw.setdefault("eos_token_id", 0)
  kw.setdefault("pad_token_id", 0)
  cfg = cfg_cls(**kw)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = model_cls(cfg).to(torch.float32).eval()
  if perturb:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
      for n, p in model.named_parameters():
        if "norm" in n or n.endswith(".bias"):
          p.add_(perturb * torch.randn(p.shape, generator=g))
  return model


def make_tokenizer(vocab_size: int = 300, chat_template: str | None = CHAT_TEMPLATE):
  """A byte-level BPE PreTrainedTokenizerFast trained on a fixed tiny corpus;
  id 0 is <|endoftext|> (eos and pad)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(_CORPUS * 4, trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")
  if chat_template is not None:
    fast.chat_template = chat_template
  return fast


def save_tiny_checkpoint(path: str, variant: str = "llama", *, with_tokenizer: bool = True,
                         seed: int = 0, max_shard_size=None, **overrides):
  """Write a tiny random checkpoint (and tokenizer) to `path`; returns the torch model."""
  model = make_hf_model(variant, seed=seed, **overrides)
  os.makedirs(path, exist_ok=True)
  kw = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
  model.save_pretrained(path, **kw)
  if with_tokenizer:
    make_tokenizer().save_pretrained(path)
  return model
