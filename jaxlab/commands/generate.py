"""`jaxlab generate` and `jaxlab chat`: stream text from a local Hugging Face checkpoint."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

# --impl NAME -> "module:attribute" of a streamer class with the interface of
# jaxlab.models.generate.Streamer: cls(model, *, max_len, sampling, seed) whose
# .stream(prompt_ids, max_new_tokens, eos_ids) yields token ids. None = not built yet.
# A ValueError from the constructor (a model the implementation cannot run) is
# reported as a one-line user error.
DECODE_IMPLS: dict[str, str | None] = {
    "xla": "jaxlab.models.generate:Streamer",
    "pallas": "jaxlab.models.decode:DecodeStreamer",  # batch-1 Pallas kernels (FlashFormer)
    "pallas-int8": "jaxlab.models.decode:Int8DecodeStreamer",  # the same, int8 weight-only
}
_DTYPES = ("float32", "bfloat16", "float16")
# Compiled decoders, reused when the same model structure, length bucket and sampling
# come back in one process (tests, notebooks calling jaxlab.cli.main); weights and
# the RNG key are replaced on reuse. Keyed by (impl, graphdef, max_len, sampling).
_STREAMER_CACHE: dict = {}
_STREAMER_CACHE_SIZE = 8


def _user_error(msg: str):
  from jaxlab.cli import UserError
  return UserError(msg)


def streamer_class(impl: str):
  """The streamer class registered for `impl`; a one-line error if it is not available."""
  available = [k for k, v in DECODE_IMPLS.items() if v]
  if impl not in DECODE_IMPLS:
    raise _user_error(f"--impl: unknown implementation {impl!r} (known: {', '.join(DECODE_IMPLS)})")
  target = DECODE_IMPLS[impl]
  if target is None:
    raise _user_error(f"--impl {impl} is not available yet (available: {', '.join(available)})")
  mod_name, attr = target.split(":")
  try:
    return getattr(importlib.import_module(mod_name), attr)
  except (ImportError, AttributeError) as e:
    raise _user_error(f"--impl {impl} is not available ({target}: {e})") from None


def _add_common(p: argparse.ArgumentParser):
  p.add_argument("--model", required=True, metavar="PATH",
                 help="local Hugging Face checkpoint dir (Llama, Qwen2, Qwen3)")
  p.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                 help="tokens to generate per reply (default 128)")
  p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                 help="0 = greedy (default); > 0 samples")
  p.add_argument("--top-k", type=int, default=0, metavar="K",
                 help="keep the K most likely (0 = off)")
  p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus mass (1 = off)")
  p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed")
  p.add_argument("--dtype", choices=_DTYPES, default=None,
                 help="parameter dtype (default: the checkpoint's)")
  p.add_argument("--adapter", metavar="DIR", default=None,
                 help="PEFT LoRA adapter dir to merge into the model")
  p.add_argument("--impl", default="xla", choices=tuple(DECODE_IMPLS),
                 help="decode implementation (available: "
                 f"{', '.join(k for k, v in DECODE_IMPLS.items() if v)})")
  p.add_argument("--stats", action="store_true", help="print load time and tokens/s to stderr")


def register(sub):
  g = sub.add_parser("generate", help="generate text from a local HF checkpoint (streamed)",
                     description="Generate text from a local Hugging Face checkpoint, streaming "
                     "tokens to stdout as they are produced.")
  _add_common(g)
  g.add_argument("--prompt", required=True, help="prompt text")
  g.add_argument("--chat", action="store_true",
                 help="wrap the prompt as one user message with the checkpoint's chat template")
  g.add_argument("--system", default=None, help="system message (with --chat)")
  g.set_defaults(func=run_generate)

  c = sub.add_parser("chat", help="chat with a local HF checkpoint (reads lines from stdin)",
                     description="Chat with a local Hugging Face checkpoint using its chat "
                     "template: each stdin line is a user turn; replies stream to stdout. "
                     "'/reset' clears the conversation.")
  _add_common(c)
  c.add_argument("--system", default=None, help="system message")
  c.set_defaults(func=run_chat)


class _Session:
  """Model + tokenizer + a cache of streamers keyed by their (bucketed) max_len."""

  def __init__(self, args):
    from jaxlab.models import hf
    from jaxlab.models.sampling import SamplingConfig
    from jaxlab.tokenizer import load_tokenizer

    if args.max_new_tokens <= 0:
      raise _user_error(f"--max-new-tokens: must be positive, got {args.max_new_tokens}")
    self.impl = args.impl
    self.cls = streamer_class(args.impl)
    self.sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    t0 = time.perf_counter()
    self.model = hf.load(args.model, dtype=args.dtype)
    if args.adapter:
      from jaxlab.models import lora
      lora.load_adapters(self.model, args.adapter)
      lora.remove_lora(self.model, merge_weights=True)
    t1 = time.perf_counter()
    self.tok = load_tokenizer(args.model)
    self.load_s = t1 - t0
    self.tok_s = time.perf_counter() - t1
    self.seed = args.seed
    self.max_new = args.max_new_tokens
    self.stats = args.stats
    self._streamers = {}
    self._key = None

  def _streamer(self, needed: int):
    limit = self.model.cfg.max_seq_len
    if needed > limit:
      raise _user_error(f"prompt + --max-new-tokens = {needed} tokens exceeds the model's "
                        f"context of {limit} (max_position_embeddings)")
    max_len = max(64, 1 << (needed - 1).bit_length())
    max_len = max(needed, min(max_len, limit))
    s = self._streamers.get(max_len)
    if s is None:
      s = _cached_streamer(self.impl, self.cls, self.model, max_len, self.sampling, self.seed)
      self._streamers[max_len] = s
    return s

  def reply(self, prompt_ids: list[int], out) -> str:
    """Stream one completion of `prompt_ids` to `out`; returns its text."""
    if not prompt_ids:
      raise _user_error("the prompt encodes to zero tokens")
    s = self._streamer(len(prompt_ids) + self.max_new)
    if self._key is not None and hasattr(s, "key"):  # one RNG stream across turns
      s.key = self._key
    dec = self.tok.stream_decoder()
    stamps = []  # time each token arrived
    t0 = time.perf_counter()
    for t in s.stream(prompt_ids, self.max_new, eos_ids=self.tok.eos_ids):
      stamps.append(time.perf_counter())
      piece = dec.push(t)
      if piece:
        out.write(piece)
        out.flush()
    tail = dec.flush()
    if tail:
      out.write(tail)
    out.write("\n")
    out.flush()
    self._key = getattr(s, "key", None)
    if self.stats and stamps:
      # Token 1 includes prefill compile, token 2 the decode-step compile; the rate is
      # measured over tokens 3..n (steady state).
      n = len(stamps)
      span = stamps[-1] - stamps[1] if n > 2 else 0.0
      rate = (n - 2) / span if span > 0 else float("nan")
      second = f", second {stamps[1] - stamps[0]:.2f} s" if n > 1 else ""
      print(f"jaxlab: model loaded in {self.load_s:.2f} s, tokenizer in {self.tok_s:.2f} s; "
            f"{len(prompt_ids)} prompt tokens; {n} tokens in {stamps[-1] - t0:.2f} s (first "
            f"{stamps[0] - t0:.2f} s{second}, incl. compiles); {rate:.1f} tokens/s steady",
            file=sys.stderr)
    return dec.emitted


def _cached_streamer(impl, cls, model, max_len, sampling, seed):
  from flax import nnx
  import jax

  graphdef, state = nnx.split(model)
  key = (impl, graphdef, max_len, sampling)
  s = _STREAMER_CACHE.pop(key, None)
  if s is None or not (hasattr(s, "state") and hasattr(s, "key")):
    try:
      s = cls(model, max_len=max_len, sampling=sampling, seed=seed)
    except ValueError as e:
      raise _user_error(f"--impl {impl}: {str(e).splitlines()[0]}") from None
  else:
    s.state = state
    s.key = jax.random.key(seed)
  _STREAMER_CACHE[key] = s
  while len(_STREAMER_CACHE) > _STREAMER_CACHE_SIZE:
    _STREAMER_CACHE.pop(next(iter(_STREAMER_CACHE)))
  return s


def _messages(system, history):
  return ([{"role": "system", "content": system}] if system else []) + history


def run_generate(args) -> int:
  sess = _Session(args)
  if args.chat:
    ids = sess.tok.apply_chat_template(_messages(args.system, [{"role": "user",
                                                                "content": args.prompt}]))
  else:
    if args.system:
      raise _user_error("--system needs --chat")
    ids = sess.tok.encode(args.prompt)
  sess.reply(ids, sys.stdout)
  return 0


def run_chat(args) -> int:
  sess = _Session(args)
  if sess.tok.chat_template is None:
    raise _user_error(f"{args.model}: the tokenizer has no chat template (use `jaxlab generate`)")
  interactive = sys.stdin.isatty()
  history: list[dict] = []
  while True:
    if interactive:
      print("> ", end="", flush=True)
    line = sys.stdin.readline()
    if not line:
      break
    text = line.rstrip("\n")
    if not text.strip():
      continue
    if text.strip() == "/reset":
      history = []
      continue
    history.append({"role": "user", "content": text})
    ids = sess.tok.apply_chat_template(_messages(args.system, history))
    reply = sess.reply(ids, sys.stdout)
    history.append({"role": "assistant", "content": reply})
  return 0
