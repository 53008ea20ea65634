"""jaxlab.tokenizer (the checkpoint's tokenizer + chat template) and the `jaxlab generate` /
`jaxlab chat` commands on a tiny saved checkpoint with a BPE tokenizer trained here."""

import io
import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from jaxlab import cli  # noqa: E402
from jaxlab.models import _hf_testing as T  # noqa: E402
from jaxlab.models import hf  # noqa: E402
from jaxlab.models.hf import CheckpointError  # noqa: E402
from jaxlab.tokenizer import load_tokenizer  # noqa: E402

TEXT = "hello world, naïve café 東京 jumps"
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tiny_llama"))
  return d, T.save_tiny_checkpoint(d, "llama")


@pytest.fixture(scope="module")
def ckpt(saved):
  return saved[0]


@pytest.fixture(scope="module")
def model(saved):
  """The transformers model: the independent reference for what the CLI prints."""
  return saved[1]


def test_tokenizer_matches_transformers(ckpt):
  from transformers import AutoTokenizer

  tok = load_tokenizer(ckpt)
  ref = AutoTokenizer.from_pretrained(ckpt)
  assert type(tok.hf) is type(ref)  # the class AutoTokenizer picks, without importing torch
  ids = tok.encode(TEXT)
  assert ids == ref.encode(TEXT) and len(ids) > 5
  assert tok.decode(ids) == TEXT
  assert tok.eos_ids == (0,)  # generation_config.json and the tokenizer agree on <|endoftext|>
  assert tok.vocab_size <= T.TINY["vocab_size"]
  msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
  text = tok.apply_chat_template(msgs, tokenize=False)
  assert text == "<|system|>be brief<|end|><|user|>hi there<|end|><|assistant|>"
  assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  chat_ids = tok.apply_chat_template(msgs)
  assert chat_ids == ref.encode(text, add_special_tokens=False)
  assert tok.decode(chat_ids, skip_special_tokens=False) == text
  assert chat_ids[0] == ref.convert_tokens_to_ids("<|system|>")


def test_named_tokenizer_class_goes_through_auto(ckpt, tmp_path):
  import shutil
  from transformers import AutoTokenizer

  d = tmp_path / "gpt2cls"
  shutil.copytree(ckpt, d)
  cfg = json.load(open(d / "tokenizer_config.json"))
  cfg["tokenizer_class"] = "GPT2Tokenizer"
  json.dump(cfg, open(d / "tokenizer_config.json", "w"))
  tok, ref = load_tokenizer(str(d)), AutoTokenizer.from_pretrained(str(d))
  assert type(tok.hf).__name__ == type(ref).__name__ == "GPT2Tokenizer"
  assert tok.encode(TEXT) == ref.encode(TEXT)


def test_stream_decoder_pieces(ckpt):
  tok = load_tokenizer(ckpt)
  ids = tok.encode(TEXT)
  dec = tok.stream_decoder()
  pieces = [dec.push(i) for i in ids] + [dec.flush()]
  assert "".join(pieces) == TEXT
  assert not any("\ufffd" in p for p in pieces)  # multi-byte characters wait for all bytes
  assert sum(1 for p in pieces if p) > 5  # it really streams


def test_tokenizer_errors(ckpt, tmp_path):
  with pytest.raises(CheckpointError, match="no tokenizer files"):
    load_tokenizer(str(tmp_path))
  d = tmp_path / "nochat"
  T.make_tokenizer(chat_template=None).save_pretrained(str(d))
  tok = load_tokenizer(str(d))
  assert tok.chat_template is None
  with pytest.raises(CheckpointError, match="no chat template"):
    tok.apply_chat_template([{"role": "user", "content": "x"}])


def _expected(model, tok, prompt_ids, n):
  """Greedy continuation by transformers (stops after an EOS, like the CLI)."""
  import torch
  from transformers import GenerationConfig

  gc = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=list(tok.eos_ids),
                        pad_token_id=0)
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt_ids]), generation_config=gc)
  return tok.decode(out[0, len(prompt_ids):].tolist())


def test_generate_command_greedy(ckpt, model, capsys):
  tok = load_tokenizer(ckpt)
  rc = cli.main(["generate", "--model", ckpt, "--prompt", "hello world", "--max-new-tokens", "12"])
  out = capsys.readouterr().out
  assert rc == 0
  want = _expected(model, tok, tok.encode("hello world"), 12)
  assert len(want) > 0 and out == want + "\n"
  rc = cli.main(["generate", "--model", ckpt, "--prompt", "hello world", "--chat",
                 "--max-new-tokens", "12"])
  out = capsys.readouterr().out
  chat_ids = tok.apply_chat_template([{"role": "user", "content": "hello world"}])
  assert rc == 0 and out == _expected(model, tok, chat_ids, 12) + "\n"


def test_generate_command_sampling_is_seeded(ckpt, capsys):
  args = ["generate", "--model", ckpt, "--prompt", "the quick", "--max-new-tokens", "16",
          "--temperature", "1.0", "--top-k", "50", "--top-p", "0.95", "--stats"]
  outs = []
  for seed in ("3", "3", "4"):
    assert cli.main(args + ["--seed", seed]) == 0
    cap = capsys.readouterr()
    outs.append(cap.out)
    assert "tokens/s" in cap.err
  assert outs[0] == outs[1] and outs[0] != outs[2]


def test_chat_command_keeps_history(ckpt, model, capsys, monkeypatch):
  tok = load_tokenizer(ckpt)
  monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nhow are you\n"))
  rc = cli.main(["chat", "--model", ckpt, "--max-new-tokens", "8", "--system", "be brief"])
  out = capsys.readouterr().out
  assert rc == 0
  sys_msg = [{"role": "system", "content": "be brief"}]
  h = [{"role": "user", "content": "hello"}]
  r1 = _expected(model, tok, tok.apply_chat_template(sys_msg + h), 8)
  h += [{"role": "assistant", "content": r1}, {"role": "user", "content": "how are you"}]
  r2 = _expected(model, tok, tok.apply_chat_template(sys_msg + h), 8)
  assert out == r1 + "\n" + r2 + "\n"


def test_cli_help_and_bad_input(ckpt, capsys, monkeypatch):
  from jaxlab.commands import generate as gen_cmd

  monkeypatch.setitem(gen_cmd.DECODE_IMPLS, "future", None)  # a registered, unbuilt impl
  for cmd in ("generate", "chat"):
    with pytest.raises(SystemExit) as e:
      cli.main([cmd, "--help"])
    assert e.value.code == 0
    assert "--model" in capsys.readouterr().out
  cases = [
      (["--impl", "future"], "--impl future is not available yet"),
      (["--max-new-tokens", "0"], "--max-new-tokens"),
      (["--top-p", "1.5"], "top_p"),
      (["--max-new-tokens", "5000"], "exceeds the model's context"),
  ]
  for extra, needle in cases:
    rc = cli.main(["generate", "--model", ckpt, "--prompt", "hi"] + extra)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and needle in err, (extra, err)
  rc = cli.main(["generate", "--model", os.path.join(ckpt, "nope"), "--prompt", "hi"])
  assert rc == 2 and "not a directory" in capsys.readouterr().err


def test_save_carries_tokenizer(ckpt, tmp_path):
  out = tmp_path / "copy"
  hf.save(hf.load(ckpt), str(out))
  for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json"):
    assert (out / f).read_bytes() == open(os.path.join(ckpt, f), "rb").read(), f
  cfg = json.load(open(out / "config.json"))
  assert cfg["eos_token_id"] == 0 and cfg["architectures"] == ["LlamaForCausalLM"]
  assert load_tokenizer(str(out)).encode(TEXT) == load_tokenizer(ckpt).encode(TEXT)


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_generate_command_with_adapter(ckpt, tmp_path, capsys):
  """--adapter merges a PEFT adapter: the output is transformers + peft's greedy text."""
  import peft  # in the test extra: a missing install must fail, not skip
  import jax
  from flax import nnx
  from jaxlab.models import lora

  m = hf.load(ckpt)
  lora.apply_lora(m, lora.LoRAConfig(rank=4, targets=("q_proj", "v_proj", "down_proj")),
                  rngs=nnx.Rngs(0))
  for i, (_, mm) in enumerate(lora.lora_modules(m)):
    mm.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(i), mm.lora_b[...].shape)
  ad = str(tmp_path / "adapter")
  lora.save_adapters(m, ad)
  rc = cli.main(["generate", "--model", ckpt, "--prompt", "hello world", "--max-new-tokens", "12",
                 "--adapter", ad])
  out = capsys.readouterr().out
  tok = load_tokenizer(ckpt)
  ref = peft.PeftModel.from_pretrained(T.make_hf_model("llama"), ad).eval()
  want = _expected(ref, tok, tok.encode("hello world"), 12)
  assert rc == 0 and out == want + "\n"
  plain = _expected(T.make_hf_model("llama"), tok, tok.encode("hello world"), 12)
  assert want != plain  # the adapter changes the output


def test_generate_command_pallas_impl(ckpt, model, tmp_path, capsys):
  """--impl pallas (the batch-1 decode kernels, interpreted on CPU) prints the same greedy
  text; a model those kernels cannot run is a one-line error."""
  tok = load_tokenizer(ckpt)
  rc = cli.main(["generate", "--model", ckpt, "--prompt", "hello world", "--max-new-tokens", "10",
                 "--impl", "pallas"])
  out = capsys.readouterr().out
  assert rc == 0 and out == _expected(model, tok, tok.encode("hello world"), 10) + "\n"
  q3 = str(tmp_path / "qwen3")
  T.save_tiny_checkpoint(q3, "qwen3")
  capsys.readouterr()  # drop transformers' progress output
  rc = cli.main(["generate", "--model", q3, "--prompt", "hi", "--impl", "pallas"])
  err = capsys.readouterr().err
  assert rc == 2 and err.count("\n") == 1 and "--impl pallas" in err and "qk_norm" in err


@pytest.mark.slow   # ~10 s; default run under 15 min (the --impl pallas test stays); CI runs it
def test_generate_command_pallas_int8_impl(ckpt, capsys):
  """--impl pallas-int8 prints what the int8 decoder computes through the Python API
  (the XLA form of the same int8 step; greedy, no EOS in 10 tokens or stopped at it)."""
  from jaxlab.models import hf
  from jaxlab.models.decode import make_decoder
  tok = load_tokenizer(ckpt)
  prompt = tok.encode("hello world")
  rc = cli.main(["generate", "--model", ckpt, "--prompt", "hello world", "--max-new-tokens", "10",
                 "--impl", "pallas-int8"])
  out = capsys.readouterr().out
  dec = make_decoder(hf.load(ckpt), "xla", len(prompt) + 10, quantize="int8")
  logits, state = dec.prefill(prompt)
  ids = [int(np.argmax(logits))]
  while len(ids) < 10 and ids[-1] not in tok.eos_ids:
    logits, _, state = dec.step(state, ids[-1])
    ids.append(int(np.argmax(logits)))
  assert rc == 0 and out == tok.decode(ids) + "\n"
  # The tiny model's greedy text is the same unquantized: check that the CLI's decoder
  # really holds int8 weights.
  from jaxlab.commands import generate as gen_cmd
  decs = [s.dec for k, s in gen_cmd._STREAMER_CACHE.items() if k[0] == "pallas-int8"]
  assert decs and decs[-1].impl == "pallas"
  assert decs[-1].weights["layers"][0]["w_qkv_t"].dtype == np.int8
