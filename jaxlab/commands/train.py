"""`jaxlab train ...`: training jobs (lm; rlcr when available)."""

from __future__ import annotations

import argparse
import importlib
import json


def _kv(items):
  out = {}
  for it in items or []:
    k, sep, v = it.partition("=")
    if not sep:
      raise argparse.ArgumentTypeError(f"expected key=value, got {it!r}")
    try:
      out[k] = json.loads(v)
    except json.JSONDecodeError:
      out[k] = v
  return out


def register(sub):
  p = sub.add_parser("train", help="training jobs")
  tsub = p.add_subparsers(dest="job", metavar="JOB")
  tsub.required = True

  lm = tsub.add_parser(
      "lm", help="train a small LM on a synthetic task or local corpus (resumable)",
      description="Train a small LM. With no flags: the embedded default (MQAR, 2-layer "
      "attention, a few CPU minutes). Running again on the same --run-dir resumes.")
  lm.add_argument("--task", default=None, help="mqar | flipflop | s5 | a5 | corpus (default mqar)")
  lm.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                  help="task option, repeatable (e.g. num_kv_pairs=8; corpus: data_files=PATH)")
  lm.add_argument("--mixer", default=None, help="token mixer of every layer (default attention)")
  lm.add_argument("--mixer-pattern", default=None,
                  help="comma-separated mixer per layer, cycled (overrides --mixer)")
  lm.add_argument("--mixer-option", action="append", default=[], metavar="KEY=VALUE",
                  help="mixer-specific option, repeatable")
  lm.add_argument("--d-model", type=int, default=None)
  lm.add_argument("--layers", type=int, default=None)
  lm.add_argument("--heads", type=int, default=None)
  lm.add_argument("--kv-heads", type=int, default=None)
  lm.add_argument("--steps", type=int, default=None)
  lm.add_argument("--batch-size", type=int, default=None)
  lm.add_argument("--lr", type=float, default=None)
  lm.add_argument("--seed", type=int, default=None)
  lm.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=None)
  lm.add_argument("--eval-every", type=int, default=None)
  lm.add_argument("--checkpoint-every", type=int, default=None,
                  help="checkpoint interval in steps (default 100)")
  lm.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                  help="device mesh, e.g. 2,2,2 (default: all devices on data)")
  lm.add_argument("--config", default=None, help="JSON file with task/model/train fields")
  lm.add_argument("--run-dir", default="runs/lm", help="output dir (resumes if it has a checkpoint)")
  lm.add_argument("--no-progress", action="store_true", help="no progress bar")
  lm.set_defaults(func=_train_lm)

  try:
    rlcr = importlib.import_module("train.rlcr.cli")
  except ModuleNotFoundError as e:
    if e.name not in ("train.rlcr.cli", "train.rlcr"):
      raise
  else:
    rlcr.register(tsub)


def _train_lm(args) -> int:
  from jaxlab.cli import UserError
  from jaxlab.data import parse_task_options
  from train.lm import DEFAULT_TASK, build_job, run_job

  task = args.task or DEFAULT_TASK
  model, train = {}, {}
  if args.mixer:
    model["mixer"] = args.mixer
  if args.mixer_pattern:
    model["mixer_pattern"] = [m.strip() for m in args.mixer_pattern.split(",") if m.strip()]
  if args.mixer_option:
    try:
      model["mixer_options"] = _kv(args.mixer_option)
    except argparse.ArgumentTypeError as e:
      raise UserError(f"--mixer-option: {e}") from None
  for flag, key in (("d_model", "d_model"), ("layers", "n_layers"), ("heads", "n_heads"),
                    ("kv_heads", "n_kv_heads")):
    if getattr(args, flag) is not None:
      model[key] = getattr(args, flag)
  for flag, key in (("steps", "steps"), ("batch_size", "batch_size"), ("lr", "learning_rate"),
                    ("seed", "seed"), ("compute_dtype", "compute_dtype"),
                    ("eval_every", "eval_every"), ("checkpoint_every", "checkpoint_every")):
    if getattr(args, flag) is not None:
      train[key] = getattr(args, flag)
  if args.mesh:
    try:
      d, f, t = (int(x) for x in args.mesh.split(","))
    except ValueError:
      raise UserError(f"--mesh: expected DATA,FSDP,TENSOR integers, got {args.mesh!r}") from None
    train["mesh"] = dict(data=d, fsdp=f, tensor=t)
  topts = parse_task_options(task, args.task_option)
  job = build_job(task=args.task, task_options=topts, model_overrides=model, train_overrides=train,
                  config_file=args.config)
  out = run_job(job, args.run_dir, progress=not args.no_progress)
  fin = out["final"]
  em = fin.get("test/exact_match")
  print(f"done: task={job.task} mixer={job.model.mixer} steps={fin['steps']} "
        f"loss={fin.get('loss', float('nan')):.4f}"
        + (f" test_exact_match={em:.3f}" if em is not None else "")
        + f" run_dir={args.run_dir}")
  print(f"metrics: {args.run_dir}/metrics.jsonl  curve: {args.run_dir}/learning_curve.png")
  return 0
