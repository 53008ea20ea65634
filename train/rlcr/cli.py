"""`jaxlab train rlcr`: flags -> RLCRJobConfig overrides -> run_job, then a summary table."""

from __future__ import annotations

import argparse
import math

DESCRIPTION = """\
SFT warm-up, then RLVR and RLCR (GRPO) from the same start, evaluated for accuracy and
calibration (ECE, Brier, AUROC, reliability diagrams). With no flags: the embedded default,
a synthetic QA task with irreducible per-question uncertainty and a tiny byte-level model
(a few CPU minutes). With --model PATH --data FILE.jsonl: a Hugging Face checkpoint on local
HotpotQA / math JSONL (no SFT stage). Running again on the same --run-dir resumes."""


def register(subparsers) -> None:
  p = subparsers.add_parser("rlcr", help="RLVR vs RLCR (calibration reward) with GRPO; resumable",
                            description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_argument_group("run")
  g.add_argument("--run-dir", default="runs/rlcr", help="output dir (resumes if it has checkpoints)")
  g.add_argument("--seed", type=int, default=None, help="seed of data, init, SFT and sampling")
  g.add_argument("--methods", default=None, help="comma-separated: rlvr,rlcr (default both)")
  g.add_argument("--config", default=None, help="JSON file with RLCRJobConfig fields")
  g.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                 help="device mesh, e.g. 4,1,2 (default: all devices on data)")
  g.add_argument("--no-progress", action="store_true", help="no progress bars")
  g = p.add_argument_group("GRPO")
  g.add_argument("--steps", type=int, default=None, help="GRPO steps per method")
  g.add_argument("--lr", type=float, default=None, help="GRPO learning rate")
  g.add_argument("--prompts-per-step", type=int, default=None)
  g.add_argument("--group-size", type=int, default=None, help="samples per prompt (G)")
  g.add_argument("--temperature", type=float, default=None, help="sampling temperature")
  g.add_argument("--top-p", type=float, default=None)
  g.add_argument("--max-new-tokens", type=int, default=None)
  g.add_argument("--kl-beta", type=float, default=None, help="weight of the k3 KL (default 0)")
  g.add_argument("--scale-std", action="store_true", help="divide advantages by the group std")
  g.add_argument("--iterations", type=int, default=None,
                 help="updates per rollout batch (default 1: on-policy)")
  g.add_argument("--micro-batches", type=int, default=None, help="gradient accumulation")
  g.add_argument("--rlvr-format", choices=("rlcr", "rlvr"), default=None,
                 help="RLVR completion format: rlcr tags (default) or official think/answer")
  g.add_argument("--eval-every", type=int, default=None)
  g.add_argument("--eval-size", type=int, default=None, help="eval prompts (0 = default)")
  g.add_argument("--checkpoint-every", type=int, default=None)
  g = p.add_argument_group("synthetic default")
  g.add_argument("--sft-steps", type=int, default=None, help="SFT warm-up steps")
  g.add_argument("--sft-confidence", choices=("overconfident", "random", "one", "oracle"),
                 default=None, help="confidences the SFT warm-up teaches (default overconfident)")
  g.add_argument("--d-model", type=int, default=None)
  g.add_argument("--layers", type=int, default=None)
  g = p.add_argument_group("real data")
  g.add_argument("--model", default=None, metavar="PATH", help="Hugging Face checkpoint dir")
  g.add_argument("--data", action="append", default=None, metavar="FILE",
                 help="JSONL training file (repeatable)")
  g.add_argument("--kind", choices=("hotpot", "math"), default=None)
  g.add_argument("--eval-data", action="append", default=None, metavar="FILE",
                 help="JSONL eval file (default: rows held out from --data)")
  g.add_argument("--system-prompt", default=None, help="rlcr | rlcr_long | rlvr")
  g.add_argument("--max-prompt-len", type=int, default=None)
  g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="parameter dtype of the loaded checkpoint")
  g.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=None)
  g.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank")
  g.add_argument("--lora-alpha", type=float, default=None)
  g.add_argument("--lora-targets", default=None, help="comma-separated, e.g. q_proj,v_proj")
  p.set_defaults(func=_run)


def args_to_overrides(args) -> dict:
  """The RLCRJobConfig override dict that the flags describe (only flags that were given)."""
  from jaxlab.cli import UserError
  ov: dict = {}
  grpo: dict = {}
  rollout: dict = {}
  if args.seed is not None:
    ov["seed"] = args.seed
  if args.methods:
    ov["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
  for flag, key in (("steps", "steps"), ("lr", "learning_rate"), ("kl_beta", "kl_beta"),
                    ("iterations", "iterations"), ("micro_batches", "micro_batches"),
                    ("compute_dtype", "compute_dtype")):
    if getattr(args, flag) is not None:
      grpo[key] = getattr(args, flag)
  if args.scale_std:
    grpo["scale_std"] = True
  for flag, key in (("group_size", "group_size"), ("temperature", "temperature"),
                    ("top_p", "top_p"), ("max_new_tokens", "max_new_tokens")):
    if getattr(args, flag) is not None:
      rollout[key] = getattr(args, flag)
  if args.temperature is not None:
    grpo["temperature"] = args.temperature if args.temperature > 0 else 1.0
  if args.mesh:
    try:
      d, f, t = (int(x) for x in args.mesh.split(","))
    except ValueError:
      raise UserError(f"--mesh: expected DATA,FSDP,TENSOR integers, got {args.mesh!r}") from None
    grpo["mesh"] = dict(data=d, fsdp=f, tensor=t)
    ov["sft"] = dict(mesh=dict(data=d, fsdp=f, tensor=t))
  for flag, key in (("prompts_per_step", "prompts_per_step"), ("rlvr_format", "rlvr_format"),
                    ("eval_every", "eval_every"), ("eval_size", "eval_size"),
                    ("checkpoint_every", "checkpoint_every"), ("kind", "kind"),
                    ("system_prompt", "system_prompt"), ("max_prompt_len", "max_prompt_len"),
                    ("dtype", "dtype")):
    if getattr(args, flag) is not None:
      ov[key] = getattr(args, flag)
  if args.model is not None:
    ov["model_path"] = args.model
  if args.data:
    ov["data"] = list(args.data)
  if args.eval_data:
    ov["eval_data"] = list(args.eval_data)
  if args.sft_steps is not None:
    ov.setdefault("sft", {})["steps"] = args.sft_steps
  if args.sft_confidence is not None:
    ov["task"] = {"sft_confidence": args.sft_confidence}
  model = {}
  if args.d_model is not None:
    model["d_model"] = args.d_model
  if args.layers is not None:
    model["n_layers"] = args.layers
  if model:
    ov["model"] = model
  if args.lora_rank is not None or args.lora_alpha is not None or args.lora_targets:
    lora: dict = {}
    if args.lora_rank is not None:
      lora["rank"] = args.lora_rank
    if args.lora_alpha is not None:
      lora["alpha"] = args.lora_alpha
    if args.lora_targets:
      lora["targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    ov["lora"] = lora
  if grpo:
    ov["grpo"] = grpo
  if rollout:
    ov["rollout"] = rollout
  return ov


def summary_lines(results: dict) -> list[str]:
  """The paper's claim checked on this run: RLCR ECE <= RLVR ECE / 2 at accuracy within 2 pts."""
  out = []
  if "rlvr" in results and "rlcr" in results:
    a, b = results["rlvr"], results["rlcr"]
    ratio = b["ece"] / a["ece"] if a["ece"] > 0 else math.inf
    dacc = b["accuracy"] - a["accuracy"]
    ok = ratio <= 0.5 and abs(dacc) <= 0.02
    out.append(f"RLCR ECE / RLVR ECE = {b['ece']:.3f} / {a['ece']:.3f} = {ratio:.2f} (claim: <= 0.5);"
               f" accuracy RLCR - RLVR = {dacc:+.3f} (claim: within 0.02) -> "
               f"{'reproduced' if ok else 'NOT reproduced'}")
  return out


def _run(args) -> int:
  from train.rlcr.job import build_job, results_markdown, run_job
  job = build_job(args_to_overrides(args), config_file=args.config)
  out = run_job(job, args.run_dir, progress=not args.no_progress)
  print(results_markdown(out["results"]))
  for line in summary_lines(out["results"]):
    print(line)
  t = out["timings"]
  print(f"time: {t['total_s']:.0f} s wall, {t['total_cpu_s']:.0f} s CPU; "
        f"results: {args.run_dir}/results.md, reliability_*.png, curves.png")
  return 0
