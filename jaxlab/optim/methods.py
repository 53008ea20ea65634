"""The training setups compared by `jaxlab bench optim` and `python -m jaxlab.optim.experiment`.

  adamw        Adam(W) on every parameter (full-rank reference).
  galore       GaLore-AdamW: SVD projector of each Linear kernel's gradient (shorter side),
               refreshed every `update_every` steps, moments kept.
  random       the same with a Gaussian projector regenerated from a seed (no stored P).
  random-reset "random" with the inner (Adam) state reset at every refresh.
  lora         one-sided LoRA (W = W0 + s P A, P Gaussian, only A trained) on every Linear
               kernel, merged and re-drawn every `update_every` steps with the optimizer
               state kept: the adapter dual of "random" (same keys, so the same run up to
               rounding).
  lora-fixed   one-sided LoRA that is never merged (a single fixed random subspace).

Embeddings and norm scales are trained by Adam in full in every setup, as GaLore does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlab.models.lowrank import apply_adapters, merge_and_reinit
from jaxlab.optim.projected import galore, projected

METHODS = ("adamw", "galore", "random", "random-reset", "lora", "lora-fixed")


def linear_kernels(name: str, leaf) -> bool:
  """The filter of every setup: the [in, out] kernels of Linear layers (not embeddings)."""
  return name.endswith("/kernel") and len(leaf.shape) == 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodConfig:
  """One training setup. rank is ignored by adamw."""
  method: str = "adamw"
  rank: int = 16
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  total_steps: int = 500
  update_every: int = 50
  scale: float = 1.0
  weight_decay: float = 0.0
  seed: int = 0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"MethodConfig.method: unknown method {self.method!r} "
                       f"(known: {', '.join(METHODS)})")


class Setup(NamedTuple):
  """Everything a training loop needs: pure params/rest split, optimizer, and the merge hook."""
  graphdef: Any
  params: Any                # what the optimizer updates (nnx.Param)
  rest: Any                  # everything else (frozen W0, bases, keys, counters)
  tx: optax.GradientTransformation
  opt_state: Any
  merge: Callable | None     # (params, rest) -> (params, rest), every update_every steps


def schedule(cfg: MethodConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, max(1, cfg.warmup_steps), max(cfg.total_steps, cfg.warmup_steps + 1),
      end_value=0.1 * cfg.learning_rate)


def build(model: nnx.Module, cfg: MethodConfig) -> Setup:
  """Turn a freshly built model into the setup `cfg.method` (adds adapters in place for lora)."""
  lr = schedule(cfg)
  common = dict(rank=cfg.rank, update_every=cfg.update_every, scale=cfg.scale,
                filter=linear_kernels)
  merge = None
  if cfg.method == "adamw":
    tx = optax.adamw(lr, weight_decay=cfg.weight_decay)
  elif cfg.method == "galore":
    tx = galore(lr, weight_decay=cfg.weight_decay, **common)
  elif cfg.method in ("random", "random-reset"):
    reset = "reset" if cfg.method == "random-reset" else "keep"
    tx = optax.chain(
        projected(optax.scale_by_adam(), projector="random", seed=cfg.seed, refresh_state=reset,
                  **common),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_learning_rate(lr))
  else:  # lora, lora-fixed
    apply_adapters(model, rank=cfg.rank, kind="random", seed=cfg.seed, scale=cfg.scale,
                   filter=linear_kernels)
    tx = optax.adamw(lr, weight_decay=cfg.weight_decay)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if cfg.method == "lora":
    merge = jax.jit(lambda params, rest: _merge(graphdef, params, rest))
  return Setup(graphdef, params, rest, tx, tx.init(params), merge)


def _merge(graphdef, params, rest):
  model = nnx.merge(graphdef, params, rest)
  merge_and_reinit(model)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return params, rest


def lm_loss(graphdef, params, rest, batch) -> jax.Array:
  """Mean next-token cross-entropy over batch["loss_mask"]."""
  model = nnx.merge(graphdef, params, rest)
  logits = model(batch["inputs"])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  mask = batch["loss_mask"].astype(ce.dtype)
  return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_train_step(setup: Setup):
  """A jitted (params, opt_state, rest, batch, lr_mult=1.0) -> (params, opt_state, loss);
  params and optimizer state are donated.

  Every setup ends in scale_by_learning_rate (weight decay, if any, comes before it), so
  its update is linear in the learning rate: `lr_mult` (traced, so a sweep compiles once)
  multiplies the update, i.e. it runs the setup with learning_rate * lr_mult.
  """
  graphdef, tx = setup.graphdef, setup.tx

  def step(params, opt_state, rest, batch, lr_mult=1.0):
    loss, grads = jax.value_and_grad(lm_loss, argnums=1)(graphdef, params, rest, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: (lr_mult * u).astype(u.dtype), updates)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def make_eval(setup: Setup):
  graphdef = setup.graphdef
  return jax.jit(lambda params, rest, batch: lm_loss(graphdef, params, rest, batch))
