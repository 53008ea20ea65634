"""RLCR/RLVR parser, answer matching and rewards (train/rlcr/rewards.py)."""

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from train.rlcr import rewards as R

GOOD = "<think>2+2 is 4</think><answer>4</answer><analysis>simple sum</analysis><confidence>0.8</confidence>"

# The published format rule, written as the regex it is described by (papers.md §4.1).
REF_STRUCTURE = {
    "rlcr": re.compile(r".*?</think>\s*<answer>.*?</answer>\s*<analysis>.*?</analysis>\s*"
                       r"<confidence>.*?</confidence>\s*\Z", re.DOTALL),
    "rlvr": re.compile(r".*?</think>\s*<answer>.*?</answer>\s*\Z", re.DOTALL),
}


def ref_last(text, tag):
  found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
  return found[-1] if found else None


def ref_conf(s):
  if s is None:
    return None
  try:
    q = float(s)
  except ValueError:
    return None
  return q if math.isfinite(q) and 0 <= q <= 1 else None


def ref_parse(text, fmt):
  a = ref_last(text, "answer")
  q = ref_conf(ref_last(text, "confidence"))
  ok = REF_STRUCTURE[fmt].match(text) is not None
  if fmt == "rlcr":
    ok = ok and q is not None
  return (None if a is None else a.strip()), q, ok


# ---------------------------------------------------------------------------
# Parser: hand cases

@pytest.mark.parametrize("text, ok", [
    (GOOD, True),
    (GOOD.removeprefix("<think>"), True),                 # opening <think> optional (official)
    (GOOD.replace("</answer><analysis>", "</answer> \n\t<analysis>") + " \n", True),
    ("<think>a</think>\n<answer>b</answer>\n<analysis>c</analysis>\n<confidence> 1 </confidence>", True),
    (GOOD + "x", False),                                  # confidence must end the string
    (GOOD.replace("</answer><analysis>", "</answer>so<analysis>"), False),  # text between blocks
    (GOOD.replace("<think>2+2 is 4</think>", "<think>2+2 is 4"), False),    # no </think>
    ("<think>t</think><answer>4</answer><confidence>0.8</confidence>", False),  # no analysis
    ("<think>t</think><analysis>a</analysis><answer>4</answer><confidence>0.8</confidence>", False),
    (GOOD.replace("0.8", "1.2"), False),                  # confidence out of range
    (GOOD.replace("0.8", "-0.1"), False),
    (GOOD.replace("0.8", "high"), False),
    (GOOD.replace("0.8", ""), False),
    ("", False),
])
def test_format_rule_hand_cases(text, ok):
  assert R.parse_completion(text).well_formed is ok
  assert (REF_STRUCTURE["rlcr"].match(text) is not None and ref_conf(ref_last(text, "confidence"))
          is not None) is ok


def test_last_tag_of_each_kind_counts():
  text = ("<think>maybe <answer>3</answer> <confidence>0.1</confidence></think><answer> 4 </answer>"
          "<analysis>x</analysis><confidence>0.9</confidence>")
  p = R.parse_completion(text)
  assert p == R.Parsed("4", 0.9, True)
  # An invalid LAST confidence wins over an earlier valid one.
  bad = "<think><confidence>0.5</confidence></think><answer>4</answer><analysis>x</analysis><confidence>2</confidence>"
  assert R.parse_completion(bad) == R.Parsed("4", None, False)


def test_blocks_may_contain_tags_like_the_official_regex():
  # Free text is lazy but may backtrack over tags: this is well-formed officially.
  text = "</think><answer>a</answer> junk <answer>b</answer><analysis>c</analysis><confidence>0.5</confidence>"
  assert REF_STRUCTURE["rlcr"].match(text)
  assert R.parse_completion(text) == R.Parsed("b", 0.5, True)


@pytest.mark.parametrize("s, q", [
    ("0.8", 0.8), (" 0.80 ", 0.8), ("1", 1.0), ("0", 0.0), ("-0", 0.0), (".5", 0.5), ("1.", 1.0),
    ("1e0", 1.0), ("5e-1", 0.5), ("1.0000001", None), ("50%", None), ("nan", None), ("inf", None),
    ("0_5", None), ("\u0660.\u0665", None), ("0.5 0.6", None), ("", None), ("+0.25", 0.25),
])
def test_confidence_values(s, q):
  # nan, underscores and non-ASCII digits are accepted by Python float() (and nan passes the
  # official range check); we reject them on purpose.
  assert R.parse_confidence(s) == q
  p = R.parse_completion(GOOD.replace("<confidence>0.8<", f"<confidence>{s}<"))
  assert p.confidence == q and p.well_formed is (q is not None)


def test_rlvr_format():
  ta = "<think>t</think><answer>4</answer>"
  assert R.parse_completion(ta, fmt="rlvr") == R.Parsed("4", None, True)
  assert R.parse_completion(ta + "\n", fmt="rlvr").well_formed
  assert not R.parse_completion(ta, fmt="rlcr").well_formed
  # An RLCR-style completion is malformed for RLVR (the answer must end it), as officially.
  assert not R.parse_completion(GOOD, fmt="rlvr").well_formed
  assert R.parse_completion(GOOD, fmt="rlvr").confidence == 0.8


def test_parser_errors():
  with pytest.raises(ValueError, match="fmt"):
    R.parse_completion(GOOD, fmt="tabc")
  with pytest.raises(TypeError, match="text"):
    R.parse_completion(b"<answer>", fmt="rlcr")


def test_no_catastrophic_backtracking_on_long_adversarial_text():
  text = "</think><answer>" * 5000 + "</answer><analysis>" * 5000 + "<confidence>" * 5000
  assert R.parse_completion(text) == R.Parsed(ref_last(text, "answer").strip(), None, False)
  text2 = text + "0.5</confidence>"  # the last block opens at the FIRST <confidence>
  assert R.parse_completion(text2) == R.Parsed(ref_last(text2, "answer").strip(), None, False)


# ---------------------------------------------------------------------------
# Parser: fuzzing against the reference regex, and crash-freedom on any text

_TOKENS = list(R.TAGS) + ["<answer", "think>", "</", ">", " ", "\n", "\t", "x", "4", "0", "1",
                          ".", "5", "-", "e", "\u00a0", "\u2028", "<analysis/>"]
token_text = st.lists(st.sampled_from(_TOKENS), max_size=24).map("".join)


@settings(max_examples=400, deadline=None)
@given(token_text, st.sampled_from(R.FORMATS))
def test_parser_matches_reference_on_tag_soup(text, fmt):
  assert tuple(R.parse_completion(text, fmt=fmt)) == ref_parse(text, fmt)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=10), st.text(max_size=10), st.text(max_size=10), st.text(max_size=10),
       st.sampled_from(["", " ", "\n\n"]))
def test_parser_matches_reference_on_filled_template(t, a, n, c, ws):
  text = f"<think>{t}</think>{ws}<answer>{a}</answer>{ws}<analysis>{n}</analysis>{ws}<confidence>{c}</confidence>{ws}"
  got = R.parse_completion(text)
  want = ref_parse(text, "rlcr")
  assert got.answer == want[0] and got.well_formed == (want[2] and got.confidence is not None)
  if got.confidence is not None:
    assert got.confidence == want[1]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.sampled_from(R.FORMATS))
def test_parser_never_crashes(text, fmt):
  p = R.parse_completion(text, fmt=fmt)
  assert p.confidence is None or (isinstance(p.confidence, float) and 0.0 <= p.confidence <= 1.0)
  assert isinstance(p.well_formed, bool)
  if fmt == "rlcr" and p.well_formed:
    assert p.confidence is not None and p.answer is not None
  r = R.rlcr_reward(text, "x")
  assert r == R.DEFAULT_RLCR_PENALTY or -1.0 <= r <= 1.0


# ---------------------------------------------------------------------------
# Answer matching

@pytest.mark.parametrize("a, g, same", [
    ("The Eiffel Tower!", "eiffel tower", True),
    ("  an   apple ", "Apple", True),
    ("Paris, France", "paris france", True),
    ("Paris", "London", False),
    ("3.0", "3", True), ("3", "3.000", True), ("1,000", "1000", True), ("1/2", "0.5", True),
    ("-1/2", "-0.5", True), ("\\frac{1}{2}", "0.5", True), ("-\\dfrac{3}{4}", "-0.75", True),
    ("\\boxed{42}", "42", True), ("$42$", "42", True), ("1e3", "1000", True), ("3.", "3", True),
    ("-3", "3", False), ("3.0", "30", False),   # numeric comparison wins over SQuAD's "30" == "30"
    ("1/3", "0.333", False), ("1/0", "1/0", True),  # not numeric -> exact match
    ("1,00", "100", True),                      # "1,00" is not a number; SQuAD strips the comma
    ("0.1", ".1", True), ("12", "1 2", False),
])
def test_answers_match(a, g, same):
  assert R.answers_match(a, g) is same
  assert R.answers_match(g, a) is same


def test_normalize_and_numbers():
  assert R.normalize_answer("The  Quick, brown fox.") == "quick brown fox"
  assert R.parse_number("1,234,567.50") == 1234567.5
  for bad in ["1,2345", "12,34", "abc", "1e5000", "", "1/0", "\u0663", "1 000"]:
    assert R.parse_number(bad) is None, bad
  assert R.answer_key("3.0") == R.answer_key("3") != R.answer_key("30")
  assert R.answer_key("The cat") == R.answer_key("cat")


def test_judge_and_gold_lists():
  prefix = lambda a, g: a.startswith(g)  # noqa: E731
  assert R.is_correct("Paris, France", "Paris", judge=prefix)
  assert not R.is_correct("Paris, France", "Paris")
  assert R.is_correct("NYC", ["New York City", "nyc"])
  assert not R.is_correct(None, "x")
  with pytest.raises(TypeError, match="judge"):
    R.is_correct("a", "a", judge=lambda a, g: 1)
  with pytest.raises(TypeError, match="gold"):
    R.is_correct("a", [])
  with pytest.raises(TypeError, match="gold"):
    R.is_correct("a", 3)


# ---------------------------------------------------------------------------
# Rewards

def test_rlcr_reward_values():
  assert R.rlcr_reward(GOOD, "4") == pytest.approx(1 - 0.2 ** 2, abs=1e-15)
  assert R.rlcr_reward(GOOD, "5") == pytest.approx(-(0.8 ** 2), abs=1e-15)
  assert R.rlcr_reward(GOOD.replace("0.8", "1"), "4") == 1.0
  assert R.rlcr_reward(GOOD.replace("0.8", "1"), "5") == -1.0
  assert R.rlcr_reward(GOOD.replace("0.8", "0"), "5") == 0.0
  assert R.rlcr_reward(GOOD + "!", "4") == R.DEFAULT_RLCR_PENALTY == -2.0
  assert R.rlcr_reward(GOOD + "!", "4", malformed_penalty=-1.5) == -1.5
  assert R.rlcr_reward(GOOD, "four", judge=lambda a, g: {"4": "four"}[a] == g) == pytest.approx(0.96)


def test_rlvr_reward_values():
  ta = "<think>t</think><answer>4</answer>"
  assert R.rlvr_reward(ta, "4") == 1.0
  assert R.rlvr_reward(ta, "5") == 0.0
  assert R.rlvr_reward(GOOD, "4") == R.DEFAULT_RLVR_PENALTY == -1.0
  assert R.rlvr_reward(ta + "x", "4", malformed_penalty=-0.25) == -0.25


@pytest.mark.parametrize("pen", [-1.0, -0.5, 0.0, 1.0, float("nan"), float("-inf")])
def test_rlcr_penalty_validation(pen):
  with pytest.raises(ValueError, match="malformed_penalty"):
    R.rlcr_reward(GOOD, "4", malformed_penalty=pen)


def test_penalty_type_and_rlvr_validation():
  with pytest.raises(TypeError, match="malformed_penalty"):
    R.rlcr_reward(GOOD, "4", malformed_penalty="low")
  with pytest.raises(ValueError, match="malformed_penalty"):
    R.rlvr_reward(GOOD, "4", malformed_penalty=0.0)
  assert R.rlvr_reward(GOOD, "4", malformed_penalty=-1e-3) == -1e-3


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1), st.booleans())
def test_rlcr_reward_formula_and_bounds(q, right):
  text = R.format_completion("4", repr(q), think="t", analysis="a")
  r = R.rlcr_reward(text, "4" if right else "5")
  c = 1.0 if right else 0.0
  assert r == c - (q - c) ** 2
  assert -1.0 <= r <= 1.0 and r > R.DEFAULT_RLCR_PENALTY


def test_expected_reward_is_maximized_by_the_true_probability():
  # Brier is proper: for P(correct) = p the expected reward peaks at q = p.
  q = np.linspace(0, 1, 101)
  for p in [0.0, 0.25, 0.5, 0.73, 1.0]:
    exp_r = p * (1 - (q - 1) ** 2) + (1 - p) * (-(q ** 2))
    assert q[np.argmax(exp_r)] == pytest.approx(p, abs=0.005)


def test_batch_helpers_match_scalar_versions():
  comps = [GOOD, GOOD.replace("0.8", "0.3"), GOOD + "x", "<think>t</think><answer>4</answer>",
           "<think>t</think><answer>5</answer>", ""]
  golds = ["4", "5", "4", "4", ["5", "five"], "4"]
  r = R.rlcr_rewards(comps, golds)
  assert r.dtype == np.float64 and r.shape == (6,)
  np.testing.assert_array_equal(r, [R.rlcr_reward(c, g) for c, g in zip(comps, golds)])
  v = R.rlvr_rewards(comps, golds)
  np.testing.assert_array_equal(v, [R.rlvr_reward(c, g) for c, g in zip(comps, golds)])
  s = R.score_batch(comps, golds)
  assert s.answers == ["4", "4", "4", "4", "5", None]
  np.testing.assert_array_equal(s.correct_N, [True, False, True, True, True, False])
  np.testing.assert_array_equal(s.well_formed_N, [True, True, False, False, False, False])
  np.testing.assert_array_equal(np.isnan(s.confidence_N), [False, False, False, True, True, True])
  with pytest.raises(ValueError, match="golds"):
    R.rlcr_rewards(comps, golds[:-1])
  with pytest.raises(TypeError, match="completions"):
    R.score_batch(GOOD, "4")
  with pytest.raises(ValueError, match="fmt"):
    R.score_batch(comps, golds, fmt="x")


def test_group_advantages():
  r = np.array([1.0, 0.0, 0.5, -2.0, 0.4, 0.4])
  np.testing.assert_allclose(R.group_advantages(r, 3), [0.5, -0.5, 0.0, -1.6, 0.8, 0.8], atol=1e-15)
  np.testing.assert_array_equal(R.group_advantages(r, 1), np.zeros(6))
  for bad in [0, 4, True]:
    with pytest.raises(ValueError, match="group_size"):
      R.group_advantages(r, bad)
  with pytest.raises(ValueError, match="reward_N"):
    R.group_advantages(r.reshape(2, 3), 3)
