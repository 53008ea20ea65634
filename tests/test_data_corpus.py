"""Text / JSONL corpora: loading through datasets, tokenizers, packing, splits, errors."""

import json

import numpy as np
import pytest

from jaxlab.data import DataError, get_task
from jaxlab.data.base import hash_unit
from jaxlab.data.tokenizer import ByteTokenizer, FileTokenizer, load_tokenizer

LINES = [f"line {i}: the quick brown fox {'jumps ' * (i % 4)}over dog number {i * 7}."
         for i in range(60)]


def _write_text(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return path


def _corpus(tmp_path, files, **options):
  return get_task("corpus", data_files=files, cache_dir=str(tmp_path / "hf-cache"), **options)


def _docs_of(stream, eos):
  """Split a packed stream back into documents at <eos>."""
  cuts = np.nonzero(stream == eos)[0]
  out, start = [], 0
  for c in cuts:
    out.append(stream[start:c])
    start = c + 1
  return out


def _byte_texts(docs):
  tok = ByteTokenizer()
  return [tok.decode(d) for d in docs]


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_roundtrip():
  tok = load_tokenizer("byte")
  assert isinstance(tok, ByteTokenizer)
  text = "héllo wörld ✓ \n\t end"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 256
  assert len(ids) == len(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 259)
  assert tok.decode(np.concatenate([[256], ids, [257, 258]])) == text
  assert tok.token_id("<eos>") == 257
  with pytest.raises(DataError, match="<sep>"):
    tok.token_id("<sep>")


def _train_bpe(tmp_path, specials=("<bos>", "<eos>", "<pad>")):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(LINES[:20], trainer=trainer)
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  return path


def test_file_tokenizer(tmp_path):
  path = _train_bpe(tmp_path)
  tok = load_tokenizer(str(path))
  assert isinstance(tok, FileTokenizer)
  ids = tok.encode(LINES[3])
  assert len(ids) < len(LINES[3])                 # merges were learned
  assert tok.decode(ids) == LINES[3]
  assert tok.token_id("<eos>") == 1
  with pytest.raises(DataError, match="<sep>"):
    tok.token_id("<sep>")


def test_tokenizer_file_errors(tmp_path):
  with pytest.raises(DataError, match="missing.json: tokenizer file not found"):
    load_tokenizer(str(tmp_path / "missing.json"))
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(DataError, match="bad.json: not a valid tokenizer.json") as e:
    load_tokenizer(str(bad))
  assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- text corpora


def test_text_corpus_packing(tmp_path):
  path = _write_text(tmp_path / "a.txt", LINES[:30] + [""] + LINES[30:])   # an empty line is skipped
  task = _corpus(tmp_path, str(path), seq_len=32, test_fraction=0.2)
  assert (task.name, task.vocab_size, task.seq_len, task.splits) == ("corpus", 259, 32, ("train", "test"))
  in_test = [hash_unit(t.encode()) < 0.2 for t in LINES]
  assert task.num_documents == {"train": in_test.count(False), "test": in_test.count(True)}

  for split in task.splits:
    n_tok = task.num_tokens(split)
    n_win = task.num_examples(split)
    assert n_win == (n_tok - 1) // 32 > 0
    b = task.batch(split, 0, n_win)           # exactly one epoch
    for k, dt in (("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32)):
      assert b[k].shape == (n_win, 32) and b[k].dtype == dt
    assert (b["loss_mask"] == 1).all()
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    # One epoch visits every window exactly once: reassemble the stream.
    stream = task._stream[split]
    got = sorted(tuple(r) for r in b["inputs"].tolist())
    want = sorted(tuple(stream[w * 32:(w + 1) * 32].tolist()) for w in range(n_win))
    assert got == want
    # The stream is the split's documents, each followed by <eos>, in file order.
    docs = _byte_texts(_docs_of(task._stream[split], 257))
    expect = [t for t, te in zip(LINES, in_test) if te == (split == "test")]
    assert docs == expect


def test_text_corpus_train_order_shuffled_test_in_order(tmp_path):
  path = _write_text(tmp_path / "a.txt", LINES)
  task = _corpus(tmp_path, path, seq_len=16, test_fraction=0.3)
  n = task.num_examples("test")
  t = task.batch("test", 0, n)["inputs"]
  stream = task._stream["test"]
  np.testing.assert_array_equal(t, np.stack([stream[w * 16: w * 16 + 16] for w in range(n)]))
  # Past one epoch the test split wraps around in the same order.
  np.testing.assert_array_equal(task.batch("test", 1, n)["inputs"], t)
  n_tr = task.num_examples("train")
  e0 = task.batch("train", 0, n_tr)["inputs"]
  e1 = task.batch("train", 1, n_tr)["inputs"]
  in_order = np.stack([task._stream["train"][w * 16: w * 16 + 16] for w in range(n_tr)])
  assert not np.array_equal(e0, in_order)
  assert not np.array_equal(e0, e1)                       # reshuffled each epoch
  assert sorted(map(tuple, e0.tolist())) == sorted(map(tuple, e1.tolist()))


def test_corpus_deterministic(tmp_path):
  path = _write_text(tmp_path / "a.txt", LINES)
  a = _corpus(tmp_path, str(path), seq_len=16, seed=5)
  b = _corpus(tmp_path, str(path), seq_len=16, seed=5)
  c = _corpus(tmp_path, str(path), seq_len=16, seed=6)
  for i in range(3):
    np.testing.assert_array_equal(a.batch("train", i, 4)["inputs"], b.batch("train", i, 4)["inputs"])
  np.testing.assert_array_equal(a.batch("train", 1, 4)["inputs"], a.batch("train", 0, 8)["inputs"][4:])
  assert not np.array_equal(a.batch("train", 0, 8)["inputs"], c.batch("train", 0, 8)["inputs"])
  np.testing.assert_array_equal(a.batch("test", 0, 4)["inputs"], c.batch("test", 0, 4)["inputs"])


def test_split_by_hash_keeps_documents_whole(tmp_path):
  dup = LINES + LINES[:10]                                # duplicates land in one split
  path = _write_text(tmp_path / "a.txt", dup)
  task = _corpus(tmp_path, path, seq_len=16, test_fraction=0.3)
  train = set(_byte_texts(_docs_of(task._stream["train"], 257)))
  test = set(_byte_texts(_docs_of(task._stream["test"], 257)))
  assert not train & test
  assert train | test == set(LINES)
  assert 0.1 < len(test) / len(LINES) < 0.5


def test_split_by_fraction_and_bos(tmp_path):
  path = _write_text(tmp_path / "a.txt", LINES)
  task = _corpus(tmp_path, path, seq_len=16, split_by="fraction", test_fraction=0.1, add_bos=True)
  assert task.num_documents == {"train": 54, "test": 6}
  test_stream = task._stream["test"]
  assert test_stream[0] == 256 and test_stream[-1] == 257
  docs = _byte_texts(_docs_of(test_stream, 257))
  assert docs == LINES[54:]
  assert (test_stream == 256).sum() == 6


def test_no_test_split(tmp_path):
  path = _write_text(tmp_path / "a.txt", LINES)
  task = _corpus(tmp_path, path, seq_len=16, test_fraction=0.0, add_eos=False)
  assert task.splits == ("train",)
  assert task.num_tokens("train") == sum(len(t.encode()) for t in LINES)
  with pytest.raises(ValueError, match="'test'"):
    task.batch("test", 0, 2)


def test_sample_by_document_and_glob(tmp_path):
  for i in range(4):
    _write_text(tmp_path / f"doc{i}.txt", LINES[i * 10:(i + 1) * 10])
  task = _corpus(tmp_path, str(tmp_path / "doc*.txt"), sample_by="document", seq_len=16,
                 split_by="fraction", test_fraction=0.25)
  assert task.files == [str(tmp_path / f"doc{i}.txt") for i in range(4)]
  assert task.num_documents == {"train": 3, "test": 1}
  docs = _byte_texts(_docs_of(task._stream["test"], 257))
  assert docs == ["\n".join(LINES[30:40]) + "\n"]


# ----------------------------------------------------------------------------- JSON lines


def test_jsonl_text_field(tmp_path):
  records = [{"id": i, "body": t} for i, t in enumerate(LINES)]
  path = _write_jsonl(tmp_path / "a.jsonl", records)
  task = _corpus(tmp_path, path, text_field="body", seq_len=16, split_by="fraction",
                 test_fraction=0.5)
  assert _byte_texts(_docs_of(task._stream["train"], 257)) == LINES[:30]
  # Several files, text and JSON lines mixed, each by its extension.
  txt = _write_text(tmp_path / "b.txt", ["extra one", "extra two"])
  both = _corpus(tmp_path, [path, txt], text_field="body", seq_len=16, split_by="fraction",
                 test_fraction=0.5)
  assert sum(both.num_documents.values()) == 62
  assert _byte_texts(_docs_of(both._stream["test"], 257))[-2:] == ["extra one", "extra two"]


def test_jsonl_with_bpe_tokenizer(tmp_path):
  tok_path = _train_bpe(tmp_path)
  path = _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in LINES])
  task = _corpus(tmp_path, path, tokenizer=str(tok_path), seq_len=16, add_bos=True)
  tok = FileTokenizer(tok_path)
  assert task.vocab_size == tok.vocab_size <= 300
  b = task.batch("train", 0, 4)
  assert b["inputs"].max() < task.vocab_size
  stream = task._stream["train"]
  docs = _docs_of(stream, tok.token_id("<eos>"))
  texts = [tok.decode(d[1:]) for d in docs]             # drop <bos>
  assert all(d[0] == tok.token_id("<bos>") for d in docs)
  assert set(texts) <= set(LINES) and len(texts) == task.num_documents["train"]


def test_tokenizer_without_eos_token(tmp_path):
  tok_path = _train_bpe(tmp_path, specials=("<unk>",))
  path = _write_text(tmp_path / "a.txt", LINES)
  with pytest.raises(DataError, match="no token '<eos>'.*eos_token="):
    _corpus(tmp_path, path, tokenizer=str(tok_path), seq_len=16)
  task = _corpus(tmp_path, path, tokenizer=str(tok_path), seq_len=16, eos_token="<unk>")
  assert task.num_tokens("train") > 0


# ----------------------------------------------------------------------------- errors


def _one_line_error(match, fn):
  with pytest.raises(DataError, match=match) as e:
    fn()
  assert "\n" not in str(e.value)
  assert isinstance(e.value, ValueError)
  return str(e.value)


def test_missing_and_malformed_files(tmp_path):
  missing = tmp_path / "nope.txt"
  _one_line_error("nope.txt: data file not found", lambda: _corpus(tmp_path, missing))
  _one_line_error("no file matches", lambda: _corpus(tmp_path, str(tmp_path / "*.md")))
  _one_line_error("not a regular file", lambda: _corpus(tmp_path, tmp_path))

  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\nthis is not json\n')
  _one_line_error("bad.jsonl: cannot read as JSON lines", lambda: _corpus(tmp_path, bad))

  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  _one_line_error("empty.jsonl", lambda: _corpus(tmp_path, empty))

  nofield = _write_jsonl(tmp_path / "nofield.jsonl", [{"body": t} for t in LINES])
  _one_line_error("nofield.jsonl: no field 'text'.*body", lambda: _corpus(tmp_path, nofield))

  typed = _write_jsonl(tmp_path / "typed.jsonl", [{"text": 3}, {"text": 4}])
  _one_line_error("typed.jsonl: record 0", lambda: _corpus(tmp_path, typed))

  good = _write_text(tmp_path / "good.txt", LINES)
  msg = _one_line_error("bad.jsonl", lambda: _corpus(tmp_path, [good, bad]))
  assert "good.txt" not in msg                          # names the file at fault


def test_split_too_small(tmp_path):
  path = _write_text(tmp_path / "a.txt", LINES[:3])
  _one_line_error("split 'test' has .* tokens", lambda: _corpus(tmp_path, path, seq_len=64,
                                                              split_by="fraction"))
  blank = _write_text(tmp_path / "blank.txt", ["", "", ""])
  _one_line_error("no non-empty documents", lambda: _corpus(tmp_path, blank))


def test_bad_corpus_options(tmp_path):
  path = _write_text(tmp_path / "a.txt", LINES)
  with pytest.raises(ValueError, match="data_files"):
    get_task("corpus")
  with pytest.raises(ValueError, match="format"):
    _corpus(tmp_path, path, format="csv")
  with pytest.raises(ValueError, match="test_fraction"):
    _corpus(tmp_path, path, test_fraction=1.0)
  with pytest.raises(ValueError, match="'textfield'"):
    _corpus(tmp_path, path, textfield="x")
  with pytest.raises(ValueError, match="split_by"):
    _corpus(tmp_path, path, split_by="random")
