"""GRPO: group-relative policy optimization with one jitted, sharded update step.

Reusable beyond RLCR: the learner only sees token sequences, a completion loss
mask and one advantage per sequence (rewards are the caller's business).

Per step (official RLCR recipe, papers.md section 4.2):
  * advantages  A_i = r_i - mean_group(r)            (std scaling optional, off)
  * ratio       rho_t = pi(y_t) / pi_old(y_t)         (= 1 on-policy: old = detached current)
  * token loss  l_t = -min(rho_t A, clip(rho_t, 1-eps, 1+eps) A) + beta * k3_t
  * k3_t        = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (Schulman's k3 KL estimator)
  * loss        = sum over active completion tokens of l_t / (number of active tokens)
Log-probabilities are those of the sampling temperature (logits / T), as in TRL.

The update step is a pure function of (state, frozen params, batch), compiled
once by `jax.jit` with explicit in/out shardings and the train state donated.
Trainable parameters are an nnx filter of the model (`nnx.Param` = full fine-
tuning, `jaxlab.models.lora.LoRAParam` = LoRA); everything else is "frozen" and
passed to the step without donation. `micro_batches > 1` accumulates gradients
with a `lax.scan` (the token count used for averaging is the whole batch's).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlab import sharding as shd
from jaxlab.config import require
from train.trainer import TrainConfig, _cast_floats, lr_schedule, make_optimizer, to_host

__all__ = ["GRPOConfig", "GRPOState", "GRPOLearner", "group_advantages", "k3_kl",
           "grpo_token_loss", "grpo_loss", "grpo_loss_reference", "policy_logprobs"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
  """Algorithm and optimizer settings of a GRPO run (defaults: the official RLCR recipe,
  except the learning rate, which suits tiny models)."""
  steps: int = 200                 # rollout batches (optimizer steps = steps * iterations)
  learning_rate: float = 1e-3
  warmup_steps: int = 0
  schedule: str = "constant"       # constant | linear | cosine
  min_lr_ratio: float = 0.0        # end of linear / cosine decay, as a fraction of the lr
  weight_decay: float = 0.0
  grad_clip: float = 1.0           # global-norm clipping; 0 disables
  b1: float = 0.9
  b2: float = 0.99
  clip_eps: float = 0.2            # PPO clip range
  kl_beta: float = 0.0             # weight of the k3 KL to the reference model
  scale_std: bool = False          # divide advantages by the group std (+ std_eps)
  std_eps: float = 1e-4
  iterations: int = 1              # updates per rollout batch; 1 = fully on-policy
  temperature: float = 1.0         # logprobs of logits / T (set to the sampling temperature)
  micro_batches: int = 1           # gradient accumulation inside the step
  compute_dtype: str = "float32"   # float32 | bfloat16 (fp32 master weights either way)
  log_kl: bool = True              # compute the KL to the reference for logging even if beta = 0
  mesh: shd.MeshConfig = shd.MeshConfig()

  def __post_init__(self):
    c = "GRPOConfig"
    for f in ("steps", "iterations", "micro_batches"):
      v = getattr(self, f)
      require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, c, f,
              f"must be a positive integer, got {v!r}")
    require(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, c, "warmup_steps",
            f"must be >= 0, got {self.warmup_steps!r}")
    require(self.learning_rate > 0, c, "learning_rate", f"must be > 0, got {self.learning_rate}")
    require(self.schedule in ("constant", "linear", "cosine"), c, "schedule",
            f"unknown schedule {self.schedule!r} (constant, linear, cosine)")
    require(0 <= self.min_lr_ratio <= 1, c, "min_lr_ratio", "must be in [0, 1]")
    require(self.weight_decay >= 0, c, "weight_decay", "must be >= 0")
    require(self.grad_clip >= 0, c, "grad_clip", "must be >= 0 (0 disables)")
    require(0 < self.clip_eps < 1, c, "clip_eps", f"must be in (0, 1), got {self.clip_eps}")
    require(self.kl_beta >= 0, c, "kl_beta", f"must be >= 0, got {self.kl_beta}")
    require(self.std_eps > 0, c, "std_eps", f"must be > 0, got {self.std_eps}")
    require(self.temperature > 0, c, "temperature", f"must be > 0, got {self.temperature}")
    require(self.compute_dtype in ("float32", "bfloat16"), c, "compute_dtype",
            f"unknown dtype {self.compute_dtype!r} (float32, bfloat16)")

  def train_config(self) -> TrainConfig:
    """The optimizer fields as a `train.trainer.TrainConfig` (one step per update)."""
    return TrainConfig(
        steps=self.steps * self.iterations, learning_rate=self.learning_rate,
        warmup_steps=self.warmup_steps, schedule=self.schedule, min_lr_ratio=self.min_lr_ratio,
        weight_decay=self.weight_decay, grad_clip=self.grad_clip, b1=self.b1, b2=self.b2)

  def optimizer(self) -> optax.GradientTransformation:
    """AdamW with the same factory as `train.trainer` (decay on matrices, clipping)."""
    return make_optimizer(self.train_config())


class GRPOState(NamedTuple):
  step: jax.Array      # int32 [], completed optimizer updates
  params: Any          # pure dict of the trainable parameters (fp32)
  opt_state: Any


# ----------------------------------------------------------------------------- math

def group_advantages(reward_N, group_size: int, *, scale_std: bool = False,
                     eps: float = 1e-4) -> jax.Array:
  """r - mean of its group (rows i*G..i*G+G-1); with scale_std, divided by the group's
  unbiased std + eps (as TRL). float32 [N]."""
  r = jnp.asarray(reward_N, jnp.float32)
  if r.ndim != 1:
    raise ValueError(f"reward_N: expected 1-D, got shape {r.shape}")
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
  if r.shape[0] % group_size:
    raise ValueError(f"group_size: {group_size} does not divide len(reward_N) = {r.shape[0]}")
  if scale_std and group_size < 2:
    raise ValueError("group_size: std scaling needs groups of at least 2")
  r_GS = r.reshape(-1, group_size)
  a = r_GS - r_GS.mean(axis=1, keepdims=True)
  if scale_std:
    a = a / (jnp.std(r_GS, axis=1, ddof=1, keepdims=True) + eps)
  return a.reshape(-1)


def k3_kl(logp, ref_logp):
  """Per-token k3 estimate of KL(pi || ref) from samples of pi: e^d - d - 1, d = ref - logp."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def grpo_token_loss(logp_NT, old_logp_NT, adv_N, *, clip_eps: float, ref_logp_NT=None,
                    kl_beta: float = 0.0):
  """Per-token loss and its parts: (loss, pg, kl, clipped) all [N, T].

  `clipped` marks tokens where the clipped branch is the active (smaller) one, i.e.
  the gradient of that token is zero.
  """
  ratio = jnp.exp(logp_NT - old_logp_NT)
  a = adv_N[:, None]
  unclipped = ratio * a
  clipped_obj = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a
  pg = -jnp.minimum(unclipped, clipped_obj)
  is_clipped = clipped_obj < unclipped
  if ref_logp_NT is None:
    kl = jnp.zeros_like(pg)
  else:
    kl = k3_kl(logp_NT, ref_logp_NT)
  loss = pg + kl_beta * kl if kl_beta else pg
  return loss, pg, kl, is_clipped


def grpo_loss(logp_NT, old_logp_NT, adv_N, loss_mask_NT, *, clip_eps: float = 0.2,
              ref_logp_NT=None, kl_beta: float = 0.0, n_tokens=None):
  """Token-level average of `grpo_token_loss` over active tokens: (loss, metrics).

  n_tokens: the denominator (default: the mask's sum); pass the full batch's count
  when this is one micro-batch. metrics hold *sums over this batch divided by
  n_tokens* (pg, kl, clip_frac), so micro-batch values add up.
  """
  m = loss_mask_NT.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0) if n_tokens is None else n_tokens
  loss_t, pg, kl, clipped = grpo_token_loss(logp_NT, old_logp_NT, adv_N, clip_eps=clip_eps,
                                            ref_logp_NT=ref_logp_NT, kl_beta=kl_beta)
  loss = (loss_t * m).sum() / n
  metrics = dict(pg_loss=(pg * m).sum() / n, kl=(kl * m).sum() / n,
                 clip_frac=(clipped * m).sum() / n)
  return loss, metrics


def grpo_loss_reference(logp_NT, old_logp_NT, adv_N, loss_mask_NT, *, clip_eps: float = 0.2,
                        ref_logp_NT=None, kl_beta: float = 0.0) -> float:
  """Plain float64 loops over sequences and tokens (the readable reference for tests)."""
  logp, old = np.asarray(logp_NT, np.float64), np.asarray(old_logp_NT, np.float64)
  ref = None if ref_logp_NT is None else np.asarray(ref_logp_NT, np.float64)
  mask, adv = np.asarray(loss_mask_NT), np.asarray(adv_N, np.float64)
  total, count = 0.0, 0
  for i in range(logp.shape[0]):
    for t in range(logp.shape[1]):
      if not mask[i, t]:
        continue
      ratio = np.exp(logp[i, t] - old[i, t])
      obj = min(ratio * adv[i], float(np.clip(ratio, 1 - clip_eps, 1 + clip_eps)) * adv[i])
      term = -obj
      if ref is not None and kl_beta:
        d = ref[i, t] - logp[i, t]
        term += kl_beta * (np.exp(d) - d - 1.0)
      total += term
      count += 1
  return total / max(count, 1)


def policy_logprobs(model: nnx.Module, tokens_NS, attn_mask_NS, temperature: float = 1.0):
  """log pi(tokens[:, t+1] | tokens[:, :t+1]) at temperature T, and the per-position
  entropy of that distribution; both [N, S-1]. Padding is masked out of attention and
  positions count real tokens only (as in decoding with the cache)."""
  logits = model(tokens_NS[:, :-1], mask_BT=attn_mask_NS[:, :-1])
  logp_all = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  lp = jnp.take_along_axis(logp_all, tokens_NS[:, 1:, None], axis=-1)[..., 0]
  ent = -(jnp.exp(logp_all) * logp_all).sum(-1)
  return lp, ent


# ----------------------------------------------------------------------------- learner

def _path_shardings(abs_opt_state, param_shardings, rep):
  """Optimizer leaves whose tree path ends with a parameter's path share its sharding."""
  by_path = {tuple(p): s for p, s in
             jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
  lengths = sorted({len(p) for p in by_path}, reverse=True)

  def pick(path, leaf):
    if getattr(leaf, "ndim", 0) == 0:
      return rep
    path = tuple(path)
    for n in lengths:
      if n <= len(path) and path[-n:] in by_path:
        return by_path[path[-n:]]
    return rep

  return jax.tree_util.tree_map_with_path(pick, abs_opt_state)


class GRPOLearner:
  """Compiled GRPO update for one model: `update(state, batch) -> (state, metrics)`.

  model: a concrete nnx model holding the starting weights (they are copied; the
  reference model for the KL is these starting weights).
  trainable: nnx filter of the trained variables (nnx.Param or LoRAParam).

  Batch (host arrays, N rows split over the mesh's batch axes):
    tokens int32 [N, S], attn_mask bool [N, S], loss_mask f32 [N, S-1],
    advantages f32 [N], and optionally old_logp / ref_logp f32 [N, S-1].
  `train_on_rollout` builds this from a `rollout.Rollout` and rewards.
  """

  def __init__(self, model: nnx.Module, cfg: GRPOConfig, *, trainable=nnx.Param,
               mesh: jax.sharding.Mesh | None = None,
               tx: optax.GradientTransformation | None = None):
    self.cfg = cfg
    self.mesh = shd.make_mesh(cfg.mesh) if mesh is None else mesh
    self.graphdef, params_st, frozen_st = nnx.split(model, trainable, ...)
    if not jax.tree.leaves(params_st):
      raise ValueError("trainable: the filter selects no variables of the model")
    self.param_shardings = nnx.to_pure_dict(shd.state_shardings(params_st, self.mesh))
    self.frozen_shardings = nnx.to_pure_dict(shd.state_shardings(frozen_st, self.mesh))
    self.frozen = jax.device_put(nnx.to_pure_dict(frozen_st), self.frozen_shardings)
    # fp32 master copy of the trainable weights (the step casts to compute_dtype).
    self.initial_params = jax.device_put(_cast_floats(nnx.to_pure_dict(params_st), jnp.float32),
                                         self.param_shardings)
    self.tx = cfg.optimizer() if tx is None else tx
    self.lr = lr_schedule(cfg.train_config())
    self.rep = shd.replicated(self.mesh)
    self.batch_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    abs_opt = jax.eval_shape(self.tx.init, self.initial_params)
    self.state_shardings = GRPOState(
        self.rep, self.param_shardings, _path_shardings(abs_opt, self.param_shardings, self.rep))
    abs_state = GRPOState(jax.ShapeDtypeStruct((), jnp.int32),
                          jax.eval_shape(lambda p: p, self.initial_params), abs_opt)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state,
        self.state_shardings)
    self._init = jax.jit(lambda p: GRPOState(jnp.zeros((), jnp.int32), p, self.tx.init(p)),
                         out_shardings=self.state_shardings)
    self.compute_dtype = jnp.dtype(cfg.compute_dtype)
    self.n_traces = 0          # times the update step was traced (compile-once check)
    self._update = None
    self._logprobs = None
    self._batch_keys = None

  # -- state ---------------------------------------------------------------------------

  def init_state(self, params=None) -> GRPOState:
    """Fresh optimizer state at step 0 around a copy of `params` (default: the model's)."""
    p = self.initial_params if params is None else params
    p = jax.tree.map(lambda x: jnp.array(x, copy=True), p)  # the step donates the state
    return self._init(p)

  @property
  def ref_params(self):
    return self.initial_params

  def sampling_states(self, params) -> tuple:
    """States for `rollout.Sampler` (nnx.merge(graphdef, params, frozen))."""
    return (params, self.frozen)

  def model(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params, self.frozen)

  # -- compiled functions --------------------------------------------------------------

  def _merge(self, params, frozen):
    return nnx.merge(self.graphdef, _cast_floats(params, self.compute_dtype),
                     _cast_floats(frozen, self.compute_dtype))

  def _batch_shardings(self, batch):
    return {k: shd.batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}

  def _compile(self, batch):
    cfg = self.cfg
    keys = tuple(sorted(batch))
    self._batch_keys = keys
    bs = self._batch_shardings(batch)
    M = cfg.micro_batches

    def mb_loss(params, frozen, mb, n_tokens):
      model = self._merge(params, frozen)
      logp, ent = policy_logprobs(model, mb["tokens"], mb["attn_mask"], cfg.temperature)
      old = mb["old_logp"] if "old_logp" in mb else jax.lax.stop_gradient(logp)
      ref = mb.get("ref_logp")
      loss, m = grpo_loss(logp, old, mb["advantages"], mb["loss_mask"], clip_eps=cfg.clip_eps,
                          ref_logp_NT=ref, kl_beta=cfg.kl_beta, n_tokens=n_tokens)
      m["entropy"] = (jax.lax.stop_gradient(ent) * mb["loss_mask"]).sum() / n_tokens
      return loss, m

    grad_fn = jax.value_and_grad(mb_loss, has_aux=True)

    def step(state: GRPOState, frozen, batch):
      self.n_traces += 1
      n_tokens = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
      if M == 1:
        (loss, metrics), grads = grad_fn(state.params, frozen, batch, n_tokens)
      else:
        mbs = jax.tree.map(lambda x: x.reshape(M, x.shape[0] // M, *x.shape[1:]), batch)

        def body(carry, mb):
          (l, g, m) = carry
          (li, mi), gi = grad_fn(state.params, frozen, mb, n_tokens)
          return (l + li, jax.tree.map(jnp.add, g, gi), jax.tree.map(jnp.add, m, mi)), None

        zeros_g = jax.tree.map(jnp.zeros_like, state.params)
        zeros_m = dict(pg_loss=0.0, kl=0.0, clip_frac=0.0, entropy=0.0)
        zeros_m = jax.tree.map(lambda v: jnp.zeros((), jnp.float32), zeros_m)
        (loss, grads, metrics), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros_g,
                                                        zeros_m), mbs)
      updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                     n_tokens=n_tokens, lr=self.lr(state.step))
      return GRPOState(state.step + 1, params, opt_state), metrics

    self._update = jax.jit(step, in_shardings=(self.state_shardings, self.frozen_shardings, bs),
                           out_shardings=(self.state_shardings, self.rep), donate_argnums=(0,))

    def logprobs(params, frozen, tokens, attn_mask):
      return policy_logprobs(self._merge(params, frozen), tokens, attn_mask, cfg.temperature)[0]

    self._logprobs = jax.jit(
        logprobs, in_shardings=(self.param_shardings, self.frozen_shardings, bs["tokens"],
                                bs["attn_mask"]),
        out_shardings=shd.batch_sharding(self.mesh, 2))

  def _check_batch(self, batch):
    n = batch["tokens"].shape[0]
    if n % (self.batch_shards * self.cfg.micro_batches):
      raise ValueError(f"batch: {n} rows do not split over {self.batch_shards} batch shards x "
                       f"{self.cfg.micro_batches} micro-batches")

  def device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    bs = self._batch_shardings(batch)
    return {k: shd.global_array(np.asarray(v), bs[k]) for k, v in batch.items()}

  def update(self, state: GRPOState, batch: dict[str, np.ndarray]):
    """One optimizer step (compiled on first call; `state` is donated)."""
    self._check_batch(batch)
    if self._update is None:
      self._compile(batch)
    elif tuple(sorted(batch)) != self._batch_keys:
      raise ValueError(f"batch: keys {sorted(batch)} differ from the first batch's "
                       f"{list(self._batch_keys)}")
    return self._update(state, self.frozen, self.device_batch(batch))

  def token_logprobs(self, params, tokens_NS, attn_mask_NS) -> np.ndarray:
    """Policy log-probs [N, S-1] of tokens[:, 1:] under `params` (no gradient)."""
    batch = dict(tokens=np.asarray(tokens_NS, np.int32), attn_mask=np.asarray(attn_mask_NS, bool))
    self._check_batch(batch)
    if self._logprobs is None:
      raise RuntimeError("token_logprobs: call after the first update is compiled "
                         "(use train_on_rollout)")
    dev = self.device_batch(batch)
    return to_host(self._logprobs(params, self.frozen, dev["tokens"], dev["attn_mask"]))

  # -- one GRPO iteration --------------------------------------------------------------

  def make_batch(self, rollout, reward_N, *, mask_truncated: bool = False) -> dict:
    """Host batch from a `rollout.Rollout` and its rewards (advantages per group)."""
    batch = rollout.training_batch(mask_truncated=mask_truncated)
    adv = group_advantages(np.asarray(reward_N), rollout.group_size,
                           scale_std=self.cfg.scale_std, eps=self.cfg.std_eps)
    batch["advantages"] = np.asarray(adv, np.float32)
    return batch

  def needs_ref(self) -> bool:
    return self.cfg.kl_beta > 0 or self.cfg.log_kl

  def train_on_rollout(self, state: GRPOState, rollout, reward_N, *,
                       mask_truncated: bool = False) -> tuple[GRPOState, dict[str, float]]:
    """`iterations` updates on one rollout batch; returns (state, host metrics of the last)."""
    batch = self.make_batch(rollout, reward_N, mask_truncated=mask_truncated)
    if self._update is None:
      # Compile with the final key set (old/ref logprobs are filled in below).
      if self.needs_ref():
        batch["ref_logp"] = np.zeros(batch["loss_mask"].shape, np.float32)
      if self.cfg.iterations > 1:
        batch["old_logp"] = np.zeros(batch["loss_mask"].shape, np.float32)
      self._check_batch(batch)
      self._compile(batch)
    if self.needs_ref():
      batch["ref_logp"] = self.token_logprobs(self.ref_params, batch["tokens"],
                                              batch["attn_mask"])
    if self.cfg.iterations > 1:
      batch["old_logp"] = self.token_logprobs(state.params, batch["tokens"], batch["attn_mask"])
    metrics = None
    for _ in range(self.cfg.iterations):
      state, metrics = self.update(state, batch)
    host = {k: float(to_host(v)) for k, v in metrics.items()}
    if not self.needs_ref():
      host.pop("kl", None)
    return state, host
