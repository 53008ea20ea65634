"""ModelConfig: the decoder-only LM's shape and options (Llama / Qwen style)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flax.core import FrozenDict

from jaxlab.config import ConfigError, require


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """RoPE frequency scaling as in HF `rope_scaling` (kind: linear, llama3, yarn)."""
  kind: str = "linear"
  factor: float = 1.0
  # llama3
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192
  # yarn
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float | None = None
  mscale_all_dim: float | None = None
  attention_factor: float | None = None
  truncate: bool = True

  def __post_init__(self):
    require(self.kind in ("linear", "llama3", "yarn"), "RopeScaling", "kind",
            f"unknown RoPE scaling {self.kind!r} (known: linear, llama3, yarn)")
    require(self.factor > 0, "RopeScaling", "factor", f"must be > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Decoder-only LM. `mixer` names the token mixer of every layer unless
  `mixer_pattern` gives one per layer (cycled if shorter than n_layers);
  `mixer_options` holds mixer-specific settings (e.g. {"path_w_rank": 32})."""
  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int | None = None
  head_dim: int | None = None
  ffn_dim: int | None = None
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_seq_len: int = 2048
  tie_embeddings: bool = True
  attn_bias: bool = False          # Qwen2: bias on q/k/v projections
  qk_norm: bool = False            # Qwen3: RMSNorm on q and k per head
  mlp_bias: bool = False
  init_std: float = 0.02
  mixer: str = "attention"
  mixer_pattern: tuple[str, ...] | None = None
  mixer_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  param_dtype: str = "float32"

  def __post_init__(self):
    c = "ModelConfig"
    # Hashable, immutable options: the config is static metadata under jax.jit.
    object.__setattr__(self, "mixer_options", FrozenDict(self.mixer_options))
    if self.mixer_pattern is not None:
      object.__setattr__(self, "mixer_pattern", tuple(self.mixer_pattern))
    for f in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
      v = getattr(self, f)
      require(isinstance(v, int) and v > 0, c, f, f"must be a positive integer, got {v!r}")
    for f in ("n_kv_heads", "head_dim", "ffn_dim"):
      v = getattr(self, f)
      require(v is None or (isinstance(v, int) and v > 0), c, f,
              f"must be a positive integer, got {v!r}")
    if self.head_dim is None:
      require(self.d_model % self.n_heads == 0, c, "n_heads",
              f"{self.n_heads} heads do not divide d_model={self.d_model}")
    require(self.n_heads % self.kv_heads == 0, c, "n_kv_heads",
            f"{self.kv_heads} KV heads do not divide n_heads={self.n_heads}")
    require(self.norm_eps > 0, c, "norm_eps", f"must be > 0, got {self.norm_eps}")
    require(self.rope_theta > 0, c, "rope_theta", f"must be > 0, got {self.rope_theta}")
    require(self.init_std > 0, c, "init_std", f"must be > 0, got {self.init_std}")
    require(self.param_dtype in ("float32", "bfloat16", "float16"), c, "param_dtype",
            f"unknown dtype {self.param_dtype!r}")
    if self.mixer_pattern is not None:
      require(len(self.mixer_pattern) > 0, c, "mixer_pattern", "must not be empty")

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

  @property
  def hidden_dim(self) -> int:
    if self.ffn_dim is not None:
      return self.ffn_dim
    # Llama rule: 2/3 * 4d rounded up to a multiple of 32.
    h = int(8 * self.d_model / 3)
    return 32 * ((h + 31) // 32)

  def layer_mixer(self, i: int) -> str:
    if self.mixer_pattern is None:
      return self.mixer
    return self.mixer_pattern[i % len(self.mixer_pattern)]

  def option(self, key: str, default=None):
    return self.mixer_options.get(key, default)


def validate_mixers(cfg: ModelConfig):
  from jaxlab.models.mixers.base import get_mixer_factory
  for i in range(cfg.n_layers):
    try:
      get_mixer_factory(cfg.layer_mixer(i))
    except ValueError as e:
      field = "mixer" if cfg.mixer_pattern is None else "mixer_pattern"
      raise ConfigError(f"ModelConfig.{field}: {e}") from None
