"""RLCR data loaders, prompts and the synthetic task (train/rlcr/{data,prompts,synthetic}.py)."""

import collections
import json
import math

import numpy as np
import pytest

from eval import calibration as cal
from train.rlcr import data as D
from train.rlcr import prompts as P
from train.rlcr import rewards as R
from train.rlcr.synthetic import SyntheticQA, SyntheticQAConfig


def write_lines(path, lines):
  path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
  return path


# ---------------------------------------------------------------------------
# Loaders

def test_load_hotpot_skips_and_counts_malformed_rows(tmp_path):
  f = write_lines(tmp_path / "hp.jsonl", [
      {"question": "Who?", "answer": "Ada", "id": "q1", "context": "Ada wrote it."},
      {"question": "When?", "answer": ["1843", "in 1843"],
       "context": {"title": ["T1", "T2"], "sentences": [["s1.", "s2."], ["s3."]]}},
      {"question": "Where?", "answer": "Paris", "context": [["Paris", ["Capital."]], "Free text."]},
      "",                                               # blank: ignored, not counted
      "{not json",                                      # bad JSON
      [1, 2],                                           # not an object
      {"question": "Q?"},                               # no answer
      {"question": "  ", "answer": "a"},                # empty question
      {"question": "Q?", "answer": True},               # bool answer
      {"question": "Q?", "answer": 3},                  # numbers are not hotpot answers
      {"question": "Q?", "answer": []},                 # empty alias list
      {"question": "Q?", "answer": "a", "context": 5},  # bad context
      {"question": "Q?", "answer": "a", "context": {"title": ["x"], "sentences": 3}},
      {"question": "Q?", "answer": "a", "id": [1]},     # bad id
      "[" * 100000,                                     # deeply nested JSON
  ])
  res = D.load_jsonl(f, "hotpot")
  assert (res.n_read, res.n_skipped, len(res.dataset)) == (14, 11, 3)
  assert [r[1] for r in res.reasons] == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
  rows = list(res.dataset)
  assert rows[0]["id"] == "q1" and rows[1]["id"] == "hp-2"
  assert rows[1]["answers"] == ["1843", "in 1843"] and rows[1]["answer"] == "1843"
  assert all(r["source"] == "hotpot" for r in rows)
  assert rows[0]["question"] == "Who?"
  assert rows[0]["problem"].startswith("Question: Who? \n\n" + P.HOTPOT_EM_NOTE)
  assert "Ada wrote it." in rows[0]["problem"] and "Supporting Information:" in rows[0]["problem"]
  assert "T1\ns1.\ns2." in rows[1]["problem"] and "Paragraph 1" in rows[1]["problem"]
  assert "Paris\nCapital." in rows[2]["problem"] and "Free text." in rows[2]["problem"]


def test_load_math(tmp_path):
  a = write_lines(tmp_path / "a.jsonl", [
      {"problem": "1+1?", "answer": 2},
      {"question": "Half of 1?", "answer": "1/2", "id": 7},
      {"problem": "P wins", "question": "ignored", "answer": 1.5},
      {"problem": "x", "answer": float("nan")},   # json.dumps writes NaN; rejected
      {"answer": "3"},
  ])
  b = write_lines(tmp_path / "b.jsonl", [{"problem": "2+2?", "answer": "4"}])
  res = D.load_jsonl([a, str(b)], "math")
  assert (res.n_read, res.n_skipped) == (6, 2)
  ds = res.dataset
  assert ds["problem"] == ["1+1?", "Half of 1?", "P wins", "2+2?"]
  assert ds["answer"] == ["2", "1/2", "1.5", "4"] and ds["id"] == ["a-1", "7", "a-3", "b-1"]
  assert ds["problem"] == ds["question"] and set(ds["source"]) == {"math"}


def test_load_errors_and_empty(tmp_path):
  with pytest.raises(FileNotFoundError, match="paths"):
    D.load_jsonl(tmp_path / "missing.jsonl", "math")
  f = write_lines(tmp_path / "bad.jsonl", ["nope", "{}"])
  with pytest.raises(ValueError, match="kind"):
    D.load_jsonl(f, "trivia")
  res = D.load_jsonl(f, "math")
  assert len(res.dataset) == 0 and res.n_skipped == 2
  assert set(res.dataset.column_names) == {"id", "problem", "question", "answer", "answers", "source"}


# ---------------------------------------------------------------------------
# Prompts

def test_prompts():
  assert P.user_turn("What is 2+2?") == "\n\nPROBLEM: What is 2+2?\n\n"
  for name in ("rlcr", "rlcr_long"):
    sp = P.system_prompt(name)
    for tag in R.TAGS[1:]:   # every tag but the opening <think> appears literally
      assert tag in sp, (name, tag)
  assert "ambigu" in P.RLCR_SYSTEM_PROMPT_LONG and "alternative" in P.RLCR_SYSTEM_PROMPT_LONG
  assert "<confidence>" not in P.RLVR_SYSTEM_PROMPT and "<answer>" in P.RLVR_SYSTEM_PROMPT
  assert "exact match" in P.HOTPOT_EM_NOTE
  with pytest.raises(ValueError, match="name"):
    P.system_prompt("tabc")
  msgs = P.build_messages("Q", system="rlvr")
  assert [m["role"] for m in msgs] == ["system", "user"] and msgs[1]["content"] == "\n\nPROBLEM: Q\n\n"
  assert P.build_messages("Q", system=None) == [{"role": "user", "content": "\n\nPROBLEM: Q\n\n"}]


def test_build_prompt_template_and_fallback():
  plain = P.build_prompt("Q", system=None)
  assert plain == "<|user|>\n\n\nPROBLEM: Q\n\n\n<|assistant|>\n"

  class Tok:
    chat_template = "{{ fake }}"

    def __init__(self):
      self.calls = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
      self.calls.append((messages, tokenize, add_generation_prompt))
      return "TEMPLATED"

  tok = Tok()
  assert P.build_prompt("Q", tokenizer=tok) == "TEMPLATED"
  assert tok.calls[0][1:] == (False, True) and tok.calls[0][0][0]["role"] == "system"
  assert P.build_prompt("Q", tokenizer=tok, use_chat_template=False).startswith("<|system|>")
  tok.chat_template = None
  assert P.build_prompt("Q", tokenizer=tok).startswith("<|system|>")
  with pytest.raises(ValueError, match="tokenizer"):
    P.build_prompt("Q", tokenizer=tok, use_chat_template=True)
  with pytest.raises(ValueError, match="messages"):
    P.render_plain([{"role": "robot", "content": "x"}])


# ---------------------------------------------------------------------------
# Synthetic task

@pytest.fixture(scope="module")
def task():
  return SyntheticQA(seed=0)


def test_synthetic_determinism_and_splits(task):
  again = SyntheticQA(seed=0)
  other = SyntheticQA(seed=1)
  test_p = task.prompts("test")
  train_p = task.prompts("train")
  assert len(test_p) == 32 * 16 and len(train_p) == 32 * 984
  assert not set(test_p) & set(train_p)
  assert test_p == again.prompts("test")
  assert [task.gold(p) for p in test_p] == [again.gold(p) for p in test_p]
  assert [task.gold(p) for p in test_p] != [other.gold(p) for p in test_p]
  assert task.sft_examples(50, seed=3) == again.sft_examples(50, seed=3)
  assert task.sft_examples(50, seed=3) != task.sft_examples(50, seed=4)
  assert all(task.split_of(p) == "test" for p in test_p[:50])
  assert all(task.split_of(p) == "train" for p in task.sample_prompts("train", 50, np.random.default_rng(0)))
  with pytest.raises(ValueError, match="split"):
    task.prompts("val")


def test_synthetic_prompts_and_answers(task):
  for p in task.prompts("test")[:64]:
    assert p.isascii() and len(p) == 12
    key, nonce = task.parse_prompt(p)
    assert task.prompt(key, nonce) == p
    probs = task.answer_probs(p)
    assert math.isclose(sum(probs.values()), 1.0) and task.gold(p) in probs
    assert task.optimal_confidence(p) == max(probs.values()) == task.p_correct(p, task.optimal_answer(p))
    assert task.p_correct(p, "x") == 0.0 and task.p_correct(p, None) == 0.0
  for bad in ["Q: k99 n001?", "Q: k1 n001?", "Q: k01 n001", "hello", 3]:
    with pytest.raises(ValueError, match="prompt"):
      task.parse_prompt(bad)


def test_synthetic_class_probabilities(task):
  # Over all train prompts, the gold equals the key's mode with the class probability.
  hits, totals = collections.Counter(), collections.Counter()
  for p in task.prompts("train"):
    c = task.key_class(p)
    totals[c] += 1
    hits[c] += task.gold(p) == task.optimal_answer(p)
  rows = task.class_table()
  assert [r["bayes_accuracy"] for r in rows] == [1.0, 0.75, 0.5, 0.25]
  assert [r["n_keys"] for r in rows] == [8, 8, 8, 8]
  for r in rows:
    p, n = r["bayes_accuracy"], totals[r["class"]]
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(hits[r["class"]] / n - p) <= 4.5 * sd + 1e-12, r
  # Answers of a key are all used: class 3 spreads over four digits.
  p3 = next(p for p in task.prompts("train") if task.key_class(p) == 3)
  key = task.parse_prompt(p3)[0]
  seen = {task.gold(task.prompt(key, n)) for n in range(200)}
  assert seen == set(task.answer_probs(p3))


def test_synthetic_sft_examples(task):
  ex = task.sft_examples(400)
  confs = []
  for e in ex:
    p = R.parse_completion(e.completion)
    assert p.well_formed and p.answer == e.gold == task.gold(e.prompt)
    assert len(e.completion.encode()) <= 90 and e.completion.isascii()
    assert e.completion.startswith(f"<think>k{task.parse_prompt(e.prompt)[0]:02d}</think>")
    confs.append(p.confidence)
  # Default SFT confidence is random on the 0.0..1.0 grid, independent of the class.
  assert set(confs) == {i / 10 for i in range(11)}
  cls = np.array([task.key_class(e.prompt) for e in ex])
  confs = np.array(confs)
  assert abs(np.corrcoef(cls, confs)[0, 1]) < 0.2
  one = SyntheticQA(seed=0, sft_confidence="one").sft_examples(20)
  assert {R.parse_completion(e.completion).confidence for e in one} == {1.0}
  oracle = SyntheticQA(seed=0, sft_confidence="oracle", think=False, analysis="hmm").sft_examples(20)
  for e in oracle:
    assert R.parse_completion(e.completion).confidence == task.optimal_confidence(e.prompt)
    assert e.completion.startswith("<think></think>") and "<analysis>hmm</analysis>" in e.completion


def test_bayes_policy_beats_overconfident_policy_on_calibration(task):
  # Integration: the Bayes-optimal policy is calibrated on the test split, "always 1.0" is not.
  prompts = task.prompts("test")
  golds = [task.gold(p) for p in prompts]
  comp_opt = [task.completion(p, task.optimal_answer(p), task.optimal_confidence(p)) for p in prompts]
  comp_one = [task.completion(p, task.optimal_answer(p), 1.0) for p in prompts]
  s_opt, s_one = R.score_batch(comp_opt, golds), R.score_batch(comp_one, golds)
  m_opt = cal.calibration_metrics(s_opt.confidence_N, s_opt.correct_N)
  m_one = cal.calibration_metrics(s_one.confidence_N, s_one.correct_N)
  assert m_opt["accuracy"] == m_one["accuracy"]
  assert abs(m_opt["accuracy"] - 0.625) < 0.05
  assert m_opt["ece"] < 0.05 < 0.3 < m_one["ece"]
  assert m_opt["brier"] < m_one["brier"] and s_opt.reward_N.mean() > s_one.reward_N.mean()
  assert m_opt["auroc"] > 0.7 and m_one["auroc"] == 0.5


@pytest.mark.parametrize("kw, field", [
    ({"n_keys": 2}, "n_keys"), ({"n_keys": 101}, "n_keys"), ({"n_nonces": 1}, "n_nonces"),
    ({"n_test_nonces": 1000}, "n_test_nonces"), ({"classes": ((4,), (2, 1))}, "classes"),
    ({"classes": ()}, "classes"), ({"classes": ((0, 4),)}, "classes"),
    ({"classes": ((1.5, 2.5),)}, "classes"), ({"sft_confidence": "calibrated"}, "sft_confidence"),
    ({"analysis": "<b>"}, "analysis"), ({"seed": -1}, "seed"), ({"n_keys": 4.0}, "n_keys"),
])
def test_synthetic_config_validation(kw, field):
  with pytest.raises(ValueError, match=f"SyntheticQAConfig.{field}"):
    SyntheticQA(**{"seed": 0, **kw})


def test_synthetic_custom_classes():
  t = SyntheticQA(seed=5, n_keys=6, n_nonces=64, n_test_nonces=8, classes=[[8], [5, 3], [2, 2, 2, 2]])
  assert isinstance(t.config, SyntheticQAConfig) and t.config.classes == ((8,), (5, 3), (2, 2, 2, 2))
  assert len(t.prompts("test")) == 48 and len(t.prompts("train")) == 6 * 56
  assert sorted({t.optimal_confidence(p) for p in t.prompts("test")}) == [0.25, 0.625, 1.0]


def test_synthetic_expected_scores(task):
  prompts = task.prompts("test")
  best = task.expected_scores(prompts, [task.optimal_answer(p) for p in prompts],
                              [task.optimal_confidence(p) for p in prompts])
  # Classes are balanced: accuracy mean(1, .75, .5, .25); Brier mean p(1-p); reward mean p^2.
  assert best["accuracy"] == pytest.approx(0.625, abs=1e-12)
  assert best["brier"] == pytest.approx((0 + 0.1875 + 0.25 + 0.1875) / 4, abs=1e-12)
  assert best["rlcr_reward"] == pytest.approx((1 + 0.5625 + 0.25 + 0.0625) / 4, abs=1e-12)
  one = task.expected_scores(prompts, [task.optimal_answer(p) for p in prompts], [1.0] * len(prompts))
  assert one["brier"] == pytest.approx(1 - 0.625, abs=1e-12)
  # Monte-Carlo cross-check of the expectation on one class-1 prompt with q = 0.6.
  p1 = next(p for p in prompts if task.key_class(p) == 1)
  key = task.parse_prompt(p1)[0]
  golds = [task.gold(task.prompt(key, n)) for n in range(1000)]
  a = task.optimal_answer(p1)
  mc = np.mean([(0.6 - (g == a)) ** 2 for g in golds])
  exp = task.expected_scores([p1], [a], [0.6])["brier"]
  assert exp == pytest.approx(0.75 * 0.16 + 0.25 * 0.36, abs=1e-12)
  assert abs(mc - exp) < 4.5 * math.sqrt(0.75 * 0.25 / 1000) * 0.2
  with pytest.raises(ValueError, match="confs"):
    task.expected_scores([p1], [a], [1.5])
