"""A pure, jitted LM train step and the loop around it (eval, metrics, checkpoints).

The step is compiled once with explicit in/out shardings and donation; host work
(metrics, evals, checkpoints) stays outside it. Batches are a pure function of
(seed, split, step), so a resumed run replays exactly the batches it missed and
ends bit-for-bit where an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlab import sharding as shd
from jaxlab.config import require
from jaxlab.models.config import ModelConfig
from jaxlab.models.transformer import LM


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Optimization and bookkeeping settings (AdamW with warmup + decay, clipping)."""
  steps: int = 1000
  batch_size: int = 32
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  schedule: str = "cosine"          # constant | linear | cosine
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.98
  compute_dtype: str = "float32"    # float32 | bfloat16 (fp32 master weights either way)
  eval_every: int = 100
  eval_batches: int = 4
  eval_batch_size: int = 64
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  log_every: int = 10
  seed: int = 0
  mesh: shd.MeshConfig = shd.MeshConfig()

  def __post_init__(self):
    c = "TrainConfig"
    for f in ("steps", "batch_size", "eval_batches", "eval_batch_size", "log_every",
              "keep_checkpoints"):
      v = getattr(self, f)
      require(isinstance(v, int) and v > 0, c, f, f"must be a positive integer, got {v!r}")
    for f in ("warmup_steps", "eval_every", "checkpoint_every"):
      v = getattr(self, f)
      require(isinstance(v, int) and v >= 0, c, f, f"must be >= 0, got {v!r}")
    require(self.learning_rate > 0, c, "learning_rate", f"must be > 0, got {self.learning_rate}")
    require(self.schedule in ("constant", "linear", "cosine"), c, "schedule",
            f"unknown schedule {self.schedule!r} (constant, linear, cosine)")
    require(0 <= self.min_lr_ratio <= 1, c, "min_lr_ratio", f"must be in [0, 1]")
    require(self.weight_decay >= 0, c, "weight_decay", "must be >= 0")
    require(self.grad_clip >= 0, c, "grad_clip", "must be >= 0 (0 disables)")
    require(self.compute_dtype in ("float32", "bfloat16"), c, "compute_dtype",
            f"unknown dtype {self.compute_dtype!r} (float32, bfloat16)")


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  warm = min(cfg.warmup_steps, cfg.steps)
  decay_steps = max(1, cfg.steps - warm)
  end = cfg.learning_rate * cfg.min_lr_ratio
  if cfg.schedule == "constant":
    main = optax.constant_schedule(cfg.learning_rate)
  elif cfg.schedule == "linear":
    main = optax.linear_schedule(cfg.learning_rate, end, decay_steps)
  else:
    main = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.min_lr_ratio)
  if warm == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warm), main], [warm])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """AdamW (decay on matrices only) with global-norm clipping."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


class TrainState(NamedTuple):
  step: jax.Array      # int32 [], completed steps
  params: Any          # pure dict of fp32 master weights
  opt_state: Any


def masked_xent(logits_BTV, targets_BT, mask_BT):
  """Mean cross-entropy and accuracy over positions where mask > 0."""
  logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
  mask = mask_BT.astype(jnp.float32)
  denom = jnp.maximum(mask.sum(), 1.0)
  acc = ((jnp.argmax(logits_BTV, -1) == targets_BT) * mask).sum() / denom
  return (nll * mask).sum() / denom, acc


def _cast_floats(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


class Trainer:
  """Owns the compiled init / train / eval functions for one (model, train) config."""

  def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, *,
               tx: optax.GradientTransformation | None = None, mesh=None,
               model_factory: Callable[[nnx.Rngs], nnx.Module] | None = None):
    self.model_cfg, self.cfg = model_cfg, cfg
    self.mesh = shd.make_mesh(cfg.mesh) if mesh is None else mesh
    factory = model_factory or (lambda rngs: LM(model_cfg, rngs=rngs))
    self._factory = factory
    abstract = nnx.eval_shape(lambda: factory(nnx.Rngs(cfg.seed)))
    self.graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(abs_rest):
      raise ValueError("Trainer expects a model whose only state is nnx.Param")
    self.param_shardings = nnx.to_pure_dict(shd.state_shardings(abs_params, self.mesh))
    self.tx = tx if tx is not None else make_optimizer(cfg)
    self.compute_dtype = jnp.dtype(cfg.compute_dtype)
    rep = shd.replicated(self.mesh)

    def init_fn():
      model = factory(nnx.Rngs(cfg.seed))
      params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

    abs_state = jax.eval_shape(init_fn)
    opt_shardings = self._opt_shardings(abs_state.opt_state, rep)
    self.state_shardings = TrainState(rep, self.param_shardings, opt_shardings)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state,
        self.state_shardings)
    self._init = jax.jit(init_fn, out_shardings=self.state_shardings)

    graphdef = self.graphdef

    def loss_fn(params, batch):
      p = _cast_floats(params, self.compute_dtype)
      model = nnx.merge(graphdef, p)
      logits = model(batch["inputs"])
      return masked_xent(logits, batch["targets"], batch["loss_mask"])

    def train_step(state: TrainState, batch):
      (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
      updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics = dict(loss=loss, accuracy=acc, grad_norm=optax.tree.norm(grads),
                     lr=self.lr(state.step))
      return TrainState(state.step + 1, params, opt_state), metrics

    def eval_step(params, batch):
      p = _cast_floats(params, self.compute_dtype)
      logits = nnx.merge(graphdef, p)(batch["inputs"])
      loss, acc = masked_xent(logits, batch["targets"], batch["loss_mask"])
      return loss, jnp.argmax(logits, -1).astype(jnp.int32)

    self._batch_shardings = None
    self._train_step_fn, self._eval_step_fn = train_step, eval_step
    self._train_step = None
    self._eval_step = None
    self.lr = lr_schedule(cfg)

  def _opt_shardings(self, abs_opt_state, rep):
    """Optimizer leaves shaped like a parameter share its sharding; others replicate."""
    by_shape = {}
    flat_p = jax.tree.leaves(self.param_shardings)
    abs_p = nnx.to_pure_dict(
        nnx.split(nnx.eval_shape(lambda: self._factory(nnx.Rngs(0))), nnx.Param, ...)[1])
    for a, s in zip(jax.tree.leaves(abs_p), flat_p):
      by_shape.setdefault(a.shape, s)
    return jax.tree.map(lambda a: by_shape.get(a.shape, rep) if a.ndim else rep, abs_opt_state)

  # -- compiled functions ------------------------------------------------------------------

  def _compile(self, batch):
    bs = {k: shd.batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}
    self._batch_shardings = bs
    rep = shd.replicated(self.mesh)
    self._train_step = jax.jit(
        self._train_step_fn, in_shardings=(self.state_shardings, bs),
        out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
    self._eval_step = jax.jit(self._eval_step_fn, in_shardings=(self.param_shardings, bs),
                              out_shardings=(rep, shd.batch_sharding(self.mesh, 2)))

  def device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    if self._batch_shardings is None:
      self._compile(batch)
    return {k: shd.global_array(np.asarray(v), self._batch_shardings[k]) for k, v in batch.items()}

  def init_state(self) -> TrainState:
    return self._init()

  def train_step(self, state: TrainState, batch: dict[str, np.ndarray]):
    dev = self.device_batch(batch)
    return self._train_step(state, dev)

  def eval_batch(self, params, batch: dict[str, np.ndarray]):
    dev = self.device_batch(batch)
    loss, preds = self._eval_step(params, dev)
    return float(to_host(loss)), to_host(preds)

  def model(self, params) -> nnx.Module:
    """A live NNX model holding `params` (for decoding / inspection)."""
    return nnx.merge(self.graphdef, params)


def to_host(x) -> np.ndarray:
  """Host copy of a (possibly multi-process) array: replicated or gathered."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
