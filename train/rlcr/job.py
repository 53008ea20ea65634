"""`jaxlab train rlcr`: SFT warm-up, then RLVR and RLCR (GRPO) from the same start, evaluated.

Embedded default (no flags): the synthetic task of `train.rlcr.synthetic`
(answers only sometimes learnable, Bayes-optimal confidence 1 / .75 / .5 / .25
per key class), a tiny byte + tag-token transformer, a short SFT warm-up whose
confidences are uniformly random (uncalibrated on purpose), then RLVR and RLCR
for the same number of GRPO steps with the same prompts and sampling keys.
Both runs use the RLCR completion format; RLVR rewards correctness only
(well-formed: 1[correct]; malformed: -1), so its confidence is unconstrained,
and RLCR rewards 1[correct] - (q - 1[correct])^2 (malformed: -2). Evaluation:
greedy decoding on all test prompts; accuracy, Brier, ECE, AUROC, reliability
diagrams.

Real data (`model_path` set): a Hugging Face checkpoint (`jaxlab.models.hf.load`,
its tokenizer and chat template), local HotpotQA / math JSONL
(`train.rlcr.data.load_jsonl`), the official system prompts, optional LoRA, and
no SFT stage.

Layout of RUN_DIR: config.json; sft/ (synthetic only); rlvr/ and rlcr/ each with
checkpoints/, metrics.jsonl, tb/; results.json; results.md; reliability_*.png.
Running the same command again resumes every stage from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxlab import sharding as shd
from jaxlab.config import ConfigError, from_dict, require, to_dict
from jaxlab.models.config import ModelConfig
from jaxlab.models.lora import LoRAConfig
from train.rlcr.grpo import GRPOConfig
from train.rlcr.rollout import RolloutConfig
from train.trainer import TrainConfig

__all__ = ["RLCRJobConfig", "METHODS", "build_job", "run_job", "method_rewards",
           "DEFAULT_TASK", "DEFAULT_MODEL", "DEFAULT_SFT", "DEFAULT_GRPO", "DEFAULT_ROLLOUT"]

METHODS = ("rlvr", "rlcr")
RLVR_FORMATS = ("rlcr", "rlvr")

# The embedded default (tuned to finish in minutes on 2 CPU cores).
DEFAULT_TASK = dict(sft_confidence="overconfident")
DEFAULT_MODEL = dict(vocab_size=267, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
DEFAULT_SFT = dict(steps=400, batch_size=64, learning_rate=3e-3, warmup_steps=20,
                   schedule="cosine", eval_every=200, eval_batches=2, eval_batch_size=64,
                   checkpoint_every=100, log_every=20)
DEFAULT_GRPO = dict(steps=150, learning_rate=5e-4, warmup_steps=5)
DEFAULT_ROLLOUT = dict(group_size=8, max_new_tokens=20, temperature=1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLCRJobConfig:
  """Everything that defines an `rlcr` run (stored as RUN_DIR/config.json)."""
  seed: int = 0
  methods: tuple[str, ...] = METHODS
  rlvr_format: str = "rlcr"          # rlcr: RLVR uses the RLCR tags too; rlvr: official think/answer
  # synthetic source (used when model_path is None)
  task: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_TASK))  # SyntheticQA options
  model: ModelConfig = ModelConfig(**DEFAULT_MODEL)
  sft: TrainConfig = TrainConfig(**DEFAULT_SFT)
  # real-data source
  model_path: str | None = None
  data: tuple[str, ...] = ()
  kind: str = "hotpot"
  eval_data: tuple[str, ...] = ()
  system_prompt: str | None = None   # default: rlcr_long (hotpot) / rlcr (math); rlvr for RLVR
  dtype: str | None = None
  lora: LoRAConfig | None = None
  max_prompt_len: int = 0            # 0: 16 for synthetic, 1024 for real data
  # RL
  prompts_per_step: int = 32
  rollout: RolloutConfig = RolloutConfig(**DEFAULT_ROLLOUT)
  grpo: GRPOConfig = GRPOConfig(**DEFAULT_GRPO)
  mask_truncated: bool = False
  # evaluation and bookkeeping
  eval_size: int = 0                 # 0: all synthetic test prompts / 64 held-out real rows
  eval_every: int = 25
  eval_batch_size: int = 128
  eval_max_new_tokens: int = 0       # 0: rollout.max_new_tokens
  checkpoint_every: int = 25
  keep_checkpoints: int = 2

  def __post_init__(self):
    c = "RLCRJobConfig"
    object.__setattr__(self, "methods", tuple(self.methods))
    object.__setattr__(self, "data", tuple(self.data))
    object.__setattr__(self, "eval_data", tuple(self.eval_data))
    bad = [m for m in self.methods if m not in METHODS]
    require(self.methods and not bad, c, "methods",
            f"unknown method {bad[0] if bad else ''!r} (known: {', '.join(METHODS)})")
    require(self.rlvr_format in RLVR_FORMATS, c, "rlvr_format",
            f"unknown format {self.rlvr_format!r} (known: {', '.join(RLVR_FORMATS)})")
    for f in ("prompts_per_step", "eval_batch_size", "keep_checkpoints"):
      v = getattr(self, f)
      require(isinstance(v, int) and v >= 1, c, f, f"must be a positive integer, got {v!r}")
    for f in ("eval_size", "eval_every", "eval_max_new_tokens", "checkpoint_every",
              "max_prompt_len"):
      v = getattr(self, f)
      require(isinstance(v, int) and v >= 0, c, f, f"must be >= 0, got {v!r}")
    if self.model_path is not None:
      from train.rlcr.data import KINDS
      require(self.kind in KINDS, c, "kind", f"unknown kind {self.kind!r} "
              f"(known: {', '.join(KINDS)})")
      require(len(self.data) > 0, c, "data", "a real-data run (model_path) needs JSONL files")
    else:
      if self.data:
        raise ConfigError(f"{c}.data: JSONL data needs model_path (a Hugging Face checkpoint)")
      require(self.rlvr_format == "rlcr", c, "rlvr_format",
              "the synthetic task's SFT teaches the RLCR format; 'rlvr' needs model_path")

  @property
  def synthetic(self) -> bool:
    return self.model_path is None


# Fields that may change when resuming (they do not shape any saved state).
RESUMABLE_FIELDS = ("grpo.steps", "sft.steps", "eval_every", "eval_size", "eval_batch_size",
                    "eval_max_new_tokens",
                    "checkpoint_every", "keep_checkpoints", "sft.eval_every",
                    "sft.checkpoint_every", "sft.log_every", "sft.keep_checkpoints",
                    "sft.eval_batches", "sft.eval_batch_size", "methods",
                    "grpo.mesh.data", "grpo.mesh.fsdp", "grpo.mesh.tensor",
                    "sft.mesh.data", "sft.mesh.fsdp", "sft.mesh.tensor")


def build_job(overrides: dict | None = None, *, config_file: str | None = None) -> RLCRJobConfig:
  """Defaults < JSON config file < overrides (nested dicts merge field by field)."""
  base = to_dict(RLCRJobConfig())
  if config_file:
    path = Path(config_file)
    if not path.exists():
      raise FileNotFoundError(f"config file not found: {path}")
    try:
      raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict):
      raise ConfigError(f"{path}: expected a JSON object")
    base = _merge(base, raw)
  base = _merge(base, overrides or {})
  # The SFT stage shares the job seed.
  if isinstance(base.get("sft"), dict):
    base["sft"]["seed"] = base.get("seed", 0)
  return from_dict(RLCRJobConfig, base)


def _merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    if isinstance(v, dict) and isinstance(out.get(k), dict):
      out[k] = _merge(out[k], v)
    else:
      out[k] = v
  return out


# ----------------------------------------------------------------------------- rewards

def method_rewards(method: str, texts: Sequence[str], golds: Sequence, *,
                   rlvr_format: str = "rlcr"):
  """(reward_N, scores) for a method. scores: rewards.BatchScores parsed in the RLCR format
  (or the RLVR format when rlvr_format == "rlvr" and method == "rlvr")."""
  from train.rlcr import rewards as R
  if method not in METHODS:
    raise ValueError(f"method: unknown method {method!r} (known: {', '.join(METHODS)})")
  if method == "rlcr" or rlvr_format == "rlcr":
    s = R.score_batch(list(texts), list(golds), fmt="rlcr")
    if method == "rlcr":
      return s.reward_N, s
    # RLVR in the RLCR format: correctness only; the confidence must parse but is not scored.
    return np.where(s.well_formed_N, s.correct_N.astype(np.float64),
                    R.DEFAULT_RLVR_PENALTY), s
  s = R.score_batch(list(texts), list(golds), fmt="rlvr")
  return s.reward_N, s


def _sample_stats(scores, rollout, reward_N) -> dict[str, float]:
  from eval import calibration as cal
  conf = cal.fill_missing_confidence(list(scores.confidence_N))
  correct = scores.correct_N
  return {"reward": float(np.mean(reward_N)), "accuracy": float(np.mean(correct)),
          "well_formed": float(np.mean(scores.well_formed_N)),
          "confidence": float(np.mean(conf)), "ece": cal.expected_calibration_error(conf, correct),
          "brier": cal.brier_score(conf, correct),
          "completion_len": float(np.mean(rollout.lengths)),
          "truncated": float(np.mean(rollout.truncated))}


# ----------------------------------------------------------------------------- sources

@dataclasses.dataclass
class Source:
  """Prompts, golds and the model/tokenizer plumbing of one job."""
  train_prompts: Callable[[int, int], tuple[list[list[int]], list]]  # (step, n) -> ids, golds
  eval_ids: list[list[int]]
  eval_golds: list
  eval_texts: list[str]
  decode: Callable[[Sequence[int]], str]
  pad_id: int
  stop_token_ids: tuple[int, ...]
  stop_strings: tuple[str, ...]
  max_prompt_len: int
  task: Any = None                  # SyntheticQA (noise-free expected scores)
  rlvr_prompts: Any = None          # (train_prompts, eval_ids) with the RLVR system prompt

  def prompts_for(self, fmt: str):
    """(train_prompts, eval_ids) for a completion format."""
    if fmt == "rlvr" and self.rlvr_prompts is not None:
      return self.rlvr_prompts
    return self.train_prompts, self.eval_ids


def _synthetic_source(job: RLCRJobConfig) -> Source:
  from train.rlcr.synthetic import SyntheticQA
  from train.rlcr.tokenizer import RLCRByteTokenizer
  task = SyntheticQA(seed=job.seed, **job.task)
  tok = RLCRByteTokenizer()
  enc = lambda p: [tok.bos_id, *tok.encode(p).tolist()]  # noqa: E731

  def train_prompts(step, n):
    ps = task.sample_prompts("train", n, np.random.default_rng([job.seed, step, 0x7A5]))
    return [enc(p) for p in ps], [task.gold(p) for p in ps]

  test = task.prompts("test")
  if job.eval_size:
    test = test[:job.eval_size] if job.eval_size <= len(test) else test
  return Source(train_prompts, [enc(p) for p in test], [task.gold(p) for p in test], test,
                tok.decode, tok.pad_id, (tok.eos_id,), (), job.max_prompt_len or 16, task)


def _hf_source(job: RLCRJobConfig, tok, log) -> Source:
  from train.rlcr import data as D
  from train.rlcr import prompts as PR
  res = D.load_jsonl(list(job.data), job.kind)
  rows = res.dataset
  log(f"data: {len(rows)} rows from {len(job.data)} file(s), {res.n_skipped} skipped")
  if len(rows) == 0:
    raise ConfigError("RLCRJobConfig.data: no usable rows")
  n_eval = job.eval_size or 64
  if job.eval_data:
    ev = D.load_jsonl(list(job.eval_data), job.kind).dataset
    train_rows, eval_rows = rows, ev.select(range(min(n_eval, len(ev))))
  else:
    if len(rows) < 2:
      raise ConfigError("RLCRJobConfig.data: need at least 2 rows to hold some out for eval")
    n_eval = min(n_eval, len(rows) // 2)
    perm = np.random.default_rng([job.seed, 0xE7A1]).permutation(len(rows))
    eval_rows, train_rows = rows.select(perm[:n_eval]), rows.select(perm[n_eval:])
  system = job.system_prompt or ("rlcr_long" if job.kind == "hotpot" else "rlcr")
  max_len = job.max_prompt_len or 1024
  templ = tok.chat_template is not None

  def enc_rows(ds, sys_name):
    ids, cut = [], 0
    for problem in ds["problem"]:
      text = PR.build_prompt(problem, system=sys_name, tokenizer=tok if templ else None)
      t = tok.encode(text, add_special_tokens=not templ)
      if len(t) > max_len:  # keep the end: the question's tail and the generation prompt
        t, cut = t[-max_len:], cut + 1
      ids.append(t)
    if cut:
      log(f"warning: {cut} of {len(ids)} prompts longer than max_prompt_len={max_len} "
          "tokens were cut from the left")
    return ids

  golds = list(train_rows["answers"])
  n_train = len(golds)

  def make_train_prompts(sys_name):
    ids = enc_rows(train_rows, sys_name)

    def train_prompts(step, n):
      idx = np.random.default_rng([job.seed, step, 0x7A5]).choice(n_train, n,
                                                                    replace=n_train < n)
      return [ids[i] for i in idx], [golds[i] for i in idx]
    return train_prompts

  pad = tok.pad_id if tok.pad_id is not None else (tok.eos_ids[0] if tok.eos_ids else 0)
  src = Source(make_train_prompts(system), enc_rows(eval_rows, system),
               list(eval_rows["answers"]), list(eval_rows["question"]), tok.decode, int(pad),
               tuple(tok.eos_ids), ("</confidence>",), max_len)
  if job.rlvr_format == "rlvr" and "rlvr" in job.methods:
    # The official RLVR baseline: think/answer system prompt, completions stop at </answer>.
    src.rlvr_prompts = (make_train_prompts("rlvr"), enc_rows(eval_rows, "rlvr"))
  return src


# ----------------------------------------------------------------------------- evaluation

def evaluate(sampler, states, src: Source, job: RLCRJobConfig, *, fmt: str = "rlcr",
             key=None) -> tuple[dict[str, float], dict[str, Any]]:
  """Greedy decoding on the eval prompts; calibration metrics and the per-sample arrays."""
  from eval import calibration as cal
  from jaxlab.models.sampling import SamplingConfig
  from train.rlcr import rewards as R
  B = job.eval_batch_size
  L = job.eval_max_new_tokens or job.rollout.max_new_tokens
  key = jax.random.key(0) if key is None else key
  texts, lengths, truncated = [], [], []
  ids = src.prompts_for(fmt)[1]
  for i in range(0, len(ids), B):
    chunk = ids[i:i + B]
    n = len(chunk)
    chunk = chunk + [chunk[-1]] * (B - n)  # fixed shape: one compile
    ro = sampler.sample(states, chunk, key, group_size=1, sampling=SamplingConfig(),
                        max_new_tokens=L)
    texts += ro.texts[:n]
    lengths += ro.lengths[:n].tolist()
    truncated += ro.truncated[:n].tolist()
  s = R.score_batch(texts, list(src.eval_golds), fmt=fmt)
  conf = cal.fill_missing_confidence(list(s.confidence_N))
  m = cal.calibration_metrics(conf, s.correct_N)
  m["well_formed"] = float(np.mean(s.well_formed_N))
  m["completion_len"] = float(np.mean(lengths))
  m["truncated"] = float(np.mean(truncated))
  if src.task is not None:
    exp = src.task.expected_scores(src.eval_texts, s.answers,
                                   [None if math.isnan(c) else c for c in s.confidence_N])
    m["accuracy_expected"] = exp["accuracy"]
    m["brier_expected"] = exp["brier"]
  per = dict(texts=texts, conf=conf, correct=s.correct_N, well_formed=s.well_formed_N)
  return m, per


# ----------------------------------------------------------------------------- running

def _model_and_learner(job: RLCRJobConfig, mesh, src_params, log):
  """(learner, tokenizer-or-None) for the job; src_params are the SFT params (synthetic)."""
  from flax import nnx
  from jaxlab.models import lora as LR
  from train.rlcr.grpo import GRPOLearner
  if job.synthetic:
    from jaxlab.models.transformer import LM
    abstract = nnx.eval_shape(lambda: LM(job.model, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    model = nnx.merge(graphdef, src_params)
  else:
    from jaxlab.models import hf
    model = hf.load(job.model_path, dtype=job.dtype, mesh=mesh)
  trainable = nnx.Param
  if job.lora is not None:
    LR.apply_lora(model, job.lora, rngs=nnx.Rngs(job.seed))
    trainable = LR.LoRAParam
  return GRPOLearner(model, job.grpo, trainable=trainable, mesh=mesh)


def _fmt_row(name, m):
  return (f"| {name} | {m['accuracy']:.3f} | {m['ece']:.3f} | {m['brier']:.3f} | "
          f"{m['auroc']:.3f} | {m['mean_confidence']:.3f} | {m['well_formed']:.3f} |")


def results_markdown(results: dict[str, dict]) -> str:
  lines = ["| model | accuracy | ECE | Brier | AUROC | mean conf | well-formed |",
           "|---|---|---|---|---|---|---|"]
  for name, m in results.items():
    lines.append(_fmt_row(name, m))
  return "\n".join(lines)


def run_method(job: RLCRJobConfig, method: str, learner, sampler, src: Source, run_dir: Path, *,
               progress: bool = True, log=print):
  """GRPO for one method from the learner's starting weights (resumes from run_dir).

  Returns (state, (eval metrics, per-sample arrays)) of the final weights.
  """
  from train.checkpoint import Checkpoints
  from train.metrics import MetricsWriter
  from train.trainer import to_host
  cfg = job.grpo
  mdir = run_dir / method
  is_main = jax.process_index() == 0
  writer = MetricsWriter(mdir, tensorboard=is_main) if is_main else None
  ckpts = Checkpoints(mdir / "checkpoints", every=job.checkpoint_every or cfg.steps,
                      keep=job.keep_checkpoints)
  fmt = "rlvr" if (method == "rlvr" and job.rlvr_format == "rlvr") else "rlcr"
  start = 0
  if ckpts.latest_step is not None:
    state = ckpts.restore(learner.abstract_state)
    start = int(to_host(state.step)) // cfg.iterations
    if writer:
      writer.truncate_after(start)
    log(f"{method}: resumed from step {start}")
  else:
    state = learner.init_state()
  bar = None
  if progress and is_main and start < cfg.steps:
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, initial=start, desc=f"{method}", unit="step", file=sys.stderr,
               dynamic_ncols=True)
  base_key = jax.random.key(job.seed)
  t0 = time.perf_counter()
  last_eval = None
  train_prompts = src.prompts_for(fmt)[0]
  for step in range(start, cfg.steps):
    ids, golds = train_prompts(step, job.prompts_per_step)
    key = jax.random.fold_in(base_key, step)
    ro = sampler.sample(learner.sampling_states(state.params), ids, key)
    golds_N = [g for g in golds for _ in range(ro.group_size)]
    reward, scores = method_rewards(method, ro.texts, golds_N, rlvr_format=job.rlvr_format)
    state, lm = learner.train_on_rollout(state, ro, reward, mask_truncated=job.mask_truncated)
    done = step + 1
    rec = {**_sample_stats(scores, ro, reward), **lm}
    if (job.eval_every and done % job.eval_every == 0) or done == cfg.steps:
      last_eval = evaluate(sampler, learner.sampling_states(state.params), src, job, fmt=fmt)
      rec.update({f"test/{k}": v for k, v in last_eval[0].items()})
    if writer:
      writer.write(done, rec)
    if bar is not None:
      bar.update(1)
      bar.set_postfix(reward=f"{rec['reward']:.3f}", acc=f"{rec['accuracy']:.2f}",
                      ece=f"{rec['ece']:.3f}")
    ckpts.maybe_save(done * cfg.iterations, state, force=(done == cfg.steps))
  if bar is not None:
    bar.close()
  ckpts.wait()
  ckpts.close()
  if writer:
    writer.close()
  if last_eval is None:  # nothing left to train (resumed at the end): evaluate the restored state
    last_eval = evaluate(sampler, learner.sampling_states(state.params), src, job, fmt=fmt)
  return state, last_eval


def run_job(job: RLCRJobConfig, run_dir, *, progress: bool = True, plot: bool = True,
            log=print) -> dict[str, Any]:
  """Run (or resume) every stage; returns {"results": {name: metrics}, "timings": {...}}."""
  from eval import calibration as cal
  from train.checkpoint import check_run_config, write_run_config
  from train.rlcr.rollout import Sampler
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  cfg_dict = to_dict(job)
  check_run_config(run_dir, cfg_dict, compatible_keys=RESUMABLE_FIELDS)
  write_run_config(run_dir, cfg_dict)
  timings: dict[str, float] = {}
  t_all = time.perf_counter()
  cpu_all = time.process_time()
  mesh = shd.make_mesh(job.grpo.mesh)

  # -- source and starting weights
  sft_params = None
  tok = None
  if job.synthetic:
    from train.rlcr.sft import SFTTask, run_sft, synthetic_examples_fn
    from train.rlcr.synthetic import SyntheticQA
    from train.rlcr.tokenizer import RLCRByteTokenizer
    src = _synthetic_source(job)
    rtok = RLCRByteTokenizer()
    if job.model.vocab_size < rtok.vocab_size:
      raise ConfigError(f"RLCRJobConfig.model.vocab_size: {job.model.vocab_size} < the "
                        f"tokenizer's {rtok.vocab_size}")
    task = SyntheticQA(seed=job.seed, **job.task)
    seq_len = src.max_prompt_len + job.rollout.max_new_tokens
    sft_task = SFTTask(synthetic_examples_fn(task, rtok), seq_len=seq_len,
                       vocab_size=rtok.vocab_size, pad_id=rtok.pad_id)
    t = time.perf_counter()
    _, sft_params, _ = run_sft(job.model, job.sft, sft_task, run_dir / "sft", mesh=mesh,
                               progress=progress, log=log)
    timings["sft_s"] = time.perf_counter() - t
  else:
    from jaxlab.tokenizer import load_tokenizer
    tok = load_tokenizer(job.model_path)
    src = _hf_source(job, tok, log)

  learner = _model_and_learner(job, mesh, sft_params, log)

  def make_sampler(fmt):
    stops = src.stop_strings if fmt == "rlcr" or not src.stop_strings else ("</answer>",)
    rcfg = dataclasses.replace(
        job.rollout, stop_token_ids=tuple(job.rollout.stop_token_ids) or src.stop_token_ids,
        stop_strings=tuple(job.rollout.stop_strings) or stops)
    return Sampler(learner.graphdef, rcfg, max_prompt_len=src.max_prompt_len, pad_id=src.pad_id,
                   mesh=mesh, decode=src.decode)

  samplers = {"rlcr": make_sampler("rlcr"), "rlvr": make_sampler("rlvr")}
  fmt_of = {m: ("rlvr" if (m == "rlvr" and job.rlvr_format == "rlvr") else "rlcr")
            for m in METHODS}

  results: dict[str, dict] = {}
  per_sample: dict[str, dict] = {}
  t = time.perf_counter()
  start_name = "sft" if job.synthetic else "base"
  results[start_name], per_sample[start_name] = evaluate(
      samplers["rlcr"], learner.sampling_states(learner.initial_params), src, job)
  timings[f"eval_{start_name}_s"] = time.perf_counter() - t
  for method in job.methods:
    t = time.perf_counter()
    fmt = fmt_of[method]
    state, (results[method], per_sample[method]) = run_method(
        job, method, learner, samplers[fmt], src, run_dir, progress=progress, log=log)
    timings[f"{method}_s"] = time.perf_counter() - t
    if not job.synthetic and jax.process_index() == 0:
      _save_model(learner, state.params, job, run_dir / method / "final")
    del state
  timings["total_s"] = time.perf_counter() - t_all
  timings["total_cpu_s"] = time.process_time() - cpu_all

  if jax.process_index() == 0:
    out = {"results": results, "timings": timings, "config": cfg_dict}
    (run_dir / "results.json").write_text(json.dumps(out, indent=2, sort_keys=True))
    (run_dir / "results.md").write_text(results_markdown(results) + "\n")
    for name, ps in per_sample.items():
      cal.reliability_diagram(ps["conf"], ps["correct"], run_dir / f"reliability_{name}.png",
                              title=f"{name} ({'synthetic' if job.synthetic else job.kind})")
      with open(run_dir / f"samples_{name}.jsonl", "w") as f:
        for i in range(min(64, len(ps["texts"]))):
          f.write(json.dumps({"prompt": src.eval_texts[i], "completion": ps["texts"][i],
                              "confidence": float(ps["conf"][i]),
                              "correct": bool(ps["correct"][i])}) + "\n")
    if plot:
      _plot(run_dir, job.methods)
  return {"results": results, "timings": timings}


def _save_model(learner, params, job, path):
  from jaxlab.models import hf
  from jaxlab.models import lora as LR
  model = learner.model(params)
  if job.lora is not None:
    LR.save_adapters(model, str(path))
  else:
    hf.save(model, str(path))


def _plot(run_dir: Path, methods):
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib.figure import Figure
  from train.metrics import read_metrics
  keys = ["reward", "ece", "confidence", "kl", "test/accuracy", "test/ece", "test/auroc"]
  fig = Figure(figsize=(3.6 * len(keys), 3.2))
  axes = fig.subplots(1, len(keys))
  for m in methods:
    recs = read_metrics(run_dir / m)
    for ax, k in zip(axes, keys):
      pts = [(r["step"], r[k]) for r in recs if r.get(k) is not None]
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m,
                marker="o" if k.startswith("test/") else None, markersize=3)
  for ax, k in zip(axes, keys):
    ax.set_title(k)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(run_dir / "curves.png", dpi=70)
