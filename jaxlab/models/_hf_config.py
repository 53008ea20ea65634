"""Hugging Face config.json <-> ModelConfig for the Llama, Qwen2 and Qwen3 families.

Both the transformers 5 key names (`rope_parameters` holding `rope_type` and
`rope_theta`, `dtype`) and the older ones (`rope_scaling` with `type` or
`rope_type`, top-level `rope_theta`, `torch_dtype`) are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from jaxlab.config import ConfigError
from jaxlab.models.config import ModelConfig, RopeScaling


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be read as a supported model; the message names
  the file, tensor or config key at fault."""


# model_type -> the CausalLM class name transformers uses for it.
FAMILIES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_ARCH_TO_TYPE = {v: k for k, v in FAMILIES.items()}
_DTYPES = ("float32", "bfloat16", "float16")


def read_config_json(path: str) -> dict[str, Any]:
  """The parsed config.json of checkpoint directory `path`."""
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory (expected a Hugging Face checkpoint dir)")
  f = os.path.join(path, "config.json")
  if not os.path.isfile(f):
    raise CheckpointError(f"{f}: missing (expected a Hugging Face config.json)")
  try:
    with open(f) as fh:
      d = json.load(fh)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{f}: not valid JSON ({e})") from None
  if not isinstance(d, dict):
    raise CheckpointError(f"{f}: expected a JSON object")
  return d


def model_type_of(hf: Mapping[str, Any], where: str = "config.json") -> str:
  """The family name (llama, qwen2, qwen3), or CheckpointError("unsupported architecture: ...")."""
  archs = hf.get("architectures") or []
  mt = hf.get("model_type")
  name = archs[0] if archs else (mt or "<none>")
  if mt in FAMILIES and (not archs or archs[0] == FAMILIES[mt]):
    return mt
  if mt is None and archs and archs[0] in _ARCH_TO_TYPE:
    return _ARCH_TO_TYPE[archs[0]]
  raise CheckpointError(
      f"{where}: unsupported architecture: {name} (model_type={mt!r}; supported: "
      f"{', '.join(FAMILIES.values())})")


def _get(hf, key, typ, where, default=dataclasses.MISSING):
  if key not in hf or hf[key] is None:
    if default is dataclasses.MISSING:
      raise CheckpointError(f"{where}: missing key {key!r}")
    return default
  v = hf[key]
  if typ is float and isinstance(v, int) and not isinstance(v, bool):
    return float(v)
  if not isinstance(v, typ) or (typ in (int, float) and isinstance(v, bool)):
    raise CheckpointError(f"{where}: key {key!r} should be {typ.__name__}, got {v!r}")
  return v


def rope_from_hf(hf: Mapping[str, Any], where: str = "config.json"):
  """(rope_theta, RopeScaling | None) from either key style."""
  rp = hf.get("rope_parameters")
  if rp is not None and not isinstance(rp, Mapping):
    raise CheckpointError(f"{where}: key 'rope_parameters' should be an object, got {rp!r}")
  rp = dict(rp or {})
  if rp and all(isinstance(v, Mapping) for v in rp.values()):
    # Nested per layer type (full_attention / sliding_attention): fine only if all agree.
    vals = list(rp.values())
    if any(v != vals[0] for v in vals[1:]):
      raise CheckpointError(f"{where}: per-layer-type rope_parameters differ; not supported")
    rp = dict(vals[0])
  old = hf.get("rope_scaling")
  if old is not None and not isinstance(old, Mapping):
    raise CheckpointError(f"{where}: key 'rope_scaling' should be an object, got {old!r}")
  theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
  if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
    raise CheckpointError(f"{where}: rope_theta should be a positive number, got {theta!r}")
  kind = rp.get("rope_type", rp.get("type", "default"))
  sc = rp
  if kind == "default" and old:
    sc = dict(old)
    kind = sc.get("rope_type", sc.get("type", "default"))
  prf = sc.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if prf not in (None, 1, 1.0):
    raise CheckpointError(f"{where}: partial_rotary_factor={prf} is not supported")
  if kind == "default":
    return float(theta), None
  max_pos = hf.get("max_position_embeddings", 2048)
  orig = sc.get("original_max_position_embeddings", hf.get("original_max_position_embeddings",
                                                            max_pos))
  try:
    if kind == "linear":
      return float(theta), RopeScaling(kind="linear", factor=float(sc["factor"]))
    if kind == "llama3":
      return float(theta), RopeScaling(
          kind="llama3", factor=float(sc["factor"]),
          low_freq_factor=float(sc.get("low_freq_factor", 1.0)),
          high_freq_factor=float(sc.get("high_freq_factor", 4.0)),
          original_max_position=int(orig))
    if kind == "yarn":
      factor = sc.get("factor")
      if factor is None:
        factor = max_pos / orig
      opt = lambda k: None if sc.get(k) is None else float(sc[k])  # noqa: E731
      return float(theta), RopeScaling(
          kind="yarn", factor=float(factor), original_max_position=int(orig),
          beta_fast=float(sc.get("beta_fast") or 32.0), beta_slow=float(sc.get("beta_slow") or 1.0),
          mscale=opt("mscale"), mscale_all_dim=opt("mscale_all_dim"),
          attention_factor=opt("attention_factor"), truncate=bool(sc.get("truncate", True)))
  except KeyError as e:
    raise CheckpointError(f"{where}: RoPE scaling {kind!r} needs key {e.args[0]!r}") from None
  except (ConfigError, TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: bad RoPE scaling {kind!r}: {e}") from None
  raise CheckpointError(f"{where}: unsupported RoPE type {kind!r} (supported: default, linear, "
                        "llama3, yarn)")


def dtype_from_hf(hf: Mapping[str, Any]) -> str | None:
  """The checkpoint's declared dtype if it is one jaxlab supports, else None."""
  d = hf.get("dtype", hf.get("torch_dtype"))
  if isinstance(d, str):
    d = d.removeprefix("torch.")
    return d if d in _DTYPES else None
  return None


def config_from_hf(hf: Mapping[str, Any], *, param_dtype: str = "float32",
                   where: str = "config.json") -> ModelConfig:
  """ModelConfig of a Llama / Qwen2 / Qwen3 HF config dict."""
  mt = model_type_of(hf, where)
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise CheckpointError(f"{where}: hidden_act={act!r} is not supported (only 'silu')")
  layer_types = hf.get("layer_types") or []
  if hf.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
    raise CheckpointError(f"{where}: sliding-window attention layers are not supported")
  if mt == "qwen2":
    attn_bias = True  # Qwen2 always has q/k/v biases and none on o_proj.
  else:
    if hf.get("attention_bias"):
      raise CheckpointError(f"{where}: attention_bias=true (a bias on o_proj too) is not supported "
                            f"for {mt}")
    attn_bias = False
  if mt != "llama" and hf.get("mlp_bias"):
    raise CheckpointError(f"{where}: mlp_bias=true is not supported for {mt}")
  d = _get(hf, "hidden_size", int, where)
  n_heads = _get(hf, "num_attention_heads", int, where)
  theta, scaling = rope_from_hf(hf, where)
  kw = dict(
      vocab_size=_get(hf, "vocab_size", int, where),
      d_model=d,
      n_layers=_get(hf, "num_hidden_layers", int, where),
      n_heads=n_heads,
      n_kv_heads=_get(hf, "num_key_value_heads", int, where, n_heads),
      head_dim=_get(hf, "head_dim", int, where, None),
      ffn_dim=_get(hf, "intermediate_size", int, where),
      norm_eps=_get(hf, "rms_norm_eps", float, where, 1e-6),
      rope_theta=theta,
      rope_scaling=scaling,
      max_seq_len=_get(hf, "max_position_embeddings", int, where, 2048),
      tie_embeddings=_get(hf, "tie_word_embeddings", bool, where, False),
      attn_bias=attn_bias,
      qk_norm=(mt == "qwen3"),
      mlp_bias=bool(hf.get("mlp_bias", False)),
      init_std=_get(hf, "initializer_range", float, where, 0.02),
      mixer="attention",
      param_dtype=param_dtype,
  )
  if kw["head_dim"] is None and d % n_heads:
    raise CheckpointError(f"{where}: hidden_size={d} not divisible by "
                          f"num_attention_heads={n_heads}")
  try:
    return ModelConfig(**kw)
  except ConfigError as e:
    raise CheckpointError(f"{where}: {e}") from None


def family_of(cfg: ModelConfig) -> str:
  """Which HF family a ModelConfig can be written as."""
  mixers = {cfg.layer_mixer(i) for i in range(cfg.n_layers)}
  if mixers != {"attention"}:
    raise CheckpointError(f"cannot save mixers {sorted(mixers)} as a Hugging Face model "
                          "(only 'attention')")
  if cfg.qk_norm and cfg.attn_bias:
    raise CheckpointError("cannot save qk_norm together with attn_bias as a Hugging Face model")
  if cfg.qk_norm:
    return "qwen3"
  if cfg.attn_bias:
    return "qwen2"
  return "llama"


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """transformers 5 `rope_parameters`."""
  rp: dict[str, Any] = {"rope_theta": cfg.rope_theta}
  s = cfg.rope_scaling
  if s is None:
    rp["rope_type"] = "default"
  elif s.kind == "linear":
    rp.update(rope_type="linear", factor=s.factor)
  elif s.kind == "llama3":
    rp.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
              high_freq_factor=s.high_freq_factor,
              original_max_position_embeddings=s.original_max_position)
  else:
    rp.update(rope_type="yarn", factor=s.factor,
              original_max_position_embeddings=s.original_max_position, beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
    for k in ("mscale", "mscale_all_dim", "attention_factor"):
      if getattr(s, k) is not None:
        rp[k] = getattr(s, k)
  return rp


def config_to_hf(cfg: ModelConfig, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """HF config dict for `cfg`; keys of `base` (the source config.json) that do not
  describe shapes (token ids, etc.) are kept."""
  fam = family_of(cfg)
  out = dict(base or {})
  for k in ("rope_scaling", "rope_theta", "torch_dtype", "partial_rotary_factor"):
    out.pop(k, None)
  out.update(
      architectures=[FAMILIES[fam]],
      model_type=fam,
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model,
      intermediate_size=cfg.hidden_dim,
      num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.kv_heads,
      head_dim=cfg.dim_per_head,
      hidden_act="silu",
      rms_norm_eps=cfg.norm_eps,
      max_position_embeddings=cfg.max_seq_len,
      tie_word_embeddings=cfg.tie_embeddings,
      initializer_range=cfg.init_std,
      rope_parameters=rope_to_hf(cfg),
      dtype=cfg.param_dtype,
  )
  if fam == "llama":
    out.update(attention_bias=False, mlp_bias=cfg.mlp_bias)
  else:
    if cfg.mlp_bias:
      raise CheckpointError(f"cannot save mlp_bias=True as {FAMILIES[fam]}")
    if fam == "qwen3":
      out["attention_bias"] = False
    out.setdefault("use_sliding_window", False)
    out["layer_types"] = ["full_attention"] * cfg.n_layers
  return out
