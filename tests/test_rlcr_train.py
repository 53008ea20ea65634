"""RLCR training pipeline: tokenizer, SFT batches, rollouts, rewards per method, job + resume, CLI,
and the real-data path on a tiny random Llama."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.config import ConfigError
from jaxlab.models import LM, ModelConfig
from jaxlab.models.sampling import SamplingConfig
from jaxlab.testing import assert_close
from train.rlcr import rewards as R
from train.rlcr.grpo import policy_logprobs
from train.rlcr.job import build_job, method_rewards, run_job
from train.rlcr.rollout import RolloutConfig, Sampler, apply_stop_strings
from train.rlcr.sft import sft_arrays
from train.rlcr.tokenizer import RLCRByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- tokenizer / SFT

def test_tag_tokenizer_roundtrip_and_ids():
  tok = RLCRByteTokenizer()
  text = "<think>k07</think><answer>3</answer><analysis>é</analysis><confidence>0.7</confidence>"
  ids = tok.encode(text)
  assert tok.vocab_size == 267
  assert ids.tolist().count(tok.tag_ids["<answer>"]) == 1 and len(ids) == 8 + 3 + 1 + 2 + 3
  assert tok.decode(ids) == text
  assert tok.decode([tok.bos_id, *ids.tolist(), tok.eos_id, tok.pad_id]) == text
  assert tok.token_id("</confidence>") == 266 and tok.token_id("<eos>") == 257
  # Plain bytes are unchanged (a "<" that is not a tag stays a byte).
  assert tok.encode("a<b").tolist() == [97, 60, 98]


def test_sft_arrays_mask_completion_targets_only():
  a = sft_arrays([([1, 2], [3, 4, 5]), ([1], [6])], seq_len=6, pad_id=0)
  np.testing.assert_array_equal(a["inputs"][0], [1, 2, 3, 4, 5, 0])
  np.testing.assert_array_equal(a["targets"][0], [2, 3, 4, 5, 0, 0])
  np.testing.assert_array_equal(a["loss_mask"][0], [0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(a["loss_mask"][1], [1, 0, 0, 0, 0, 0])
  with pytest.raises(ValueError, match="examples"):
    sft_arrays([([1] * 5, [2] * 3)], seq_len=6, pad_id=0)


def test_overconfident_sft_confidences():
  """p ** (1/3) on the grid for a share sft_mix of examples, uniform otherwise; same prompts."""
  from train.rlcr.synthetic import SyntheticQA
  task = SyntheticQA(seed=0, sft_confidence="overconfident")
  ex = task.sft_examples(4000)
  assert [e.prompt for e in ex] == [e.prompt for e in SyntheticQA(seed=0).sft_examples(4000)]
  conf = np.array([R.parse_completion(e.completion).confidence for e in ex])
  cls = np.array([task.key_class(e.prompt) for e in ex])
  for c, want in enumerate((1.0, 0.9, 0.8, 0.6)):
    share = np.mean(conf[cls == c] == want)
    # 0.5 + 0.5/11 expected; 5 binomial standard errors at n ~ 1000.
    assert abs(share - (0.5 + 0.5 / 11)) < 5 * np.sqrt(0.25 / (cls == c).sum()), (c, share)
  with pytest.raises(ValueError, match="sft_mix"):
    SyntheticQA(sft_mix=1.5)


# ----------------------------------------------------------------------------- rollouts

CFG = ModelConfig(vocab_size=24, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)
EOS = (3, 4, 5, 6)   # several stop ids, so that both stopped and truncated rows occur


@pytest.fixture(scope="module")
def sampled():
  model = LM(CFG, rngs=nnx.Rngs(0))
  gd, state = nnx.split(model)
  rc = RolloutConfig(group_size=4, max_new_tokens=7, temperature=1.0, stop_token_ids=EOS)
  s = Sampler(gd, rc, max_prompt_len=6, pad_id=0)
  prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
  ro = s.sample((state,), prompts, jax.random.key(3))
  return model, s, state, prompts, ro


def test_rollout_layout_groups_and_stops(sampled):
  _, _, _, prompts, ro = sampled
  assert ro.tokens.shape == (8, 7) and ro.prompt_tokens.shape == (8, 6)
  # Group-major: rows 0-3 hold prompt 0 (left-padded), rows 4-7 prompt 1.
  np.testing.assert_array_equal(ro.prompt_tokens[:4], [[0, 0, 0, 5, 6, 7]] * 4)
  np.testing.assert_array_equal(ro.prompt_mask[4:], True)
  for r in range(8):
    n = ro.lengths[r]
    assert ro.mask[r, :n].all() and not ro.mask[r, n:].any()      # contiguous prefix
    stops = np.flatnonzero(np.isin(ro.tokens[r, :n], EOS))
    if ro.truncated[r]:
      assert n == 7 and stops.size == 0
    else:
      assert stops.tolist() == [n - 1]                              # ends at its first EOS
    assert (ro.tokens[r, n:] == 0).all() and (ro.logprobs[r, n:] == 0).all()
  assert ro.truncated.any() and not ro.truncated.all()   # both branches were checked
  assert np.all(ro.logprobs[ro.mask] <= 0)


def test_rollout_logprobs_equal_the_learner_forward(sampled):
  """Cache-decoded sampling logprobs == teacher-forced logprobs of the training batch."""
  model, _, _, _, ro = sampled
  b = ro.training_batch()
  lp, _ = nnx.jit(policy_logprobs)(model, b["tokens"], b["attn_mask"])
  m = b["loss_mask"] > 0
  assert m.sum() == ro.mask.sum()
  assert_close(np.asarray(lp)[m], ro.logprobs[ro.mask], rtol=1e-5, atol=1e-5, name="logprobs")


def test_greedy_groups_are_identical_and_sampling_is_seeded(sampled):
  _, s, state, prompts, ro = sampled
  g = s.sample((state,), prompts, jax.random.key(0), sampling=SamplingConfig())
  for i in range(2):
    assert (g.tokens[4 * i:4 * i + 4] == g.tokens[4 * i]).all()
  again = s.sample((state,), prompts, jax.random.key(3))
  np.testing.assert_array_equal(again.tokens, ro.tokens)
  with pytest.raises(ValueError, match="max_prompt_len"):
    s.sample((state,), [[1] * 7], jax.random.key(0))


def test_stop_strings_cut_after_the_completing_token():
  decode = lambda ids: "".join("abcdefgh"[i] for i in ids)  # noqa: E731
  toks = np.array([[0, 2, 3, 1, 4], [0, 1, 1, 1, 1], [2, 3, 2, 3, 0]])
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
  m, stopped = apply_stop_strings(toks, mask, decode, ["cd"])
  np.testing.assert_array_equal(m[0], [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(m[1], mask[1])
  np.testing.assert_array_equal(m[2], [1, 1, 0, 0, 0])
  np.testing.assert_array_equal(stopped, [True, False, True])
  with pytest.raises(ValueError, match="stop_strings"):
    Sampler(None, RolloutConfig(stop_strings=("x",)), max_prompt_len=4)


# ----------------------------------------------------------------------------- rewards per method

def test_method_rewards():
  good = R.format_completion("3", "0.8")
  wrong = R.format_completion("4", "0.8")
  bad = "<answer>3</answer>"
  texts, golds = [good, wrong, bad], ["3", "3", "3"]
  r, s = method_rewards("rlcr", texts, golds)
  np.testing.assert_allclose(r, [1 - 0.2 ** 2, -(0.8 ** 2), -2.0])
  r, s = method_rewards("rlvr", texts, golds)          # RLCR tags, correctness only
  np.testing.assert_array_equal(r, [1.0, 0.0, -1.0])
  assert s.confidence_N[0] == 0.8
  r, _ = method_rewards("rlvr", ["<think></think><answer>3</answer>", good], golds[:2],
                        rlvr_format="rlvr")            # official RLVR format
  np.testing.assert_array_equal(r, [1.0, -1.0])
  with pytest.raises(ValueError, match="method"):
    method_rewards("ppo", texts, golds)


# ----------------------------------------------------------------------------- job

SMOKE = dict(
    model=dict(d_model=32, n_layers=1, n_heads=2),
    sft=dict(steps=6, batch_size=16, eval_every=0, checkpoint_every=3, log_every=3),
    grpo=dict(steps=3, log_kl=False), prompts_per_step=4, rollout=dict(group_size=4),
    eval_size=16, eval_batch_size=16, eval_every=2, checkpoint_every=2)


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_job_smoke_and_resume(tmp_path):
  logs = []
  job = build_job(SMOKE)
  out = run_job(job, tmp_path, progress=False, log=logs.append)
  res = out["results"]
  assert set(res) == {"sft", "rlvr", "rlcr"}
  for m in res.values():
    assert m["n"] == 16 and 0 <= m["ece"] <= 1 and 0 <= m["accuracy"] <= 1
  for method in ("rlvr", "rlcr"):
    recs = [json.loads(l) for l in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for k in ("reward", "accuracy", "ece", "brier", "completion_len", "entropy", "clip_frac"):
      assert all(np.isfinite(r[k]) for r in recs), k
    assert "test/ece" in recs[1]
  for f in ("results.json", "results.md", "curves.png", "reliability_sft.png",
            "reliability_rlvr.png", "reliability_rlcr.png", "samples_rlcr.jsonl"):
    assert (tmp_path / f).exists(), f
  # Same command again with one more step: every stage resumes, nothing is redone.
  logs.clear()
  job2 = build_job({**SMOKE, "grpo": dict(steps=4, log_kl=False)})
  run_job(job2, tmp_path, progress=False, log=logs.append)
  assert any("resumed from step 6" in l for l in logs)
  assert any("rlvr: resumed from step 3" in l for l in logs)
  recs = [json.loads(l) for l in (tmp_path / "rlcr" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in recs] == [1, 2, 3, 4]
  # A field that shapes the state cannot change on resume.
  with pytest.raises(ConfigError, match="rollout.group_size"):
    run_job(build_job({**SMOKE, "rollout": dict(group_size=2)}), tmp_path, progress=False)


def test_job_config_errors_name_the_field():
  with pytest.raises(ConfigError, match="methods"):
    build_job({"methods": ["ppo"]})
  with pytest.raises(ConfigError, match="data"):
    build_job({"model_path": "/nonexistent"})
  with pytest.raises(ConfigError, match="prompts_per_step"):
    build_job({"prompts_per_step": 0})
  with pytest.raises(ConfigError, match="unknown field"):
    build_job({"grpo": {"lr": 1.0}})


def test_cli_help_and_flag_mapping(capsys):
  from jaxlab.cli import build_parser, main
  with pytest.raises(SystemExit) as e:
    main(["train", "rlcr", "--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  for flag in ("--run-dir", "--seed", "--steps", "--model", "--data", "--kind", "--lora-rank"):
    assert flag in text
  from train.rlcr.cli import args_to_overrides
  args = build_parser().parse_args(
      ["train", "rlcr", "--steps", "7", "--seed", "2", "--group-size", "4", "--temperature",
       "0.7", "--lora-rank", "4", "--model", "m", "--data", "a.jsonl", "--kind", "math",
       "--sft-confidence", "random"])
  ov = args_to_overrides(args)
  assert ov["grpo"] == {"steps": 7, "temperature": 0.7} and ov["seed"] == 2
  assert ov["rollout"] == {"group_size": 4, "temperature": 0.7}
  assert ov["lora"] == {"rank": 4} and ov["model_path"] == "m" and ov["data"] == ["a.jsonl"]
  assert ov["task"] == {"sft_confidence": "random"}
  job = build_job(ov)
  assert job.grpo.steps == 7 and job.lora.rank == 4 and job.kind == "math"


@pytest.mark.slow
def test_real_data_path_on_a_tiny_random_llama(tmp_path):
  """HF checkpoint + tokenizer + chat template + HotpotQA JSONL + LoRA, two GRPO steps."""
  pytest.importorskip("torch")
  from jaxlab.models._hf_testing import save_tiny_checkpoint
  ckpt = tmp_path / "llama"
  save_tiny_checkpoint(str(ckpt), "llama")
  rows = [{"question": f"who is {n}?", "answer": n, "context": [f"{n} is a fox."]}
          for n in ("ann", "bob", "cy", "dee", "eve", "flo")]
  data = tmp_path / "hotpot.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  job = build_job(dict(model_path=str(ckpt), data=[str(data)], kind="hotpot", max_prompt_len=192,
                       rlvr_format="rlvr",
                       lora=dict(rank=2), grpo=dict(steps=2), prompts_per_step=2,
                       rollout=dict(group_size=2, max_new_tokens=6), eval_size=2,
                       eval_batch_size=2, eval_every=0, checkpoint_every=1))
  out = run_job(job, tmp_path / "run", progress=False, log=lambda *_: None)
  assert set(out["results"]) == {"base", "rlvr", "rlcr"}
  for method in ("rlvr", "rlcr"):
    recs = [json.loads(l) for l in
            (tmp_path / "run" / method / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and abs(recs[0]["kl"]) < 1e-5 and np.isfinite(recs[1]["kl"])
    assert (tmp_path / "run" / method / "final" / "adapter_model.safetensors").exists()


_MULTI = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    from jaxlab import sharding as shd
    from jaxlab.models import LM, ModelConfig
    from train.rlcr.grpo import GRPOConfig, GRPOLearner
    from train.rlcr.rollout import RolloutConfig, Sampler
    assert jax.device_count() == 4
    cfg = ModelConfig(vocab_size=24, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)
    rc = RolloutConfig(group_size=2, max_new_tokens=5, temperature=1.0, stop_token_ids=(3,))
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    out = {}
    for name, mesh in (("one", shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1])),
                       ("four", shd.make_mesh(shd.MeshConfig(data=2, tensor=2)))):
      lr = GRPOLearner(LM(cfg, rngs=nnx.Rngs(0)), GRPOConfig(steps=2, log_kl=False), mesh=mesh)
      s = Sampler(lr.graphdef, rc, max_prompt_len=4, pad_id=0, mesh=mesh)
      st = lr.init_state()
      ro = s.sample(lr.sampling_states(st.params), prompts, jax.random.key(1))
      st, m = lr.train_on_rollout(st, ro, np.arange(6.0))
      out[name] = (ro.tokens, float(m["loss"]), jax.tree.map(np.asarray, st.params))
    a, b = out["one"], out["four"]
    np.testing.assert_array_equal(a[0], b[0])   # same samples: sharding-invariant RNG
    assert abs(a[1] - b[1]) <= 1e-5 * abs(a[1]) + 1e-7, (a[1], b[1])
    # One AdamW step: sharding changes only the fp32 summation order of the gradients, and
    # Adam divides by |g|, so entries with small |g| amplify that rounding; measured max
    # |diff| 6e-7 on weights up to 0.08 (2026-11-26). Allowance ~1.8e-6 at |w| = 0.08.
    # An entry whose gradient is at the summation-noise level can move by anything up to
    # the step's bound, lr * |g| / (|g| + eps) <= lr, either way (one entry of 3072 moved
    # by 3.4e-6 on a 2-core AMD EPYC VM, 2026-11-27): every entry within 2 lr, and at most
    # 0.1% of each leaf beyond the tight tolerance.
    lr_bound = 2 * GRPOConfig().learning_rate
    for x, y in zip(jax.tree.leaves(a[2]), jax.tree.leaves(b[2])):
      d = np.abs(x - y)
      assert d.max() <= lr_bound, d.max()
      loose = d > 1e-6 + 1e-5 * np.abs(y)
      assert loose.sum() <= max(1, loose.size // 1000), (loose.sum(), loose.size, d.max())
    print("OK")
""")


@pytest.mark.slow
def test_rollout_and_update_on_a_4_device_mesh_match_one_device():
  """Sharded (data=2, tensor=2) rollouts and update equal the single-device ones (subprocess)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")
  r = subprocess.run([sys.executable, "-c", _MULTI], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]
