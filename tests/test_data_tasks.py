"""Synthetic tasks (MQAR, flip-flop, S5/A5) and the exact-match metric."""

import itertools

import numpy as np
import pytest

from jaxlab.config import ConfigError
from jaxlab.data import (DataError, exact_match, exact_match_counts, exact_match_from_counts,
                         get_task, known_tasks, parse_task_options, task_options)
from jaxlab.data.synthetic import (FF_IGNORE, FF_READ, FF_WRITE, HOLDOUT, SyntheticTask,
                                   permutation_group)

SMALL = {
    "mqar": dict(num_kv_pairs=4, seq_len=24, vocab_size=32),
    "flipflop": dict(seq_len=32),
    "s5": dict(seq_len=8),
    "a5": dict(seq_len=8),
}
SYNTHETIC = sorted(SMALL)


def test_known_tasks():
  assert known_tasks() == ["a5", "corpus", "flipflop", "mqar", "s5"]


@pytest.mark.parametrize("name", SYNTHETIC)
def test_defaults_shapes_dtypes(name):
  task = get_task(name)
  assert task.name == name
  expected = {"mqar": (64, 32), "flipflop": (5, 512), "s5": (120, 16), "a5": (60, 16)}[name]
  assert (task.vocab_size, task.seq_len) == expected
  for split in task.splits:
    b = task.batch(split, 3, 5)
    assert set(b) == {"inputs", "targets", "loss_mask"}
    for k, dt in (("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32)):
      assert b[k].shape == (5, task.seq_len), (k, b[k].shape)
      assert b[k].dtype == dt, (k, b[k].dtype)
    assert b["inputs"].min() >= 0 and b["inputs"].max() < task.vocab_size
    assert b["targets"].min() >= 0 and b["targets"].max() < task.vocab_size
    assert set(np.unique(b["loss_mask"])) <= {0.0, 1.0}
    assert (b["loss_mask"].sum(axis=1) >= 1).all()
    assert task.num_examples(split) is None


def test_splits():
  assert get_task("mqar").splits == ("train", "test")
  assert get_task("s5").splits == ("train", "test")
  assert get_task("flipflop").splits == ("train", "test", "test_ood_sparse", "test_ood_dense")


@pytest.mark.parametrize("name", SYNTHETIC)
def test_deterministic(name):
  a = get_task(name, seed=3, **SMALL[name])
  b = get_task(name, seed=3, **SMALL[name])
  for split in a.splits:
    x, y = a.batch(split, 2, 8), b.batch(split, 2, 8)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
    # Example-level determinism: batch 1 of size 4 is examples 4..7.
    big = a.batch(split, 0, 8)
    small = a.batch(split, 1, 4)
    for k in x:
      np.testing.assert_array_equal(big[k][4:], small[k])
  # Another seed, index or split gives other sequences.
  other_seed = get_task(name, seed=4, **SMALL[name]).batch("train", 2, 8)["inputs"]
  assert not np.array_equal(other_seed, a.batch("train", 2, 8)["inputs"])
  assert not np.array_equal(a.batch("train", 3, 8)["inputs"], a.batch("train", 2, 8)["inputs"])
  assert not np.array_equal(a.batch("test", 2, 8)["inputs"], a.batch("train", 2, 8)["inputs"])


def _rows(task, split, n, bs=100):
  seqs = [task.example_sequence(split, i) for i in range(n)]
  return {tuple(s.tolist()) for s in seqs}, seqs


@pytest.mark.parametrize("name,options,n_train,n_test", [
    ("s5", dict(seq_len=2), 1500, 400),                      # 14,400 sequences in all
    ("a5", dict(seq_len=2), 800, 200),                       # 3,600
    ("flipflop", dict(seq_len=10, p_write=0.3, p_read=0.3, p_ignore=0.4), 600, 200),
    ("mqar", dict(num_kv_pairs=2, seq_len=6, vocab_size=7, num_queries=1), 600, 200),
])
def test_train_test_disjoint(name, options, n_train, n_test):
  """Small sequence spaces: independent draws would collide often; the hash split forbids it."""
  task = get_task(name, **options)
  train, train_seqs = _rows(task, "train", n_train)
  test, test_seqs = _rows(task, "test", n_test)
  assert len(train) > 50 and len(test) > 20   # the space is small enough to repeat
  assert not train & test
  assert all(SyntheticTask.is_heldout_sequence(s) for s in test_seqs)
  assert not any(SyntheticTask.is_heldout_sequence(s) for s in train_seqs)
  if name == "flipflop":
    for split in ("test_ood_sparse", "test_ood_dense"):
      ood, _ = _rows(task, split, 50)
      assert not train & ood


def test_holdout_share_of_space():
  """About HOLDOUT of all S5 sequences of length 2 are held out (the hash is unbiased)."""
  n = 120
  held = sum(SyntheticTask.is_heldout_sequence(np.array([a, b])) for a in range(n) for b in range(n))
  share = held / n ** 2
  # Binomial std of the share is ~0.0036; allow 5 sigma.
  assert abs(share - HOLDOUT) < 0.02, share


def test_space_too_small_raises():
  # flip-flop of length 4 ("w b r b") has 2 sequences, and the hash puts both in one bucket.
  seqs = [np.array([FF_WRITE, b, FF_READ, b]) for b in (0, 1)]
  buckets = {SyntheticTask.is_heldout_sequence(s) for s in seqs}
  assert len(buckets) == 1
  empty = "train" if buckets == {True} else "test"
  task = get_task("flipflop", seq_len=4)
  task.example_sequence("test" if empty == "train" else "train", 0)
  with pytest.raises(DataError, match="too small"):
    task.example_sequence(empty, 0)


# ----------------------------------------------------------------------------- MQAR


@pytest.mark.parametrize("options", [{}, dict(num_kv_pairs=8, seq_len=64, vocab_size=128),
                                     dict(num_kv_pairs=6, num_queries=3, seq_len=40, vocab_size=20)])
def test_mqar_targets(options):
  task = get_task("mqar", **options)
  c = task.config
  n, q = c.num_kv_pairs, c.queries
  half = (c.vocab_size - 1) // 2
  for split in task.splits:
    b = task.batch(split, 0, 32)
    x, y, m = b["inputs"], b["targets"], b["loss_mask"]
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])        # a language-model sequence
    for row in range(x.shape[0]):
      keys, values = x[row, 0:2 * n:2], x[row, 1:2 * n:2]
      assert len(set(keys.tolist())) == n                      # distinct keys
      assert ((keys >= 1) & (keys <= half)).all()              # disjoint token ranges
      assert ((values > half) & (values < c.vocab_size)).all()
      lookup = dict(zip(keys.tolist(), values.tolist()))
      scored = np.nonzero(m[row])[0]
      assert len(scored) == q
      assert (scored >= 2 * n).all()
      asked = [int(x[row, t]) for t in scored]
      assert len(set(asked)) == q
      for t in scored:
        assert y[row, t] == lookup[int(x[row, t])]
      # Outside the queries the query region is filler.
      region = np.ones(c.seq_len, bool)
      region[:2 * n] = False
      region[scored] = False
      region[scored + 1] = False
      assert (x[row, region] == 0).all()


def test_mqar_bad_options():
  with pytest.raises(ValueError, match="num_queries"):
    get_task("mqar", num_kv_pairs=4, num_queries=5)
  with pytest.raises(ValueError, match="vocab_size"):
    get_task("mqar", num_kv_pairs=8, vocab_size=16)
  with pytest.raises(ValueError, match="seq_len"):
    get_task("mqar", num_kv_pairs=8, seq_len=20)
  with pytest.raises(ValueError, match="num_kv_pairs"):
    get_task("mqar", num_kv_pairs=0)
  get_task("mqar", num_kv_pairs=8, vocab_size=17, seq_len=31)     # the smallest that fits


# ----------------------------------------------------------------------------- flip-flop


def _simulate_flipflop(seq):
  """Independent reference: the expected bit at each read, by a plain loop."""
  memory = None
  expected = {}
  for pos in range(0, len(seq), 2):
    op, bit = seq[pos], seq[pos + 1]
    if op == FF_WRITE:
      memory = bit
    elif op == FF_READ:
      expected[pos] = memory
    else:
      assert op == FF_IGNORE
  return expected


@pytest.mark.parametrize("split", ["train", "test", "test_ood_sparse", "test_ood_dense"])
def test_flipflop_targets(split):
  task = get_task("flipflop", seq_len=64)
  b = task.batch(split, 0, 32)
  x, y, m = b["inputs"], b["targets"], b["loss_mask"]
  np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
  assert (m[:, -1] == 0).all()
  for row in range(x.shape[0]):
    seq = x[row]
    assert seq[0] == FF_WRITE and seq[-2] == FF_READ
    assert set(seq[1::2].tolist()) <= {0, 1}
    expected = _simulate_flipflop(seq)
    assert sorted(np.nonzero(m[row])[0].tolist()) == sorted(expected)
    for pos, bit in expected.items():
      assert y[row, pos] == bit == seq[pos + 1]


@pytest.mark.parametrize("split,p_ignore", [("train", 0.8), ("test", 0.8),
                                            ("test_ood_sparse", 0.98), ("test_ood_dense", 0.1)])
def test_flipflop_split_probabilities(split, p_ignore):
  task = get_task("flipflop", seq_len=512)
  ops = task.batch(split, 0, 40)["inputs"][:, 2:-2:2]     # instructions, first and last fixed
  share = float((ops == FF_IGNORE).mean())
  n = ops.size
  sigma = np.sqrt(p_ignore * (1 - p_ignore) / n)
  assert abs(share - p_ignore) < 6 * sigma + 1e-3, (share, p_ignore)
  writes, reads = (ops == FF_WRITE).mean(), (ops == FF_READ).mean()
  assert abs(writes - reads) < 12 * np.sqrt((1 - p_ignore) / 2 / n) + 1e-3


def test_flipflop_custom_probabilities():
  task = get_task("flipflop", seq_len=256, p_write=0.5, p_read=0.25, p_ignore=0.25)
  ops = task.batch("train", 0, 40)["inputs"][:, 2:-2:2]
  assert abs((ops == FF_WRITE).mean() - 0.5) < 0.03
  assert abs((ops == FF_READ).mean() - 0.25) < 0.03
  ood = task.batch("test_ood_dense", 0, 40)["inputs"][:, 2:-2:2]   # fixed FFL(0.1)
  assert abs((ood == FF_IGNORE).mean() - 0.1) < 0.03


def test_flipflop_bad_options():
  with pytest.raises(ValueError, match="p_ignore"):
    get_task("flipflop", p_write=0.2, p_read=0.2, p_ignore=0.2)
  with pytest.raises(ValueError, match="p_read"):
    get_task("flipflop", p_write=0.5, p_read=-0.1, p_ignore=0.6)
  with pytest.raises(ValueError, match="seq_len"):
    get_task("flipflop", seq_len=63)


# ----------------------------------------------------------------------------- S5 / A5


def _perm_matrix(p):
  """Column i has its 1 at row p[i]: M @ e_i = e_{p[i]}."""
  m = np.zeros((5, 5), np.int64)
  m[list(p), list(range(5))] = 1
  return m


def _matrix_perm(m):
  return tuple(int(np.argmax(m[:, i])) for i in range(5))


@pytest.mark.parametrize("group,order", [("s5", 120), ("a5", 60)])
def test_group_elements(group, order):
  perms, table = permutation_group(group)
  assert perms.shape == (order, 5)
  assert len({tuple(p) for p in perms.tolist()}) == order
  assert tuple(perms[0]) == (0, 1, 2, 3, 4)                 # id 0 is the identity
  dets = [round(np.linalg.det(_perm_matrix(p))) for p in perms]
  if group == "a5":
    assert all(d == 1 for d in dets)                          # even permutations only
  else:
    assert sorted(set(dets)) == [-1, 1]
  assert table.shape == (order, order)
  for row in table:                                           # a Latin square: a group
    assert sorted(row.tolist()) == list(range(order))


@pytest.mark.parametrize("group", ["s5", "a5"])
def test_word_problem_targets(group):
  """Running product recomputed with permutation matrices (independent of the table)."""
  task = get_task(group, seq_len=12)
  index = {tuple(p): i for i, p in enumerate(task.perms.tolist())}
  for split in task.splits:
    b = task.batch(split, 1, 16)
    assert (b["loss_mask"] == 1).all()
    for row in range(16):
      state = np.eye(5, dtype=np.int64)
      for t in range(task.seq_len):
        g = task.perms[b["inputs"][row, t]]
        state = _perm_matrix(g) @ state                       # apply g after the state so far
        assert b["targets"][row, t] == index[_matrix_perm(state)]


def test_word_problem_order_convention():
  """target = 'g1 then g2': (g1 then g2)(i) = g2(g1(i)); for non-commuting g1, g2 it is not g1(g2(i))."""
  task = get_task("s5", seq_len=2)
  perms = task.perms.tolist()
  found = False
  for i in range(4):
    b = task.batch("train", i, 32)
    for (g1, g2), s in zip(b["inputs"], b["targets"][:, 1]):
      p1, p2 = perms[g1], perms[g2]
      assert perms[s] == [p2[p1[k]] for k in range(5)]
      found |= [p1[p2[k]] for k in range(5)] != perms[s]
  assert found


# ----------------------------------------------------------------------------- errors


def test_bad_names_and_options():
  with pytest.raises(ValueError, match="'nope'"):
    get_task("nope")
  with pytest.raises(ValueError, match="'num_kv'"):
    get_task("mqar", num_kv=3)
  with pytest.raises(ValueError, match="seq_len"):
    get_task("s5", seq_len="16")
  with pytest.raises(ValueError, match="seq_len"):
    get_task("a5", seq_len=0)
  with pytest.raises(ValueError, match="seed"):
    get_task("s5", seed=-1)
  with pytest.raises(ValueError, match="seed"):
    get_task("s5", seed=1.5)
  assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)


def test_bad_batch_arguments():
  task = get_task("s5", seq_len=4)
  with pytest.raises(ValueError, match="'valid'"):
    task.batch("valid", 0, 2)
  with pytest.raises(ValueError, match="index"):
    task.batch("train", -1, 2)
  with pytest.raises(ValueError, match="batch_size"):
    task.batch("train", 0, 0)
  with pytest.raises(ValueError, match="split"):
    get_task("flipflop", seq_len=8).num_examples("test_ood")


def test_task_options_and_parsing():
  assert task_options("mqar") == dict(num_kv_pairs=4, seq_len=32, vocab_size=64, num_queries=None)
  assert task_options("flipflop")["p_ignore"] == 0.8
  opts = parse_task_options("mqar", ["num_kv_pairs=4", "num_queries=none", "vocab_size = 64"])
  assert opts == dict(num_kv_pairs=4, num_queries=None, vocab_size=64)
  assert parse_task_options("flipflop", ["p_ignore=0.9"]) == {"p_ignore": 0.9}
  assert parse_task_options("corpus", ["data_files=a.txt,b.txt", "add_bos=true"]) == {
      "data_files": ("a.txt", "b.txt"), "add_bos": True}
  with pytest.raises(ValueError, match="'bogus'"):
    parse_task_options("s5", ["bogus=1"])
  with pytest.raises(ValueError, match="seq_len"):
    parse_task_options("s5", ["seq_len=abc"])
  with pytest.raises(ValueError, match="key=value"):
    parse_task_options("s5", ["seq_len"])
  get_task("mqar", **opts)


# ----------------------------------------------------------------------------- metric


def test_exact_match_hand_cases():
  targets = np.array([[1, 2, 3, 4],
                      [1, 2, 3, 4],
                      [5, 5, 5, 5],
                      [7, 7, 7, 7]])
  mask = np.array([[0, 1, 1, 0],
                   [0, 1, 1, 0],
                   [1, 1, 1, 1],
                   [0, 0, 0, 0]], np.float32)              # last row: nothing scored
  pred = np.array([[9, 2, 3, 9],                          # right where scored: counts
                   [1, 2, 0, 4],                          # one scored miss: does not
                   [5, 5, 5, 5],                          # all right
                   [0, 0, 0, 0]])                         # unscored: ignored
  m = exact_match(pred, targets, mask)
  assert set(m) == {"exact_match", "token_accuracy"}
  assert m["exact_match"] == pytest.approx(2 / 3)
  assert m["token_accuracy"] == pytest.approx(7 / 8)
  counts = exact_match_counts(pred, targets, mask)
  assert counts == dict(examples=3, exact_examples=2, tokens=8, right_tokens=7)
  # Counts add across batches.
  total = {k: 2 * v for k, v in counts.items()}
  assert exact_match_from_counts(total) == m


def test_exact_match_all_right_and_all_wrong():
  t = np.arange(12).reshape(3, 4)
  mask = np.ones((3, 4))
  assert exact_match(t, t, mask) == {"exact_match": 1.0, "token_accuracy": 1.0}
  assert exact_match(t + 1, t, mask) == {"exact_match": 0.0, "token_accuracy": 0.0}


def test_exact_match_accepts_jax_arrays():
  import jax.numpy as jnp
  t = jnp.array([[1, 2], [3, 4]], jnp.int32)
  m = exact_match(jnp.array([[1, 2], [3, 0]]), t, jnp.ones((2, 2)))
  assert m == {"exact_match": 0.5, "token_accuracy": 0.75}


def test_exact_match_errors():
  t = np.zeros((2, 3), np.int32)
  with pytest.raises(ValueError, match="no scored"):
    exact_match(t, t, np.zeros((2, 3)))
  with pytest.raises(ValueError, match="shapes"):
    exact_match(t[:, :2], t, np.ones((2, 3)))
  with pytest.raises(ValueError, match="pred_BT"):
    exact_match(np.zeros((2, 3, 5)), t, np.ones((2, 3)))
  with pytest.raises(ValueError, match="argmax"):
    exact_match(t.astype(np.float32), t, np.ones((2, 3)))


def test_metric_on_task_batch():
  """Predicting the targets gives 1.0; corrupting one scored position per example gives 0."""
  task = get_task("mqar", **SMALL["mqar"])
  b = task.batch("test", 0, 16)
  assert exact_match(b["targets"], b["targets"], b["loss_mask"])["exact_match"] == 1.0
  pred = b["targets"].copy()
  first = b["loss_mask"].argmax(axis=1)
  pred[np.arange(16), first] += 1
  m = exact_match(pred, b["targets"], b["loss_mask"])
  q = task.config.queries
  assert m["exact_match"] == 0.0
  assert m["token_accuracy"] == pytest.approx((q - 1) / q)

