"""`jaxlab bench optim`: optimizer-state bytes and step time of a small LM under AdamW,
GaLore (SVD), random projection and one-sided LoRA, for several ranks.

For an m x n kernel (m <= n) Adam keeps 2 m n floats; the projected optimizers keep
2 r n (+ m r for the stored SVD projector; "random" regenerates its projector and stores
none); LoRA's optimizer keeps 2 r n for A, and the model holds A (r n) and P (m r) on
top of W0. Rows report all of these, the compiled step's temporary bytes (where the
backend reports them; the adapter form never forms the m x n kernel gradient), the
median step time, the time of a step that refreshes the projector and of a LoRA merge.
Tokens are random: this measures cost, not learning.
"""

from __future__ import annotations

import statistics
import time

METHODS = ("adamw", "galore", "random", "lora")


def _model_config(d_model: int, n_layers: int, vocab_size: int, seq_len: int):
  from jaxlab.models import ModelConfig
  return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                     n_heads=max(1, d_model // 64), ffn_dim=2 * d_model, max_seq_len=seq_len)


def _setup(method: str, rank: int | None, cfg, *, steps: int, update_every: int):
  from flax import nnx

  from jaxlab.models import LM
  from jaxlab.optim.methods import MethodConfig, build

  model = LM(cfg, rngs=nnx.Rngs(0))
  mc = MethodConfig(method=method, rank=rank or 1, total_steps=steps + 2,
                    update_every=update_every)
  return build(model, mc)


def _bytes(method: str, rank: int | None, setup) -> dict:
  from flax import nnx

  from jaxlab.models.lowrank import Basis
  from jaxlab.optim.projected import state_bytes

  basis = nnx.state(nnx.merge(setup.graphdef, setup.params, setup.rest), Basis)
  return dict(method=method, rank=rank, opt_state_bytes=state_bytes(setup.opt_state),
              trainable_bytes=state_bytes(setup.params), basis_bytes=state_bytes(basis))


def _one(method: str, rank: int | None, cfg, *, steps: int, batch_size: int, seq_len: int,
         update_every: int) -> dict:
  import jax
  import numpy as np

  from jaxlab.optim.methods import make_train_step

  setup = _setup(method, rank, cfg, steps=steps, update_every=update_every)
  row = _bytes(method, rank, setup)
  step = make_train_step(setup)
  rng = np.random.default_rng(0)

  def batch():
    tok = rng.integers(0, cfg.vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    return dict(inputs=tok[:, :-1], targets=tok[:, 1:],
                loss_mask=np.ones((batch_size, seq_len), np.float32))

  b0 = batch()
  t0 = time.perf_counter()
  step = step.lower(setup.params, setup.opt_state, setup.rest, b0).compile()
  compile_s = time.perf_counter() - t0
  try:
    ma = step.memory_analysis()
    temp = int(ma.temp_size_in_bytes) if ma is not None else None
  except Exception:  # noqa: BLE001 - not every backend reports memory
    temp = None
  params, opt_state, rest = setup.params, setup.opt_state, setup.rest
  params, opt_state, loss = step(params, opt_state, rest, b0)  # count 0 -> 1
  jax.block_until_ready(loss)
  merge_ms = None
  if setup.merge is not None:  # compile the merge outside the timing
    params, rest = setup.merge(params, rest)
    jax.block_until_ready(params)
  times, refresh = [], []
  for i in range(1, steps + 1):  # the optimizer's count before this step is i
    if setup.merge is not None and i % update_every == 0:
      t0 = time.perf_counter()
      params, rest = setup.merge(params, rest)
      jax.block_until_ready(params)
      merge_ms = 1e3 * (time.perf_counter() - t0)
    b = batch()
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, rest, b)
    jax.block_until_ready(loss)
    (refresh if i % update_every == 0 else times).append(time.perf_counter() - t0)
  return dict(row, step_temp_bytes=temp, compile_s=compile_s,
              step_ms=1e3 * statistics.median(times) if times else None,
              refresh_step_ms=1e3 * refresh[0] if refresh else None, merge_ms=merge_ms)


def _check(ranks, steps, methods, d_model):
  if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r <= 0 for r in ranks):
    raise ValueError(f"ranks: expected positive integers, got {ranks!r}")
  if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
    raise ValueError(f"steps: expected a positive integer, got {steps!r}")
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f"methods: unknown method {unknown[0]!r} (known: {', '.join(METHODS)})")
  if max(ranks) > d_model:
    raise ValueError(f"ranks: rank {max(ranks)} exceeds d_model={d_model}")


def _rows(one, ranks, methods):
  rows = [one("adamw", None)] if "adamw" in methods else []
  rows += [one(m, r) for r in ranks for m in methods if m != "adamw"]
  if rows and rows[0]["method"] == "adamw":
    for row in rows:
      row["state_vs_adamw"] = row["opt_state_bytes"] / rows[0]["opt_state_bytes"]
  return rows


def memory(ranks=(8, 16, 32, 64), *, d_model: int = 256, n_layers: int = 2,
           vocab_size: int = 256, seq_len: int = 128, methods=METHODS) -> list[dict]:
  """The byte columns of `bench` only (nothing is compiled or run)."""
  _check(ranks, 1, methods, d_model)
  cfg = _model_config(d_model, n_layers, vocab_size, seq_len)
  return _rows(lambda m, r: _bytes(m, r, _setup(m, r, cfg, steps=1, update_every=200)),
               ranks, methods)


def bench(ranks=(8, 16, 32, 64), *, steps: int = 10, d_model: int = 256, n_layers: int = 2,
          batch_size: int = 8, seq_len: int = 128, vocab_size: int = 256,
          update_every: int | None = None, methods=METHODS) -> list[dict]:
  """One row per (method, rank) (AdamW once): bytes of optimizer state, of trained
  parameters and of frozen LoRA bases, compiled temporaries, compile time, median step ms
  of the steps without a projector refresh, the ms of one refresh step (GaLore's SVD) and
  of one LoRA merge. update_every defaults to `steps`, so the last timed step refreshes."""
  _check(ranks, steps, methods, d_model)
  update_every = steps if update_every is None else update_every
  if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every <= 0:
    raise ValueError(f"update_every: expected a positive integer, got {update_every!r}")
  cfg = _model_config(d_model, n_layers, vocab_size, seq_len)
  kw = dict(steps=steps, batch_size=batch_size, seq_len=seq_len, update_every=update_every)
  return _rows(lambda m, r: _one(m, r, cfg, **kw), ranks, methods)


def add_arguments(p):
  p.add_argument("--ranks", default="8,16,32,64", help="comma-separated ranks")
  p.add_argument("--steps", type=int, default=10, help="timed steps after the compiling one")
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--n-layers", type=int, default=2)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--update-every", type=int, default=None,
                 help="projector refresh / LoRA merge interval (default: --steps)")
  p.add_argument("--out", default=None, help="append JSON rows to this file")


def main(args) -> int:
  from jaxlab.bench.common import emit
  try:
    ranks = tuple(int(r) for r in args.ranks.split(","))
  except ValueError:
    raise SystemExit(f"--ranks: expected comma-separated integers, got {args.ranks!r}")
  rows = bench(ranks, steps=args.steps, d_model=args.d_model, n_layers=args.n_layers,
               batch_size=args.batch_size, seq_len=args.seq_len, update_every=args.update_every)
  emit(rows, args.out, title="bench optim")
  return 0
