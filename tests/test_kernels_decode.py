"""The batch-1 decode driver (jaxlab/models/decode.py): a tiny jaxlab LM decodes
64 greedy tokens identically with impl="xla", impl="pallas" (interpreted on
CPU), the scanned XLA step and the model's own generate(); so does a hybrid with
PaTH and log-linear Mamba-2 / Gated DeltaNet layers (their decode kernels), and one
with PaTH-FoX and FoX layers (the forget gate as a score bias); NaN in unused cache
slots changes nothing; the end of the cache is an error, not a wrap."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.models import LM, ModelConfig
from jaxlab.models.decode import DecodeStreamer, decode_greedy, make_decoder
from jaxlab.models.generate import generate

# GQA ratio 3, head dim 32, two layers, shapes that also compile for GPU.
CFG = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=32,
                  ffn_dim=256, init_std=0.3)
PROMPT = [3, 17, 42, 7, 99, 256, 1]
N = 64
MAX_LEN = len(PROMPT) + N


@pytest.fixture(scope="module")
def model():
  return LM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def reference_tokens(model):
  out = generate(model, np.array([PROMPT]), max_new_tokens=N)
  return np.asarray(out["tokens"][0])


@pytest.mark.parametrize("impl,layers", [("xla", "unrolled"), ("xla", "scan"),
                                         ("pallas", "unrolled")])
def test_greedy_64_tokens_identical(model, reference_tokens, impl, layers):
  toks = decode_greedy(model, PROMPT, N, impl=impl, layers=layers)
  assert len(set(reference_tokens.tolist())) >= 16, "degenerate continuation: test is too weak"
  np.testing.assert_array_equal(toks, reference_tokens)


# On CPU both modes run the same interpreted kernels ("prefetch" also checks the plumbing
# of "wait"); on a GPU they differ, and both run.
@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
@pytest.mark.parametrize("pdl", ["prefetch"] + (["wait"] if jax.default_backend() == "gpu" else []))
def test_pdl_pallas_step_decodes_the_same(hybrid, hybrid_tokens, pdl):
  """kernel_options={"launch": {"pdl": ...}}: every Pallas kernel of the hybrid model
  (PaTH, log-linear Mamba-2, attention and GDN layers, the LM head) launched with
  Programmatic Dependent Launch decodes the same tokens as generate(). On CPU this checks
  the plumbing; on a GPU with JAX >= 0.11 the kernels really overlap, and a kernel
  reading before its wait would show here."""
  np.testing.assert_array_equal(
      decode_greedy(hybrid, PROMPT, N, impl="pallas", kernel_options={"launch": {"pdl": pdl}}),
      hybrid_tokens)


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_two_kernel_mlp_decodes_the_same(model, reference_tokens, gated, gated_tokens):
  """kernel_options={"layout": {"mlp": "2k"}}: the decode weights hold [W_gate^T; W_up^T]
  and W_down^T, and every layer's MLP runs as two GEMV kernels (kernels.rmsnorm_swiglu_2k;
  the attention layers chained: the residual stream passes between kernels unfinished,
  kernels.unfinished): the same tokens as generate() for the tiny model (Pallas chained
  and not, XLA) and the PaTH-FoX / FoX model (attention layers between gated ones). Int8,
  scan and an [F, D] down weight are refused."""
  opts = {"layout": {"mlp": "2k"}}
  unchained = dict(opts, fuse={"chain": False})
  for m, want, impl, o in ((model, reference_tokens, "pallas", opts),
                           (model, reference_tokens, "pallas", unchained),
                           (model, reference_tokens, "xla", opts),
                           (gated, gated_tokens, "pallas", opts)):
    np.testing.assert_array_equal(decode_greedy(m, PROMPT, N, impl=impl, kernel_options=o),
                                  want)
  w = make_decoder(model, "xla", MAX_LEN, kernel_options=opts).weights["layers"][0]
  assert {"w_gate_up_t", "w_down_t"} <= set(w) and not {"w_gate_t", "w_up_t", "w_down"} & set(w)
  with pytest.raises(ValueError, match="two-kernel MLP.*float weights"):
    make_decoder(model, "pallas", MAX_LEN, kernel_options=opts, quantize="int8")
  with pytest.raises(ValueError, match="mlp '2k' stores W_down"):
    make_decoder(model, "xla", MAX_LEN, layers="scan", kernel_options=opts)
  with pytest.raises(ValueError, match="mlp '2k' stores W_down"):
    make_decoder(model, "pallas", MAX_LEN,
                 kernel_options={"layout": {"mlp": "2k", "w_down": "FD"}})
  with pytest.raises(ValueError, match=r"kernel_options\['layout'\]"):
    make_decoder(model, "pallas", MAX_LEN, kernel_options={"layout": {"mlp": "3k"}})


def test_streamer_interface_for_the_cli(model, reference_tokens):
  """`jaxlab generate --impl pallas` loads jaxlab.models.decode:DecodeStreamer."""
  s = DecodeStreamer(model, max_len=MAX_LEN, seed=0)
  np.testing.assert_array_equal(np.array(list(s.stream(PROMPT, N))), reference_tokens)
  eos = int(reference_tokens[5])
  assert list(s.stream(PROMPT, N, eos_ids=(eos,)))[-1] == eos
  with pytest.raises(ValueError, match="exceeds"):
    next(s.stream(PROMPT, N + 1))
  # Sampling reads the logits of Decoder.step (greedy runs the in-place step): the same
  # seed samples the same tokens from the Pallas and the XLA step (fp32, logits to ~1e-6).
  from jaxlab.models.decode import XLADecodeStreamer
  from jaxlab.models.sampling import SamplingConfig
  hot = SamplingConfig(temperature=1.0, top_k=8)
  sampled = [list(cls(model, max_len=MAX_LEN, sampling=hot, seed=3).stream(PROMPT, 6))
             for cls in (DecodeStreamer, XLADecodeStreamer)]
  assert sampled[0] == sampled[1] and len(set(sampled[0])) > 2


def _poisoned(dec, clean):
  """A copy of a fresh prefill state with NaN in every K/V (and gate) slot past the prompt
  (its own buffers: steps donate their state)."""
  T = len(PROMPT)
  tail = jnp.arange(dec.cache_len)[None, :, None] >= T
  nan_tail = lambda c: None if c is None else jnp.where(tail, jnp.nan, c)
  nan_gate = lambda c: None if c is None else jnp.where(tail[..., 0], jnp.nan, c)
  return dict(clean, k=tuple(map(nan_tail, clean["k"])), v=tuple(map(nan_tail, clean["v"])),
              gate=tuple(map(nan_gate, clean["gate"])),
              conv=tuple(jax.tree.map(jnp.copy, clean["conv"])),
              levels=tuple(jax.tree.map(jnp.copy, clean["levels"])), pos=jnp.int32(T))


def _steps_agree(dec, clean, poisoned, n=3):
  """n greedy steps from both states give identical, finite logits; returns the clean state."""
  tok = jnp.int32(5)
  for _ in range(n):
    la, ta, clean = dec.step(clean, tok)
    lb, tb, poisoned = dec.step(poisoned, tok)
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    assert int(ta) == int(tb)
    assert np.all(np.isfinite(np.asarray(la)))
    tok = ta
  return clean


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_nan_in_unused_cache_slots_changes_nothing(model, impl):
  dec = make_decoder(model, impl, MAX_LEN)
  _, clean = dec.prefill(PROMPT)
  _steps_agree(dec, clean, _poisoned(dec, clean))


def _full_cache_is_refused(dec, state):
  """At pos = max_len: Decoder.step raises; inside jit (traced position) the step gives
  NaN logits and token -1 and leaves every cache (k, v, conv, levels, gate) as it was."""
  full = dict(state, pos=jnp.int32(MAX_LEN))
  with pytest.raises(ValueError, match=f"position {MAX_LEN}"):
    dec.step(full, 1)
  before = jax.tree.map(np.asarray, full)
  logits, tok, after = dec.step_fn(dec.weights, full, jnp.int32(1))
  assert np.all(np.isnan(np.asarray(logits))) and int(tok) == -1
  for name in ("k", "v", "conv", "levels", "gate"):
    for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])):
      np.testing.assert_array_equal(a, np.asarray(b), err_msg=name)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_end_of_cache_is_an_error(model, impl):
  dec = make_decoder(model, impl, MAX_LEN)
  _, state = dec.prefill(PROMPT)
  _full_cache_is_refused(dec, state)
  with pytest.raises(ValueError, match="does not fit"):
    dec.prefill(list(range(MAX_LEN + 1)))


def test_make_decoder_rejects_bad_arguments(model):
  with pytest.raises(ValueError, match="'triton'"):
    make_decoder(model, "triton", 16)
  with pytest.raises(ValueError, match="scan"):
    make_decoder(model, "pallas", 16, layers="scan")
  with pytest.raises(ValueError, match="max_len"):
    make_decoder(model, "xla", 0)
  qk = LM(ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, qk_norm=True),
          rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="qk_norm"):
    make_decoder(qk, "xla", 16)


# ------------------------------------------------------------- buffers kept from step to step

def _aliases(lowered, donated, after: int = 0):
  """{path of a donated input leaf: path of the result it aliases or None}, read from the
  lowered module (JAX writes `tf.aliasing_output` on each aliased argument); `after`
  arguments follow the donated ones."""
  text = lowered.as_text()
  sig = re.search(r"func\.func public @main\((.*?)\) -> \((.*?)\) \{", text, re.S)
  args = re.split(r"%arg\d+: ", sig.group(1))[1:]
  results = re.findall(r'jax\.result_info = "([^"]*)"', sig.group(2))
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(donated)[0]]
  assert len(args) >= len(paths)
  out = {}
  for path, arg in zip(paths, args[len(args) - len(paths) - after:]):
    m = re.search(r"tf\.aliasing_output = (\d+)", arg)
    out[path] = None if m is None else results[int(m.group(1))]
  return out, results


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_every_state_leaf_keeps_its_buffer(model, impl):
  """Donation pairs each state leaf with its own result. (It pairs by shape and dtype in
  result order: with the token first among the results, the int32 position went to the
  token and came back in a new buffer each step; on a GPU a moved buffer makes XLA
  update its CUDA graph and trace each Mosaic kernel reading it again, every step.)
  In place, the token and logits slots too, and no result has a new buffer."""
  dec = make_decoder(model, impl, 16)
  _, state = dec.prefill(PROMPT[:3])
  aliases, _ = _aliases(dec.step_fn.lower(dec.weights, state, jnp.int32(1)), state, after=1)
  assert "['pos']" in aliases and len(aliases) == 2 * 2 + 1          # k, v per layer, pos
  assert aliases == {p: f"result[0]{p}" for p in aliases}
  slots = dec.inplace_slots(state, 1)
  aliases, results = _aliases(dec.step_fn.inplace.lower(dec.weights, slots), slots)
  assert {"['token']", "['logits']"} <= set(aliases)
  assert aliases == {p: f"result{p}" for p in aliases}
  assert sorted(results) == sorted(aliases.values())                  # every result aliased
  assert "jit__step_unrolled" in dec.step_fn.lower(dec.weights, state, jnp.int32(1)).as_text()


def _prefilled(model, impl, max_len, layers="unrolled"):
  """(decoder, state after the prompt, its greedy token, in-place slots of a copy)."""
  dec = make_decoder(model, impl, max_len, layers=layers)
  logits, state = dec.prefill(PROMPT)
  tok = jnp.argmax(logits).astype(jnp.int32)
  return dec, state, tok, dec.inplace_slots(jax.tree.map(jnp.copy, state), tok)


@pytest.mark.parametrize("impl,layers", [("xla", "unrolled"), ("xla", "scan"),
                                         ("pallas", "unrolled")])
def test_inplace_step_decodes_like_step(model, impl, layers):
  """step_inplace reads its token slot and writes the same logits and greedy token as
  step; past the end of the cache it raises, as step does."""
  dec, state, tok, slots = _prefilled(model, impl, len(PROMPT) + 5, layers)
  for _ in range(4):
    logits, tok, state = dec.step(state, tok)
    slots = dec.step_inplace(slots)
    np.testing.assert_array_equal(np.asarray(slots["logits"]), np.asarray(logits))
    assert int(slots["token"]) == int(tok) and int(slots["pos"]) == int(state["pos"])
  for name in ("k", "v"):
    for a, b in zip(jax.tree.leaves(state[name]), jax.tree.leaves(slots[name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  slots = dec.step_inplace(slots)   # the last slot
  with pytest.raises(ValueError, match=f"position {len(PROMPT) + 5}"):
    dec.step_inplace(slots)
  with pytest.raises(ValueError, match="without logits / token"):
    dec.inplace_slots(slots, 1)


# pallas: slow (~10 s; CI runs it); decode_greedy runs the Pallas loop in the default run
@pytest.mark.parametrize("impl", ["xla", pytest.param("pallas", marks=pytest.mark.slow)])
def test_device_loop_decodes_like_step(model, impl):
  """decode_inplace: n greedy steps in one call give step's tokens, and its slots the last
  step's logits; n steps that would pass the end of the cache raise."""
  dec, state, tok, slots = _prefilled(model, impl, len(PROMPT) + 6)
  want = []
  for _ in range(5):
    logits, tok, state = dec.step(state, tok)
    want.append(int(tok))
  with pytest.raises(ValueError, match=f"position {len(PROMPT) + 6}"):
    dec.decode_inplace(slots, 7)
  slots, tokens = dec.decode_inplace(slots, 5)
  np.testing.assert_array_equal(np.asarray(tokens), want)
  np.testing.assert_array_equal(np.asarray(slots["logits"]), np.asarray(logits))
  assert int(slots["pos"]) == int(state["pos"])


@pytest.mark.slow   # ~20 s; the default run keeps the attention model's in-place steps
def test_inplace_step_of_a_hybrid_model(hybrid):
  """PaTH, log-linear and attention layers: the in-place step carries their conv, level and
  key states as step does."""
  dec, state, tok, slots = _prefilled(hybrid, "xla", len(PROMPT) + 4)
  for _ in range(3):
    logits, tok, state = dec.step(state, tok)
    slots = dec.step_inplace(slots)
    assert int(slots["token"]) == int(tok)
  np.testing.assert_array_equal(np.asarray(slots["logits"]), np.asarray(logits))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(
      {k: v for k, v in slots.items() if k not in ("token", "logits")})):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------- PaTH and log-linear layers

# One layer of each kind the decoder runs; head/state dims 64 (the Pallas kernels' tiles).
HYBRID = ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                     head_dim=64, ffn_dim=256, init_std=0.3, max_seq_len=128,
                     mixer_pattern=("path", "log_linear_mamba2", "attention",
                                    "log_linear_gated_deltanet"),
                     mixer_options={"state_size": 64, "expand": 1, "ssm_heads": 2})


@pytest.fixture(scope="module")
def hybrid():
  return LM(HYBRID, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def hybrid_tokens(hybrid):
  return np.asarray(generate(hybrid, np.array([PROMPT]), max_new_tokens=N)["tokens"][0])


@pytest.mark.parametrize("impl,share_layers", [pytest.param("xla", True, marks=pytest.mark.slow),
                                               # ~25 s: shared layers (CI runs it)
                                               pytest.param("pallas", True,
                                                            marks=pytest.mark.slow),
                                               # ~50 s with its tokens' fixture; the
                                               # default run keeps the hybrid NaN-tail
                                               # and end-of-cache steps (CI runs it)
                                               pytest.param("pallas", False,
                                                            marks=pytest.mark.slow)])
def test_hybrid_greedy_64_tokens_identical(hybrid, hybrid_tokens, impl, share_layers):
  """The PaTH key update and log-linear level-state kernels inside the decode step, with
  every layer inlined (default) and with one jitted block per layer kind."""
  toks = decode_greedy(hybrid, PROMPT, N, impl=impl, share_layers=share_layers)
  assert len(set(hybrid_tokens.tolist())) >= 16, "degenerate continuation: test is too weak"
  np.testing.assert_array_equal(toks, hybrid_tokens)


def _lockstep(model, impl, steps=6):
  """The decoder and the model's own extend in lock-step from the same prompt, fed the
  decoder's greedy tokens: yields (step, logits, state, the model's logits, its cache)."""
  dec = make_decoder(model, impl, MAX_LEN)
  logits, state = dec.prefill(PROMPT)
  graphdef, params = nnx.split(model)
  extend = jax.jit(lambda p, t, c: nnx.merge(graphdef, p).extend(t, c))
  _, cache = extend(params, jnp.asarray([PROMPT]), model.init_cache(1, MAX_LEN))
  tok = int(jnp.argmax(logits))
  for i in range(steps):
    logits, _, state = dec.step(state, tok)
    ref, cache = extend(params, jnp.asarray([[tok]]), cache)
    yield i, np.asarray(logits), state, np.asarray(ref[0, -1]), cache
    tok = int(jnp.argmax(logits))


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_hybrid_logits_match_the_model(hybrid, impl):
  """Logits (not just argmax) of each step equal the model's own extend, to fp32 tolerance."""
  from jaxlab.testing import assert_rel_close, tol
  for _, logits, _, ref, _ in _lockstep(hybrid, impl):
    # fp32; per layer the longest sums are the MLP's (ffn 256) and the mixer's (<= 128 x
    # levels / cache slots), chained over 4 layers and the LM head (d_model 128).
    assert_rel_close(logits, ref, rtol=tol(jnp.float32, HYBRID.d_model * HYBRID.n_layers),
                     name=impl)


# xla: ~20 s, slow (CI runs it; the Pallas step, whose kernels it guards, stays)
@pytest.mark.parametrize("impl", [pytest.param("xla", marks=pytest.mark.slow), "pallas"])
def test_hybrid_nan_tails_and_end_of_cache(hybrid, impl):
  dec = make_decoder(hybrid, impl, MAX_LEN)
  _, clean = dec.prefill(PROMPT)
  _full_cache_is_refused(dec, _steps_agree(dec, clean, _poisoned(dec, clean)))


def test_hybrid_decoder_errors(hybrid, monkeypatch):
  with pytest.raises(ValueError, match="layers='scan' supports attention layers only"):
    make_decoder(hybrid, "xla", 16, layers="scan")
  with pytest.raises(ValueError, match="exceed the .* capacity"):
    make_decoder(hybrid, "xla", HYBRID.max_seq_len + 1)
  # every registered mixer has a decode path; one without gets a one-line error
  from jaxlab.models import decode
  monkeypatch.setattr(decode, "LAYER_KINDS", {k: v for k, v in decode.LAYER_KINDS.items()
                                              if k != "fox"})
  m = LM(ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, mixer="fox"),
         rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="layer 0 uses mixer 'fox': no batch-1 decode kernel"):
    make_decoder(m, "xla", 16)


# ------------------ forget-gated layers (PaTH-FoX, FoX) and plain Mamba-2 / GDN

GATED = ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                    head_dim=64, ffn_dim=256, init_std=0.3, max_seq_len=128,
                    mixer_pattern=("path_fox", "fox", "mamba2", "gated_deltanet"),
                    mixer_options={"gate_bias_init": 1.0, "state_size": 64, "expand": 1,
                                   "ssm_heads": 2})


@pytest.fixture(scope="module")
def gated():
  # gate_bias_init 1.0 plus random projections: gates well below 1, so the bias matters
  return LM(GATED, rngs=nnx.Rngs(2))


@pytest.fixture(scope="module")
def gated_tokens(gated):
  return np.asarray(generate(gated, np.array([PROMPT]), max_new_tokens=N)["tokens"][0])


# ~13 s (xla) and ~33 s with the fixture (pallas): slow, CI runs them; the default run keeps
# the gated step against the ops (tests/test_kernels_integration.py) and the llama
# model's 64-token runs
@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_gated_greedy_64_tokens_identical(gated, gated_tokens, impl):
  """PaTH-FoX and FoX layers (the forget gate as the attention kernels' score bias) and
  plain Mamba-2 / GDN layers (the state kernel with one accumulating state)."""
  toks = decode_greedy(gated, PROMPT, N, impl=impl)
  assert len(set(gated_tokens.tolist())) >= 16, "degenerate continuation: test is too weak"
  np.testing.assert_array_equal(toks, gated_tokens)


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_gated_logits_and_gates_match_the_model(gated, impl):
  """Per-step logits equal the model's extend, and the decoder's gate rows equal the
  model's PathCache gates (G_t - G_j) on the live slots."""
  from jaxlab.testing import assert_rel_close, tol
  for i, logits, state, ref, cache in _lockstep(gated, impl):
    # fp32; per layer the longest sums are the MLP's (ffn 256), attention's (<= 71 slots x
    # head dim 64) and the state read (dk 64), chained over 4 layers and the LM head
    # (d_model 128).
    assert_rel_close(logits, ref, rtol=tol(jnp.float32, GATED.d_model * GATED.n_layers),
                     name=impl)
    live = len(PROMPT) + i + 1
    for l in (0, 1):
      ours = np.asarray(state["gate"][l])[:, :live]
      theirs = np.asarray(cache["layers"][l]["attn"].gate[0]).T[:, :live]
      # a running sum of `live` fp32 log-gates
      assert_rel_close(ours, theirs, rtol=tol(jnp.float32, live), name=f"gate layer {l}")
      assert np.all(ours[:, :-1] < 0) and np.all(ours[:, -1] == 0)


@pytest.mark.parametrize("impl", [pytest.param("xla", marks=pytest.mark.slow),   # ~14 s; CI
                                  "pallas"])
def test_gated_nan_tails_and_end_of_cache(gated, impl):
  dec = make_decoder(gated, impl, MAX_LEN)
  _, clean = dec.prefill(PROMPT)
  assert clean["gate"][0] is not None and clean["gate"][1] is not None
  assert clean["gate"][2] is None and clean["conv"][1] is None   # Mamba-2; FoX has no conv
  assert clean["levels"][2].shape[1] == 1 and clean["levels"][3].shape[1] == 1   # one state
  _full_cache_is_refused(dec, _steps_agree(dec, clean, _poisoned(dec, clean)))


# both slow (~25 s; CI runs them): the default run stays under 15 min on the 2-core VM
@pytest.mark.parametrize("impl", [pytest.param("xla", marks=pytest.mark.slow),
                                  pytest.param("pallas", marks=pytest.mark.slow)])
def test_scatter_row_write_decodes_the_same(model, reference_tokens, gated, gated_tokens, impl):
  """kernel_options={"rope_append": {"write": "scatter"}} (the cache row written by one
  scatter that drops an out-of-range slot) gives the same tokens as generate() for
  attention, PaTH-FoX and FoX layers, and a full cache stays untouched."""
  opts = {"rope_append": {"write": "scatter"}}
  for m, want in ((model, reference_tokens), (gated, gated_tokens)):
    np.testing.assert_array_equal(decode_greedy(m, PROMPT, N, impl=impl, kernel_options=opts),
                                  want)
    dec = make_decoder(m, impl, MAX_LEN, kernel_options=opts)
    _full_cache_is_refused(dec, dec.prefill(PROMPT)[1])


@pytest.mark.parametrize("fuse", [pytest.param(dict(qkv_rope=False, out_mlp=False, attn_out=False),
                                               marks=pytest.mark.slow),
                                  dict(attn_out=False)])
def test_unfused_pallas_step_decodes_the_same(model, reference_tokens, gated, gated_tokens,
                                              fuse):
  """kernel_options={"fuse": {...: False}}: the Pallas step without its cross-op fusions
  (all off: rmsnorm_qkv, rope_append, decode_attention, out_proj_residual, rmsnorm_swiglu
  as separate ops with their XLA epilogues; attn_out off: the attention merge in XLA
  before out_proj_mlp; the default fuses all) gives the same tokens as generate() for
  attention and PaTH-FoX / FoX layers, and a full cache stays untouched."""
  opts = {"fuse": fuse}
  models = ((model, reference_tokens), (gated, gated_tokens))
  if "qkv_rope" not in fuse:   # attn_out alone changes attention layers only (FoX / PaTH-FoX:
    models = models[:1]        # out_mlp, which stays on)
  for m, want in models:
    np.testing.assert_array_equal(
        decode_greedy(m, PROMPT, N, impl="pallas", kernel_options=opts), want)
    dec = make_decoder(m, "pallas", MAX_LEN, kernel_options=opts)
    _full_cache_is_refused(dec, dec.prefill(PROMPT)[1])


@pytest.mark.parametrize("impl,layers,quantize", [("pallas", "unrolled", None),
                                                  ("xla", "scan", None),
                                                  pytest.param("pallas", "unrolled", "int8",
                                                               marks=pytest.mark.slow)])
def test_transposed_down_weight_decodes_the_same(model, reference_tokens, impl, layers,
                                                 quantize):
  """kernel_options={"layout": {"w_down": "DF"}}: the decode weights hold W_down^T [D, F]
  (the MLP kernels reduce each down block along rows); same tokens as with [F, D]."""
  opts = {"layout": {"w_down": "DF"}}
  want = (reference_tokens if quantize is None else
          decode_greedy(model, PROMPT, N, impl=impl, layers=layers, quantize=quantize))
  got = decode_greedy(model, PROMPT, N, impl=impl, layers=layers, quantize=quantize,
                      kernel_options=opts)
  np.testing.assert_array_equal(got, want)
  w = make_decoder(model, impl, MAX_LEN, layers=layers, kernel_options=opts).weights["layers"]
  lw = w if layers == "scan" else w[0]
  assert "w_down" not in lw and lw["w_down_t"].shape[-2:] == (CFG.d_model, CFG.hidden_dim)
  with pytest.raises(ValueError, match="kernel_options\\['layout'\\]"):
    make_decoder(model, impl, MAX_LEN, kernel_options={"layout": {"w_down": "T"}})

