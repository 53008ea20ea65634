"""`jaxlab bench decode`: batch-1 decode step, ms/token and achieved bandwidth.

Variants (each decodes the same greedy continuation from the same cache):
  pallas        jaxlab/models/decode.py with the kernels/ Pallas kernels (unrolled layers)
  xla-unrolled  the same step with the XLA reference ops, per-layer caches, donated state
  xla-scan      the XLA step over stacked layers (lax.scan), cache rows written in place
  model         the LM's own `extend` (what `jaxlab generate` runs), donated cache
  pallas-int8   pallas with int8 weight-only GEMVs (per-output fp32 scales)
  xla-int8      xla-unrolled with the same int8 weights (the plain-XLA int8 baseline)
  pallas-shared, pallas-int8-shared
                the same Pallas steps with one jitted block per layer kind
                (make_decoder(share_layers=True)) instead of every layer inlined into one
                flat program (the default); both lower each kernel once per step
  pallas-unfused
                pallas without the cross-op fusions (kernel_options "fuse" all off: QKV
                and RoPE / append, attention, O-projection and MLP as separate ops with
                their XLA epilogues and the attention merge between them), to measure
                what the fusions save
  pallas-down-t pallas with W_down^T [D, F] in the weights (kernel_options layout): the
                MLP kernels reduce each down block along rows instead of across warps
  pallas-mlp2k  pallas with the MLP as two GEMV kernels over more CTAs (kernel_options layout
                mlp "2k"), its attention layers chained: the residual stream passes from
                kernel to kernel unfinished, no XLA kernel between them (fuse "chain")
  pallas-mlp2k-nochain, pallas-mlp2k-prefetch, pallas-mlp2k-fill
                the same without the chain (split-K sums in XLA, the O-projection unfused),
                with PDL prefetch (a chain of Mosaic kernels, each starting early), and
                with fuller MLP grids (gate/up split 2, down split 8: 512 / 256 CTAs at 1B)
  pallas-mma    pallas-mlp2k with every GEMV kernel's inner product on the tensor cores
                (kernel_options gemv form "mma", kernels/_gemv.py): QKV, O-projection, both
                MLP kernels and the LM head
  pallas-mma-1k, pallas-mma-down-t, pallas-mma-128, pallas-mma-best, pallas-mma-prefetch
                pallas (the one-kernel MLP) with the same option, that with W_down^T,
                that with 128-byte B rows (gemv swizzle 128), that with the
                O-projection's rows at 32 bytes (each op's fastest row of the H100
                per-op sweep of 2026-11-27), and pallas-mma-128 with PDL "prefetch"
  pallas-int8-mma
                pallas-int8 with every GEMV on the tensor cores (gemv form "mma": int8
                tiles widened to bf16 in registers as WGMMA's A operand) and W_down^T
                [D, F] in the weights, so that the MLP's down tiles are A operands too
  pallas-int8-s8  pallas-int8-mma with the int8 tensor cores instead (gemv form
                "mma-s8": int8 tiles as WGMMA's A straight from SMEM, against the vector's
                base-128 int8 digits; no per-weight work on the CUDA cores)
  pallas-mma-attn
                pallas-mma with attention on the tensor cores too (decode_attention
                scores "mma-pv": q.K and p.V both WGMMAs)
  pallas-pdl, pallas-prefetch
                pallas with Programmatic Dependent Launch (kernel_options launch pdl
                "wait" / "prefetch"): each kernel may start while the previous one runs,
                waits for it before reading, and ("prefetch") first pulls its leading
                weight tiles into L2. Needs JAX >= 0.11 on the GPU; older JAX runs them
                as plain launches

Each decoder variant runs with the loops of `--loop` (default step,inplace): `step`
(Decoder.step_fn: new token and logits buffers every step), `inplace` (step_fn.inplace:
token and logits in donated slots of the state, so no buffer moves between steps; rows
`<variant>+inplace`) and `device` (step_fn.loop: all --steps steps in one call, a loop on
the device; rows `<variant>+device`).

Bytes per token = every weight read once (QKV, O, MLP, LM head) + the live KV
cache read (int8 variants: their int8 weights and scales). Agreement is checked
against xla-unrolled (int8 variants: xla-int8). Bandwidth is compared with a lone
large bf16 GEMV timed in the same run (the practical ceiling on this device; see docs/kernels.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CONFIGS = {
    # name: (ModelConfig kwargs, default kv_len, GEMV reference size)
    "tiny": (dict(vocab_size=512, d_model=128, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=32,
                  ffn_dim=256, init_std=0.3, param_dtype="float32"), 64, 1024),
    "llama-1b-bench": (dict(vocab_size=32000, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                            head_dim=64, ffn_dim=8192, rope_theta=500000.0, tie_embeddings=True,
                            param_dtype="bfloat16"), 1024, 16384),
    "llama-8b-bench": (dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                            n_kv_heads=8, head_dim=128, ffn_dim=14336, rope_theta=500000.0,
                            tie_embeddings=False, param_dtype="bfloat16"), 1024, 16384),
}
# The 1B bench shapes with a PaTH / log-linear Mamba-2 / log-linear GDN / attention layer
# cycle: times the PaTH key-update and level-state decode kernels inside the real step;
# gated-*: PaTH-FoX and FoX layers (the forget gate as the attention kernels' score bias).
CONFIGS["hybrid-1b-bench"] = (dict(
    CONFIGS["llama-1b-bench"][0], max_seq_len=2048,
    mixer_pattern=("path", "log_linear_mamba2", "attention", "log_linear_gated_deltanet"),
    mixer_options={"state_size": 64, "expand": 1}), 1024, 16384)
CONFIGS["hybrid-tiny"] = (dict(
    CONFIGS["tiny"][0], n_layers=4, n_heads=6, n_kv_heads=2, head_dim=64, max_seq_len=2048,
    mixer_pattern=CONFIGS["hybrid-1b-bench"][0]["mixer_pattern"],
    mixer_options={"state_size": 64, "expand": 1, "ssm_heads": 2}), 64, 1024)
CONFIGS["gated-1b-bench"] = (dict(
    CONFIGS["llama-1b-bench"][0], max_seq_len=2048, mixer_pattern=("path_fox", "fox")),
    1024, 16384)
CONFIGS["gated-tiny"] = (dict(
    CONFIGS["tiny"][0], n_heads=6, n_kv_heads=2, head_dim=64, max_seq_len=2048,
    mixer_pattern=("path_fox", "fox"), mixer_options={"gate_bias_init": 1.0}), 64, 1024)
VARIANTS = ("pallas", "xla-unrolled", "xla-scan", "model", "pallas-int8", "xla-int8",
            "pallas-shared", "pallas-int8-shared", "pallas-unfused", "pallas-down-t",
            "pallas-pdl", "pallas-prefetch", "pallas-mlp2k", "pallas-mlp2k-nochain",
            "pallas-mlp2k-prefetch", "pallas-mlp2k-fill", "pallas-mma", "pallas-mma-1k",
            "pallas-mma-down-t", "pallas-mma-attn", "pallas-mma-128", "pallas-mma-best",
            "pallas-mma-prefetch", "pallas-int8-mma", "pallas-int8-s8")
# variant -> (impl, layers, quantize, share_layers) for the make_decoder variants
# ("-shared": one jitted block per layer kind; the others inline every layer into one
# flat step, make_decoder's default)
_DECODER_VARIANTS = {
    "pallas": ("pallas", "unrolled", None, False),
    "xla-unrolled": ("xla", "unrolled", None, False), "xla-scan": ("xla", "scan", None, False),
    "pallas-int8": ("pallas", "unrolled", "int8", False),
    "xla-int8": ("xla", "unrolled", "int8", False),
    "pallas-shared": ("pallas", "unrolled", None, True),
    "pallas-int8-shared": ("pallas", "unrolled", "int8", True),
    "pallas-unfused": ("pallas", "unrolled", None, False),
    "pallas-down-t": ("pallas", "unrolled", None, False),
    "pallas-pdl": ("pallas", "unrolled", None, False),
    "pallas-prefetch": ("pallas", "unrolled", None, False),
    "pallas-mlp2k": ("pallas", "unrolled", None, False),
    "pallas-mlp2k-nochain": ("pallas", "unrolled", None, False),
    "pallas-mlp2k-prefetch": ("pallas", "unrolled", None, False),
    "pallas-mlp2k-fill": ("pallas", "unrolled", None, False),
    "pallas-mma": ("pallas", "unrolled", None, False),
    "pallas-mma-1k": ("pallas", "unrolled", None, False),
    "pallas-mma-down-t": ("pallas", "unrolled", None, False),
    "pallas-mma-attn": ("pallas", "unrolled", None, False),
    "pallas-mma-128": ("pallas", "unrolled", None, False),
    "pallas-mma-best": ("pallas", "unrolled", None, False),
    "pallas-mma-prefetch": ("pallas", "unrolled", None, False),
    "pallas-int8-mma": ("pallas", "unrolled", "int8", False),
    "pallas-int8-s8": ("pallas", "unrolled", "int8", False)}
# --sweep groups: attention num_splits and GEMV split-K; MLP store / tile options (bf16
# and int8); the MLP with W_down^T; PDL per op; TMA pipeline depths; fill: the kernels'
# grids grown toward the LM head's ~4 CTAs per SM (`jaxlab bench kernels`;
# docs/kernels.md "Launch shapes"); mma: each GEMV op with its inner product on the
# tensor cores, per B width (swizzle), and with the fill grids; attention's scores on them;
# attn: only those attention rows (q.K, and q.K with p.V, on the tensor cores)
SWEEPS = ("splits", "mlp", "down-t", "pdl", "stages", "fill", "mma", "attn")
# variant -> kernel options it adds to --kernel-options
_VARIANT_OPTIONS = {"pallas-unfused": {"fuse": {"qkv_rope": False, "out_mlp": False,
                                                 "attn_out": False}},
                    "pallas-down-t": {"layout": {"w_down": "DF"}},
                    "pallas-pdl": {"launch": {"pdl": "wait"}},
                    "pallas-prefetch": {"launch": {"pdl": "prefetch"}},
                    "pallas-mlp2k": {"layout": {"mlp": "2k"}},
                    "pallas-mlp2k-nochain": {"layout": {"mlp": "2k"}, "fuse": {"chain": False}},
                    "pallas-mlp2k-prefetch": {"layout": {"mlp": "2k"},
                                              "launch": {"pdl": "prefetch"}},
                    "pallas-mlp2k-fill": {"layout": {"mlp": "2k"}, "rmsnorm_swiglu_2k": {
                        "gate_up_block": {"split_k": 2}, "down_block": {"split_k": 8}}},
                    "pallas-mma": {"layout": {"mlp": "2k"}, "gemv": {"form": "mma"}},
                    "pallas-mma-1k": {"gemv": {"form": "mma"}},
                    "pallas-mma-down-t": {"gemv": {"form": "mma"}, "layout": {"w_down": "DF"}},
                    "pallas-mma-attn": {"layout": {"mlp": "2k"}, "gemv": {"form": "mma"},
                                        "decode_attention": {"scores": "mma-pv"}},
                    # the one-kernel MLP with 128-byte B rows: the fastest MLP row of the
                    # per-op sweep on the H100 (2026-11-27), not yet timed end to end
                    "pallas-mma-128": {"gemv": {"form": "mma", "swizzle": 128}},
                    # and the O-projection with 32-byte rows, its fastest row there
                    "pallas-mma-best": {"gemv": {"form": "mma", "swizzle": 128},
                                        "out_proj_residual": {"gemv": "mma",
                                                              "mma_swizzle": 32}},
                    # and each kernel launched early, its first weight tiles prefetched
                    "pallas-mma-prefetch": {"gemv": {"form": "mma", "swizzle": 128},
                                            "launch": {"pdl": "prefetch"}},
                    # int8 tiles enter WGMMA as A only: W_down^T puts the down phase there
                    "pallas-int8-mma": {"gemv": {"form": "mma"}, "layout": {"w_down": "DF"}},
                    "pallas-int8-s8": {"gemv": {"form": "mma-s8"}, "layout": {"w_down": "DF"}}}


LOOPS = ("step", "inplace", "device")
LOOP_SUFFIX = {"step": "", "inplace": "+inplace", "device": "+device"}   # their rows


def _loops_arg(text: str) -> tuple[str, ...]:
  loops = tuple(dict.fromkeys(w.strip() for w in text.split(",") if w.strip()))
  bad = [w for w in loops if w not in LOOPS]
  if bad or not loops:
    raise argparse.ArgumentTypeError(f"unknown loop {', '.join(bad) or repr(text)} (known: "
                                     f"{', '.join(LOOPS)})")
  return loops


def sweep_groups(text: str | None) -> set[str]:
  """The SWEEPS groups named by --sweep's value ("all", or a comma-separated subset)."""
  if not text:
    return set()
  groups = set(SWEEPS) if text == "all" else set(text.split(","))
  if groups - set(SWEEPS):
    raise ValueError(f"unknown group(s) {','.join(sorted(groups - set(SWEEPS)))} "
                     f"(known: {','.join(SWEEPS)}, or all)")
  return groups


def _sweep_arg(text: str) -> str:
  """--sweep's value, checked when the command line is read (not after the variants ran)."""
  try:
    sweep_groups(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return text


def add_arguments(p: argparse.ArgumentParser):
  p.add_argument("--config", default="llama-1b-bench", choices=sorted(CONFIGS),
                 help="model shape (tiny runs on CPU in seconds)")
  p.add_argument("--kv-len", type=int, default=None,
                 help="cache length when timing starts (default: 1024, tiny: 64)")
  p.add_argument("--steps", type=int, default=64, help="timed decode steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help=f"comma-separated subset of {','.join(VARIANTS)}")
  p.add_argument("--interpret", default=None, choices=("hlo", "mosaic"),
                 help="force a Pallas interpreter (default: interpret only on CPU)")
  p.add_argument("--kernel-options", default=None,
                 help='JSON per-op options, e.g. \'{"decode_attention": {"num_splits": 8}}\' '
                      '(Pallas only) or \'{"rope_append": {"write": "scatter"}}\' (the cache '
                      'row write; also given to the XLA variants)')
  p.add_argument("--gemv-size", type=int, default=None,
                 help="side of the square bf16 reference GEMV (default 16384; tiny: 1024)")
  p.add_argument("--ops", action="store_true",
                 help="also time each op alone (Pallas vs XLA) at one layer of the config")
  p.add_argument("--sweep", nargs="?", const="all", default=None, metavar="GROUPS",
                 type=_sweep_arg,
                 help="with --ops: also time Pallas option rows (tuning hints for the next "
                      f"GPU session); all groups, or a comma-separated subset of "
                      f"{','.join(SWEEPS)}")
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="also trace 16 steps of each make_decoder variant with "
                      "jax.profiler into DIR/<variant>/ and summarize device time per kernel, "
                      "kernels per step and idle time between them")
  p.add_argument("--loop", default=("step", "inplace"), type=_loops_arg, metavar="LOOPS",
                 help="how steps are chained, comma-separated (default step,inplace): 'step' "
                      "(Decoder.step_fn: new token and logits buffers each step), 'inplace' "
                      "(step_fn.inplace: every buffer reused; rows '<variant>+inplace'), "
                      "'device' (step_fn.loop: --steps steps per call, looped on the device; "
                      "rows '<variant>+device')")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _weight_bytes(cfg) -> int:
  item = jnp.dtype(cfg.param_dtype).itemsize
  D, F, Dh = cfg.d_model, cfg.hidden_dim, cfg.dim_per_head
  per_layer = D * (cfg.n_heads + 2 * cfg.kv_heads) * Dh + cfg.n_heads * Dh * D + 3 * D * F + 2 * D
  return item * (cfg.n_layers * per_layer + cfg.vocab_size * D + D)


def _kv_bytes(cfg, length: float) -> float:
  item = jnp.dtype(cfg.param_dtype).itemsize
  return item * 2 * cfg.n_layers * cfg.kv_heads * cfg.dim_per_head * length


def _attention_only(cfg) -> bool:
  from jaxlab.models.decode import layer_kinds
  return set(layer_kinds(cfg)) == {"attention"}


def _model_weight_bytes(model) -> int:
  """Every parameter once; an untied embedding table is not read (one row per token)."""
  from flax import nnx
  total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return total - (model.embed.embedding[...].nbytes if model.lm_head is not None else 0)


def _nbytes(a) -> int:
  """Bytes of an array or a ShapeDtypeStruct."""
  return int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize


def _decode_weight_bytes(weights) -> int:
  """Bytes of a decoder's prepared weights read per token: everything once, except the
  embedding table (one row is looked up)."""
  rest = sum(_nbytes(a) for a in jax.tree.leaves(dict(weights, embed=None)))
  return rest + _nbytes(weights["embed"]) // weights["embed"].shape[0]


def _cache_bytes(cfg, state, length: float) -> float:
  """The floor of a step's cache traffic, per layer kind: attention reads K and V;
  PaTH reads and rewrites its fp32 keys (in place, fused) and reads V (FoX: reads K and
  V); forget-gated layers also read and rewrite their gate row; a log-linear layer reads
  and rewrites its level states."""
  from jaxlab.models.decode import layer_kinds
  total = 0.0
  for l, kind in enumerate(layer_kinds(cfg)):
    if kind == "levels":
      total += 2 * _nbytes(state["levels"][l])
      continue
    k, v = state["k"][l], state["v"][l]
    rewrites_k = kind == "path" and cfg.layer_mixer(l) != "fox"
    per_slot = (_nbytes(k) / k.shape[1]) * (2 if rewrites_k else 1) + _nbytes(v) / v.shape[1]
    gate = state.get("gate", (None,) * cfg.n_layers)[l]
    if gate is not None:
      per_slot += 2 * _nbytes(gate) / gate.shape[1]
    total += per_slot * length
  return total


def _time(fn, repeats: int) -> float:
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def gemv_bandwidth(n: int, repeats: int, iters: int = 20) -> dict:
  """GB/s of a lone y = W x with W [n, n] bf16 through XLA (the reference ceiling)."""
  w = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  x = jax.random.normal(jax.random.key(2), (n,), jnp.bfloat16)
  f = jax.jit(lambda w, x: w @ x)
  f(w, x).block_until_ready()

  def run():
    y = None
    for _ in range(iters):
      y = f(w, x)
    y.block_until_ready()

  s = _time(run, repeats) / iters
  return dict(n=n, ms=1e3 * s, gbps=(n * n * 2 + 4 * n) / s / 1e9)


def _random_cache(cfg, cache_len: int, key):
  """Per-layer random K and V [Hkv, S, Dh]: timing does not depend on the values,
  and every variant starts from the same cache."""
  shape = (cfg.kv_heads, cache_len, cfg.dim_per_head)
  dt = jnp.dtype(cfg.param_dtype)
  ks = jax.random.split(key, 2 * cfg.n_layers)
  k = [jax.random.normal(ks[2 * i], shape, jnp.float32).astype(dt) for i in range(cfg.n_layers)]
  v = [jax.random.normal(ks[2 * i + 1], shape, jnp.float32).astype(dt)
       for i in range(cfg.n_layers)]
  return k, v


def _synthetic_state(dec, cfg, pos: int, key):
  if not _attention_only(cfg):
    return _synthetic_hybrid_state(dec, cfg, pos, key)
  k, v = _random_cache(cfg, dec.cache_len, key)
  none = (None,) * cfg.n_layers   # attention-only bench configs: no conv / level states
  if dec.layers == "scan":
    return dict(k=jnp.stack(k), v=jnp.stack(v), conv=none, levels=none, gate=none,
                pos=jnp.int32(pos))
  return dict(k=tuple(k), v=tuple(v), conv=none, levels=none, gate=none, pos=jnp.int32(pos))


def _synthetic_hybrid_state(dec, cfg, pos: int, key):
  """init_state with random K/V (attention, PaTH) and small random level states."""
  from jaxlab.models.decode import init_state
  st = init_state(cfg, dec.cache_len, layers=dec.layers, pos=pos)
  keys = iter(jax.random.split(key, 3 * cfg.n_layers))
  rnd = lambda a, s: None if a is None else (
      s * jax.random.normal(next(keys), a.shape, jnp.float32)).astype(a.dtype)
  return dict(st, k=tuple(rnd(a, 1.0) for a in st["k"]), v=tuple(rnd(a, 1.0) for a in st["v"]),
              levels=tuple(rnd(a, 0.01) for a in st["levels"]))


class _Loop:
  """How the bench chains a decoder's steps: "step", `Decoder.step_fn` (the token in,
  logits and token out in new buffers each step); "inplace", `step_fn.inplace` (token and
  logits in donated slots of the state: no buffer of the step is new, so XLA's command
  buffer has nothing to update between steps); "device", `step_fn.loop` (`n` in-place
  steps per call, looped on the device). The carry is (state, token) or the slots."""

  def __init__(self, dec, kind: str, n: int = 1):
    self.dec, self.kind = dec, kind
    self.per_call = n if kind == "device" else 1

  def start(self, state, token):
    tok = jnp.int32(token)
    return (state, tok) if self.kind == "step" else self.dec.inplace_slots(state, tok)

  def step(self, carry):
    """-> (carry, logits or None, tokens) of one call: the step's logits and token, or the
    device loop's tokens [n] (its first step's logits are gone)."""
    if self.kind == "device":
      carry, tokens = self.dec.step_fn.loop(self.dec.weights, carry, self.per_call)
      return carry, None, tokens
    if self.kind == "inplace":
      carry = self.dec.step_fn.inplace(self.dec.weights, carry)
      return carry, carry["logits"], carry["token"]
    logits, tok, state = self.dec.step_fn(self.dec.weights, *carry)
    return (state, tok), logits, tok


def _loop_positions(loop: str, steps: int, warmup: int, repeats: int) -> tuple[int, float]:
  """(positions a loop advances in all, its mean position offset while timed): the device
  loop's compiling call and its warm-up run `steps` steps each."""
  first = steps if loop == "device" else 1 + warmup
  return first + repeats * steps, first + repeats * steps / 2


def _run_decoder(dec, cfg, kv_len, first_token, steps, warmup, repeats, key,
                 loop: str = "step"):
  """Compile, warm up, then time `steps` chained greedy steps (no host syncs). Also the
  host's share: the time until the last step is dispatched (the host runs ahead of the
  device by at most a few dozen steps, so near the full time means host-bound)."""
  out = {}
  lp = _Loop(dec, loop, steps)
  carry = lp.start(_synthetic_state(dec, cfg, kv_len, key), first_token)
  t = time.perf_counter()
  carry, logits, tok = lp.step(carry)
  tok.block_until_ready()
  out["compile_s"] = time.perf_counter() - t
  if logits is not None:
    out["logits0"] = np.asarray(logits, np.float32).reshape(-1)   # before the next step
  else:   # the device loop: its tokens from the same cache
    out["tokens"] = np.asarray(tok).tolist()
  for _ in range(warmup if loop != "device" else 0):
    carry, _, tok = lp.step(carry)
  tok.block_until_ready()
  ts, dispatch = [], []
  for _ in range(repeats):
    toks = []
    t = time.perf_counter()
    for _ in range(steps // lp.per_call):
      carry, _, tok = lp.step(carry)
      if loop == "step":    # (in place, the next step reuses the token's buffer)
        toks.append(tok)
    dispatch.append(time.perf_counter() - t)
    tok.block_until_ready()
    ts.append(time.perf_counter() - t)
    if toks:
      out["tokens"] = [int(x) for x in toks]
  out["ms_per_token"] = 1e3 * statistics.median(ts) / steps
  out["dispatch_ms_per_token"] = 1e3 * statistics.median(dispatch) / steps
  return out


def summarize_trace(trace, n_steps: int, top: int = 12) -> dict:
  """Per-step device time from a Perfetto JSON trace (jax.profiler, create_perfetto_trace):
  kernels on the GPU's stream threads, their busy time (union of intervals), the span
  from first start to last end, the idle fraction (launch gaps), and the kernels with
  the most time."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  meta = lambda kind: {(e["pid"], e.get("tid")) if kind == "thread_name" else e["pid"]:
                       e.get("args", {}).get("name", "")
                       for e in events if e.get("ph") == "M" and e.get("name") == kind}
  procs, threads = meta("process_name"), meta("thread_name")
  on_gpu = [e for e in events if e.get("ph") == "X" and "GPU" in procs.get(e.get("pid"), "")]
  names = sorted({threads.get((e.get("pid"), e.get("tid")), "") for e in on_gpu})
  # Kernels run on "Stream #..." threads; the op/module/step rows summarize them.
  streams = [n for n in names if n.startswith("Stream")] or [
      n for n in names if not any(w in n for w in ("XLA Ops", "XLA Modules", "Steps", "Source"))]
  dev = [e for e in on_gpu if threads.get((e.get("pid"), e.get("tid")), "") in streams]
  if not dev:
    return {"note": "no GPU stream events in the trace", "threads": names}
  spans = sorted(_interval(e) for e in dev)
  busy = _union_us(spans)
  span = max(e for _, e in spans) - spans[0][0]
  by_name: dict[str, list[float]] = {}
  for e in dev:
    by_name.setdefault(e["name"], []).append(float(e.get("dur", 0)))
  ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
  host = [e for e in events if e.get("ph") == "X" and "host" in procs.get(e.get("pid"), "").lower()]
  return dict(threads=streams, kernels_per_step=len(dev) / n_steps,
              busy_us_per_step=busy / n_steps,
              span_us_per_step=span / n_steps, idle_fraction=1.0 - busy / span if span else 0.0,
              top=[dict(name=n[:80], calls_per_step=len(d) / n_steps,
                        us_per_step=sum(d) / n_steps) for n, d in ranked],
              host=_host_summary(host, n_steps, top))


def _interval(e) -> tuple[float, float]:
  return float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))


def _union_us(spans) -> float:
  """Length of the union of (start, end) intervals."""
  spans = sorted(spans)
  if not spans:
    return 0.0
  total, (cur_s, cur_e) = 0.0, spans[0]
  for s0, e0 in spans[1:]:
    if s0 > cur_e:
      total += cur_e - cur_s
      cur_s, cur_e = s0, e0
    else:
      cur_e = max(cur_e, e0)
  return total + cur_e - cur_s


def _host_summary(host: list, n_steps: int, top: int) -> dict:
  """What the host does per step (the XLA runtime's own trace events). XLA updates a
  command buffer (`command_buffer::update`) when a buffer one of its commands uses
  moved since the last run, and traces each Mosaic kernel on such a buffer again; with
  every buffer in place it only launches the graph (`cuGraphLaunch`)."""
  by_name: dict[str, list] = {}
  for e in host:
    if not e.get("name", "").startswith("$"):   # (Python frames)
      by_name.setdefault(e["name"], []).append(e)
  pick = lambda f: [e for n, es in by_name.items() if f(n) for e in es]
  per = lambda es: _union_us([_interval(e) for e in es]) / n_steps
  updates = pick(lambda n: n == "command_buffer::update")
  ranked = sorted(by_name.items(), key=lambda kv: -sum(float(e.get("dur", 0)) for e in kv[1]))
  return dict(
      dispatch_us_per_step=per(pick(lambda n: n.startswith("PjitFunction("))),
      updates_per_step=len(updates) / n_steps, update_us_per_step=per(updates),
      graph_launch_us_per_step=per(pick(lambda n: n.startswith("cuGraphLaunch"))),
      top=[dict(name=n[:80], calls_per_step=len(es) / n_steps, us_per_step=per(es))
           for n, es in ranked[:top]])


def _profile_decoder(dec, cfg, kv_len, first_token, key, trace_dir, n_steps: int = 16,
                     loop: str = "step") -> dict:
  """Trace n_steps chained steps (after a warm-up) and summarize the device time (the
  device loop: one call of its n steps, n_steps ignored)."""
  import glob
  import gzip
  import os
  lp = _Loop(dec, loop, n_steps)
  carry = lp.start(_synthetic_state(dec, cfg, kv_len, key), first_token)
  for _ in range(3 if loop != "device" else 1):
    carry, _, tok = lp.step(carry)
  tok.block_until_ready()
  n_steps = max(n_steps, lp.per_call)
  os.makedirs(trace_dir, exist_ok=True)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(n_steps // lp.per_call):
      carry, _, tok = lp.step(carry)
    tok.block_until_ready()
  files = glob.glob(os.path.join(trace_dir, "**", "*trace.json.gz"), recursive=True)
  if not files:
    return {"note": f"no Perfetto trace under {trace_dir}"}
  with gzip.open(max(files, key=os.path.getmtime), "rt") as f:
    return summarize_trace(json.load(f), n_steps)


def _run_model(model, cfg, kv_len, max_len, first_token, steps, warmup, repeats, key):
  """The LM's own extend path with a donated cache (B = 1)."""
  from flax import nnx
  graphdef, mstate = nnx.split(model)

  from jaxlab.models.decode import SLOT_MULTIPLE
  cache_len = -(-max_len // SLOT_MULTIPLE) * SLOT_MULTIPLE   # as make_decoder rounds
  ks, vs = _random_cache(cfg, cache_len, key)
  m0 = nnx.merge(graphdef, mstate)
  empty = m0.init_cache(1, cache_len)
  layers = tuple(dict(c, k=jnp.transpose(k, (1, 0, 2))[None], v=jnp.transpose(v, (1, 0, 2))[None],
                      valid=jnp.arange(cache_len)[None] < kv_len, index=jnp.int32(kv_len))
                 for c, k, v in zip(empty["layers"], ks, vs))
  cache = dict(layers=layers, next_pos=jnp.full((1,), kv_len, jnp.int32))
  del ks, vs

  def _step(mstate, cache, tok):
    m = nnx.merge(graphdef, mstate)
    logits, cache = m.extend(tok.reshape(1, 1), cache)
    return jnp.argmax(logits[0, 0]).astype(jnp.int32), cache, logits[0, 0]

  jitted = jax.jit(_step, donate_argnums=(1,))
  step = lambda mstate, cache, tok: jitted(mstate, cache, tok)[:2]
  tok = jnp.int32(first_token)
  out = {}
  t = time.perf_counter()
  tok, cache, logits = jitted(mstate, cache, tok)
  tok.block_until_ready()
  out["compile_s"] = time.perf_counter() - t
  out["logits0"] = np.asarray(logits, np.float32).reshape(-1)
  for _ in range(warmup):
    tok, cache = step(mstate, cache, tok)
  tok.block_until_ready()
  ts = []
  for _ in range(repeats):
    toks = []
    t = time.perf_counter()
    for _ in range(steps):
      tok, cache = step(mstate, cache, tok)
      toks.append(tok)
    tok.block_until_ready()
    ts.append(time.perf_counter() - t)
    out["tokens"] = [int(x) for x in toks]
  out["ms_per_token"] = 1e3 * statistics.median(ts) / steps
  return out


# GEMV op -> (positions of its weights in the case's args, their scale keywords, the
# reduction axis of each weight)
_INT8_OPS = {"rmsnorm_qkv": ((2,), ("w_scale_N",), (1,)),
             "out_proj_residual": ((1,), ("w_scale_D",), (1,)),
             "rmsnorm_swiglu": ((2, 3, 4), ("w_gate_scale_F", "w_up_scale_F", "w_down_scale_D"),
                                (1, 1, 0)),
             "lm_head_argmax": ((2,), ("w_scale_V",), (1,))}


def _int8_op_cases(cases):
  """The GEMV ops with int8 weights (kernels.quant): (cases, bytes per call = the int8
  weights and their fp32 scales)."""
  from kernels.quant import quantize_int8
  out, nbytes = {}, {}
  for op, (pos, names, axes) in _INT8_OPS.items():
    make, args, _ = cases[op]
    args, scales = list(args), []
    for p, axis in zip(pos, axes):
      args[p], sc = quantize_int8(args[p], axis=axis)
      scales.append(sc)
    n = len(args)

    def make8(impl, make=make, names=names, n=n, **k):
      f = make(impl, **k)
      return lambda *a: f(*a[:n], **dict(zip(names, a[n:])))

    out[f"{op} int8"] = (make8, tuple(args) + tuple(scales), None)
    nbytes[f"{op} int8"] = sum(args[p].nbytes for p in pos) + sum(sc.nbytes for sc in scales)
  return out, nbytes


def _hybrid_op_cases(cfg, kv_len: int, S: int, r):
  """Per-op cases for the PaTH and log-linear decode kernels at the config's own layer
  shapes (only for configs that have such layers): (cases, bytes per call)."""
  from jaxlab.models.decode import init_state, layer_kinds
  kinds = layer_kinds(cfg)
  cases, nbytes = {}, {}
  f32 = jnp.float32
  Dh, Hq, Hkv = cfg.dim_per_head, cfg.n_heads, cfg.kv_heads
  item = jnp.dtype(cfg.param_dtype).itemsize
  mixers = {cfg.layer_mixer(l) for l in range(cfg.n_layers)}
  # forget gate as a score bias: G_t - G_j <= 0, growing into the past
  bias = -jnp.abs(r(31, Hq, S).astype(f32)) * jnp.arange(S, 0, -1, dtype=f32) / S
  g_step = -jnp.abs(r(35, Hq).astype(f32))   # this token's log forget gate (gate update rows)
  if mixers & {"path", "path_fox"}:
    from kernels.path_decode_attention import path_decode_attention
    w = jax.random.normal(jax.random.key(20), (Hkv, Dh), f32)
    w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    args = (r(21, Hq, Dh), r(22, Hkv, S, Dh).astype(f32), r(23, Hkv, S, Dh), w,
            jnp.full((Hkv,), 1.5, f32), jnp.int32(kv_len))
    make = lambda impl, **k: functools.partial(path_decode_attention, scale=Dh ** -0.5,
                                               impl=impl, **k)
    if "path" in mixers:
      cases["path_decode_attention"] = (make, args, None)
      nbytes["path_decode_attention"] = Hkv * kv_len * Dh * (2 * 4 + item)   # K r+w, V r
    if "path_fox" in mixers:
      op = "path_decode_attention (gate bias)"
      cases[op] = (lambda impl, **k: (lambda *a: make(impl, **k)(*a[:6], bias_HS=a[6])),
                   args + (bias,), None)
      nbytes[op] = Hkv * kv_len * Dh * (2 * 4 + item) + Hq * kv_len * 4      # + bias r
      op = "path_decode_attention (gate update)"   # the driver's form: gate r + w inside
      cases[op] = (lambda impl, **k: (lambda *a: make(impl, **k)(*a[:6], gate_HS=a[6],
                                                                  g_H=a[7])),
                   args + (bias, g_step), None)
      nbytes[op] = Hkv * kv_len * Dh * (2 * 4 + item) + 2 * Hq * kv_len * 4  # + gate r+w
  if "fox" in mixers:
    from kernels.decode_attention import decode_attention
    op = "decode_attention (gate bias)"
    cases[op] = (lambda impl, **k: (lambda q, kc, vc, n, b: decode_attention(
        q, kc, vc, n, scale=Dh ** -0.5, impl=impl, bias_HS=b, **k)),
        (r(32, Hq, Dh), r(33, Hkv, S, Dh).astype(f32), r(34, Hkv, S, Dh), jnp.int32(kv_len),
         bias), None)
    nbytes[op] = Hkv * kv_len * Dh * (4 + item) + Hq * kv_len * 4           # K, V, bias r
    op = "decode_attention (gate update)"
    cases[op] = (lambda impl, **k: (lambda q, kc, vc, n, b, g: decode_attention(
        q, kc, vc, n, scale=Dh ** -0.5, impl=impl, gate_HS=b, g_H=g, **k)),
        cases["decode_attention (gate bias)"][1] + (g_step,), None)
    nbytes[op] = Hkv * kv_len * Dh * (4 + item) + 2 * Hq * kv_len * 4       # + gate r+w
  if "levels" in kinds:
    from kernels.log_linear_state import log_linear_state_update
    st = jax.eval_shape(lambda: init_state(cfg, 64))
    seen = set()
    for l, kind in enumerate(kinds):
      name = cfg.layer_mixer(l)
      if kind != "levels" or name in seen:
        continue
      seen.add(name)
      variant = "gdn" if "deltanet" in name else "mamba2"
      fenwick = name.startswith("log_linear")   # plain Mamba-2 / GDN: one state
      H, L, dk, dv = st["levels"][l].shape
      g = lambda i, *shape: jax.random.normal(jax.random.key(i), shape, f32)
      args = (0.01 * g(24, H, L, dk, dv), jnp.int32(kv_len), g(25, H, dk), g(26, H, dk) / 8,
              g(27, H, dv), jax.nn.softplus(g(28, H, L)), -jax.nn.softplus(g(29, H)))
      if variant == "gdn":
        args += (jax.nn.sigmoid(g(30, H)),)
      op = f"log_linear_state_update ({variant}{'' if fenwick else ', plain'})"
      cases[op] = (lambda impl, variant=variant, fenwick=fenwick, **k: functools.partial(
          log_linear_state_update, variant=variant, fenwick=fenwick, impl=impl, **k), args, None)
      nbytes[op] = 2 * H * L * dk * dv * 4                                 # levels r+w
      if fenwick:
        # t = kv_len (1024: level 11 takes levels 0..10, the level grid's slowest kind of
        # step) above; the first kernel form (one CTA streams every level) at the same t;
        # and t + 1 (odd: no merge, half of all steps)
        make = cases[op][0]
        cases[f"{op} serial levels"] = (
            lambda impl, make=make, **k: make(impl, **({"split_levels": False}
                                                      if impl == "pallas" else {}), **k),
            args, None)
        cases[f"{op} t+1"] = (make, (args[0], jnp.int32(kv_len + 1)) + args[2:], None)
        nbytes[f"{op} serial levels"] = nbytes[f"{op} t+1"] = nbytes[op]
  return cases, nbytes


def op_table(cfg, kv_len: int, interpret, opts, repeats: int, iters: int = 50,
             sweep: str | None = None) -> dict:
  """Per-op time and bandwidth, Pallas vs its XLA reference, at one layer's shapes."""
  groups = sweep_groups(sweep)
  from kernels.decode_attention import decode_attention
  from kernels.lm_head_argmax import lm_head_argmax
  from kernels.out_proj_residual import out_proj_residual
  from kernels.rmsnorm_qkv import rmsnorm_qkv
  from kernels.rmsnorm_swiglu import rmsnorm_swiglu
  dt = jnp.dtype(cfg.param_dtype)
  D, F, V, Dh = cfg.d_model, cfg.hidden_dim, cfg.vocab_size, cfg.dim_per_head
  Hq, Hkv = cfg.n_heads, cfg.kv_heads
  N, M, S = (Hq + 2 * Hkv) * Dh, Hq * Dh, -(-(kv_len + 1) // 64) * 64
  r = lambda i, *shape: (jax.random.normal(jax.random.key(i), shape) / np.sqrt(shape[-1])
                         ).astype(dt)
  x, g = r(0, D), (1.0 + r(1, D)).astype(dt)
  opts = opts or {}
  cases = {
      "rmsnorm_qkv": (lambda impl, **k: functools.partial(rmsnorm_qkv, eps=1e-6, impl=impl, **k),
                      (x, g, r(2, N, D)), N * D),
      "decode_attention": (
          lambda impl, **k: functools.partial(decode_attention, scale=Dh ** -0.5, impl=impl, **k),
          (r(3, Hq, Dh), r(4, Hkv, S, Dh), r(5, Hkv, S, Dh), jnp.int32(kv_len)),
          2 * Hkv * kv_len * Dh),
      "out_proj_residual": (lambda impl, **k: functools.partial(out_proj_residual, impl=impl, **k),
                            (r(6, M), r(7, D, M), x), D * M),
      "rmsnorm_swiglu": (lambda impl, **k: functools.partial(rmsnorm_swiglu, eps=1e-6, impl=impl,
                                                             **k),
                         (x, g, r(8, F, D), r(9, F, D), r(10, F, D)), 3 * F * D),
      "lm_head_argmax": (lambda impl, **k: functools.partial(lm_head_argmax, eps=1e-6, impl=impl,
                                                             **k),
                         (x, g, r(11, V, D)), V * D),
  }
  nbytes = {op: elems * dt.itemsize for op, (_, _, elems) in cases.items()}   # before extras
  # The fused pairs the Pallas step runs (kernel_options "fuse"); compare each with the
  # sum of its two ops' rows. The caches here have 64 slots: the op writes one row, and
  # the timing loop copies its aliased caches on every call.
  from kernels.out_proj_mlp import out_proj_mlp
  from kernels.qkv_rope_append import qkv_rope_append
  cs = jnp.cos(jnp.arange(Dh) * 0.1), jnp.sin(jnp.arange(Dh) * 0.1)
  cases["qkv_rope_append"] = (
      lambda impl, **k: functools.partial(qkv_rope_append, eps=1e-6, n_heads=Hq,
                                          n_kv_heads=Hkv, impl=impl, **k),
      (x, g, r(2, N, D), None, *cs, r(4, Hkv, 64, Dh), r(5, Hkv, 64, Dh), jnp.int32(7)), N * D)
  cases["out_proj_mlp"] = (
      lambda impl, **k: functools.partial(out_proj_mlp, eps=1e-6, impl=impl, **k),
      (r(6, M), r(7, D, M), x, g, r(8, F, D), r(9, F, D), r(10, F, D)), D * M + 3 * F * D)
  from kernels.attention_out_mlp import attention_out_mlp
  cases["attention_out_mlp"] = (
      lambda impl, **k: functools.partial(attention_out_mlp, scale=Dh ** -0.5, eps=1e-6,
                                          impl=impl, **k),
      (r(3, Hq, Dh), r(4, Hkv, S, Dh), r(5, Hkv, S, Dh), jnp.int32(kv_len), r(7, D, M), x, g,
       r(8, F, D), r(9, F, D), r(10, F, D)), 2 * Hkv * kv_len * Dh + D * M + 3 * F * D)
  # The MLP as two GEMV kernels (layout mlp "2k"): compare with rmsnorm_swiglu.
  from kernels.rmsnorm_swiglu_2k import rmsnorm_swiglu_2k
  cases["rmsnorm_swiglu_2k"] = (
      lambda impl, **k: functools.partial(rmsnorm_swiglu_2k, eps=1e-6, impl=impl, **k),
      (x, g, jnp.concatenate([r(8, F, D), r(9, F, D)]), jnp.asarray(r(10, F, D).T)), 3 * F * D)
  # The chained layer (layout mlp "2k", fuse "chain"): attention + O GEMV leaving its rows
  # unfinished, and the two-kernel MLP finishing x from the previous down rows and the O
  # rows (4 split-K rows each, as at 1B) and returning its own rows unfinished.
  from kernels.attention_out_proj import attention_out_proj
  from kernels.unfinished import Unfinished
  cases["attention_out_proj"] = (
      lambda impl, **k: functools.partial(attention_out_proj, scale=Dh ** -0.5, impl=impl, **k),
      (r(3, Hq, Dh), r(4, Hkv, S, Dh), r(5, Hkv, S, Dh), jnp.int32(kv_len), r(7, D, M), x),
      2 * Hkv * kv_len * Dh + D * M)
  xu = Unfinished(x, tuple(r(12 + i, 4, D).astype(jnp.float32) for i in range(2)))
  cases["rmsnorm_swiglu_2k chained"] = (
      lambda impl, **k: functools.partial(rmsnorm_swiglu_2k, eps=1e-6, impl=impl, finish=False,
                                          **k),
      (xu,) + cases["rmsnorm_swiglu_2k"][1][1:], 3 * F * D)
  for op in ("qkv_rope_append", "out_proj_mlp", "attention_out_mlp", "rmsnorm_swiglu_2k",
             "attention_out_proj", "rmsnorm_swiglu_2k chained"):
    nbytes[op] = cases[op][2] * dt.itemsize
  for extra in (_int8_op_cases(cases), _hybrid_op_cases(cfg, kv_len, S, r)):
    cases.update(extra[0])
    nbytes.update(extra[1])

  def timed(f, args, nbytes):
    # Calls inside one jitted loop: a Python loop of jitted calls measures host
    # dispatch (~30 us per call on an H100), not ~5-50 us kernels. Each loop trip calls
    # f on R distinct copies of its inputs (>= ~256 MB together where R <= 8 allows),
    # so the weights come from HBM as in a real step, not from the 50 MB L2. The barrier
    # keeps calls from being hoisted out of the loop; summing outputs keeps them alive.
    R = int(min(8, max(1, -(-256e6 // max(nbytes, 1)))))
    copies = tuple(jax.tree.map(lambda a: jnp.array(a, copy=True), args) for _ in range(R))
    trips = max(1, -(-iters // R))

    fj = jax.jit(f)   # one lowering, R call sites

    def many(copies):
      def body(_, carry):
        cs, acc = carry
        cs = lax.optimization_barrier(cs)
        for a in cs:
          y = fj(*a)
          acc = acc + sum(jnp.sum(l.astype(jnp.float32)) for l in jax.tree.leaves(y))
        return cs, acc
      return lax.fori_loop(0, trips, body, (copies, jnp.float32(0)))[1]

    loop_fn = jax.jit(many)
    jax.block_until_ready(loop_fn(copies))
    us = 1e6 * _time(lambda: jax.block_until_ready(loop_fn(copies)), repeats) / (trips * R)
    return dict(us=us, gbps=nbytes / (us * 1e-6) / 1e9, copies=R)

  def pallas_opts(op):
    base = op.split()[0]   # "rmsnorm_qkv int8" takes rmsnorm_qkv's options
    if base == "qkv_rope_append":
      return dict(opts.get("rmsnorm_qkv", {}))
    if base == "attention_out_proj":
      return dict(attn_block=opts.get("decode_attention"), o_block=opts.get("out_proj_residual"))
    if base in ("out_proj_mlp", "attention_out_mlp"):
      kw = dict(opts.get("rmsnorm_swiglu", {}), o_block=opts.get("out_proj_residual"))
      if base == "attention_out_mlp":
        kw["attn_block"] = opts.get("decode_attention")
      return kw
    return dict(opts.get(base, {}))

  out = {}
  for op, (make, args, elems) in cases.items():
    row = {"bytes": nbytes[op]}
    for impl in ("xla", "pallas"):
      kw = dict(pallas_opts(op), interpret=interpret) if impl == "pallas" else {}
      row[impl] = _guarded(f"op {op} {impl}", lambda: timed(make(impl, **kw), args, row["bytes"]))
    out[op] = row
  if groups:
    sw = {}
    # sweep-only cases (no op row): the one-kernel MLP with W_down^T [D, F]
    xa, ga, wga, wua, wda = cases["rmsnorm_swiglu"][1]
    cases["rmsnorm_swiglu w_down_t_DF"] = (
        lambda impl, **k: lambda x_, g_, wg_, wu_, wdt_: rmsnorm_swiglu(
            x_, g_, wg_, wu_, w_down_t_DF=wdt_, eps=1e-6, impl=impl, **k),
        (xa, ga, wga, wua, jnp.asarray(wda.T)), 3 * F * D)
    nbytes["rmsnorm_swiglu w_down_t_DF"] = nbytes["rmsnorm_swiglu"]
    _, a8, _ = cases["rmsnorm_swiglu int8"]   # (x, g, wg, wu, wd, scale_g, scale_u, scale_d)
    cases["rmsnorm_swiglu int8 w_down_t_DF"] = (
        lambda impl, **k: lambda x_, g_, wg_, wu_, wdt_, sg_, su_, sd_: rmsnorm_swiglu(
            x_, g_, wg_, wu_, w_down_t_DF=wdt_, w_gate_scale_F=sg_, w_up_scale_F=su_,
            w_down_scale_D=sd_, eps=1e-6, impl=impl, **k),
        (*a8[:4], jnp.asarray(a8[4].T), *a8[5:]), 3 * F * D)
    nbytes["rmsnorm_swiglu int8 w_down_t_DF"] = nbytes["rmsnorm_swiglu int8"]
    make, args, elems = cases["decode_attention"]
    for p in ((1, 2, 4, 8, 16, 32) if "splits" in groups else ()):
      if p * 64 <= S:
        sw[f"decode_attention num_splits={p}"] = _guarded(f"sweep num_splits={p}", lambda: timed(
            make("pallas", num_splits=p, interpret=interpret), args, elems * dt.itemsize))
    for op in ("rmsnorm_qkv", "out_proj_residual") if "splits" in groups else ():
      make, args, elems = cases[op]
      for sk in (1, 2, 4, 8):
        sw[f"{op} split_k={sk}"] = _guarded(f"sweep {op} split_k={sk}", lambda: timed(
            make("pallas", split_k=sk, interpret=interpret), args, elems * dt.itemsize))
    make, args, elems = cases["rmsnorm_swiglu"]
    for once in (False, True) if "mlp" in groups else ():
      sw[f"rmsnorm_swiglu store_once={once}"] = _guarded(
          f"sweep rmsnorm_swiglu store_once={once}", lambda: timed(
              make("pallas", store_once=once, interpret=interpret), args, elems * dt.itemsize))
    # Wider MLP tiles (more bytes in flight per pipeline step), and the int8 MLP's store.
    D = cfg.d_model
    for bk, bd in ((64, 64), (256, 128), (128, 256), (256, 256)) if "mlp" in groups else ():
      if D % bk == 0 and D % bd == 0:
        sw[f"rmsnorm_swiglu block_k={bk} block_d={bd}"] = _guarded(
            f"sweep rmsnorm_swiglu block_k={bk} block_d={bd}", lambda: timed(
                make("pallas", block_k=bk, block_d=bd, interpret=interpret), args,
                elems * dt.itemsize))
    make, args, _ = cases["rmsnorm_swiglu int8"]
    for once in (False, True) if "mlp" in groups else ():
      sw[f"rmsnorm_swiglu int8 store_once={once}"] = _guarded(
          f"sweep rmsnorm_swiglu int8 store_once={once}", lambda: timed(
              make("pallas", store_once=once, interpret=interpret), args,
              nbytes["rmsnorm_swiglu int8"]))
    # The two-kernel MLP with its kernel 2 split 2 / 4 / 8 ways (8: 256 CTAs at 1B).
    make, args, _ = cases["rmsnorm_swiglu_2k"]
    for sk in (2, 4, 8) if "mlp" in groups else ():
      name = f"rmsnorm_swiglu_2k down split_k={sk}"
      sw[name] = _guarded(f"sweep {name}", lambda: timed(
          make("pallas", down_block=dict(split_k=sk), interpret=interpret), args,
          nbytes["rmsnorm_swiglu_2k"]))
    # The chained MLP's extra L2 reads (every gate/up CTA re-reads x's rows): fewer, wider
    # gate/up CTAs; fewer down rows for the next kernel to add.
    make, args, _ = cases["rmsnorm_swiglu_2k chained"]
    for name, kw in ((("gate_up block_n=128", dict(gate_up_block=dict(block_n=128))),
                      ("down split_k=2", dict(down_block=dict(split_k=2))))
                     if "mlp" in groups else ()):
      name = f"rmsnorm_swiglu_2k chained {name}"
      sw[name] = _guarded(f"sweep {name}", lambda: timed(
          make("pallas", interpret=interpret, **kw), args, nbytes["rmsnorm_swiglu_2k chained"]))
    # Fuller grids: the launch shapes put one warpgroup per SM in the attention, O and MLP
    # kernels and ~4 in the LM head, the one GEMV near the bandwidth (H100, sixth session).
    # At 1B: gate/up split 2 = 512 CTAs, down split 8 = 256, O split 8 / 16 = 256 / 512.
    fill = []
    if "fill" in groups:
      # block_k 128: what the compiled kernels pick at these shapes anyway (the
      # interpreters pick up to 512, too coarse to split at small test shapes)
      up, down = dict(split_k=2, block_k=128), dict(split_k=8, block_k=128)
      mlp2k = (("gate_up split_k=2", dict(gate_up_block=up)),
               ("down split_k=8", dict(down_block=down)),
               ("gate_up split_k=2 down split_k=8", dict(gate_up_block=up, down_block=down)))
      fill += [(f"rmsnorm_swiglu_2k {n}", "rmsnorm_swiglu_2k", kw) for n, kw in mlp2k]
      fill += [(f"rmsnorm_swiglu_2k chained {n}", "rmsnorm_swiglu_2k chained", kw)
               for n, kw in mlp2k]
      # (attention already runs 16 splits at a 1K cache, one per 64-slot block)
      fill += [(f"out_proj_residual split_k={sk}", "out_proj_residual",
                dict(split_k=sk, block_k=128)) for sk in (8, 16)]
    # attention's scores on the tensor cores (p.V stays on the CUDA cores), and both of
    # its products there ("mma-pv"): group "attn", and part of "mma"
    attn_rows = []
    for sc in ("mma", "mma-pv") if groups & {"mma", "attn"} else ():
      attn_rows += [(f"decode_attention scores={sc}", "decode_attention", dict(scores=sc)),
                    (f"attention_out_proj scores={sc}", "attention_out_proj",
                     dict(pallas_opts("attention_out_proj"),
                          attn_block=dict(pallas_opts("attention_out_proj")["attn_block"]
                                          or {}, scores=sc)))]
    if "mma" in groups:
      # The GEMV on the tensor cores (kernels/_gemv.py "mma"), per B width (the default
      # first: a timeout cuts the tail); the MLPs first (most of the step's bytes); the
      # two-kernel MLP also with the fill grids (the tensor cores leave the CTAs less
      # per-element work). Ahead of the fill rows.
      both = lambda **k: dict(gate_up_block=dict(k), down_block=dict(k))
      mma_rows = []
      for sz in (64, 32, 128):
        mma = dict(gemv="mma", mma_swizzle=sz)
        tag = f"gemv=mma swizzle={sz}"
        # the one-kernel MLP (W_down [F, D]; W_down^T), and the default step's fused layer
        mma_rows += [(f"rmsnorm_swiglu {tag}", "rmsnorm_swiglu",
                      dict(pallas_opts("rmsnorm_swiglu"), **mma))]
        if sz < 128:
          mma_rows += [(f"rmsnorm_swiglu w_down_t_DF {tag}", "rmsnorm_swiglu w_down_t_DF",
                        dict(pallas_opts("rmsnorm_swiglu"), **mma))]
        mma_rows += [(f"{op} {tag}", op, dict(pallas_opts(op), o_block=mma, **mma))
                     for op in ("attention_out_mlp", "out_proj_mlp")]
        mma_rows += [(f"{op} {tag}", op, both(**mma))
                     for op in ("rmsnorm_swiglu_2k", "rmsnorm_swiglu_2k chained")]
        mma_rows += [(f"{op} {tag}", op, mma) for op in ("rmsnorm_qkv", "out_proj_residual",
                                                         "lm_head_argmax")]
        mma_rows += [(f"attention_out_proj {tag}", "attention_out_proj",
                      dict(pallas_opts("attention_out_proj"), o_block=mma))]
        # int8 weights (A widened in registers); the MLP's down tiles are A with W_down^T
        mma_rows += [(f"{op} int8 {tag}", f"{op} int8", dict(pallas_opts(op), **mma))
                     for op in ("rmsnorm_swiglu", "rmsnorm_qkv", "out_proj_residual",
                                "lm_head_argmax")]
        mma_rows += [(f"rmsnorm_swiglu int8 w_down_t_DF {tag}",
                      "rmsnorm_swiglu int8 w_down_t_DF",
                      dict(pallas_opts("rmsnorm_swiglu"), **mma))]
        if sz == 64:
          mma = dict(gemv="mma", block_k=128)
          mma_rows += [("rmsnorm_swiglu_2k gemv=mma gate_up split_k=2 down split_k=8",
                        "rmsnorm_swiglu_2k", dict(gate_up_block=dict(mma, split_k=2),
                                                  down_block=dict(mma, split_k=8)))]
          mma_rows += attn_rows
          # int8 WGMMA against the vector's int8 digits (gemv "mma-s8"; 128-byte rows)
          s8 = dict(gemv="mma-s8")
          mma_rows += [(f"{op} int8 gemv=mma-s8", f"{op} int8", dict(pallas_opts(op), **s8))
                       for op in ("rmsnorm_swiglu", "rmsnorm_qkv", "out_proj_residual",
                                  "lm_head_argmax")]
          mma_rows += [("rmsnorm_swiglu int8 w_down_t_DF gemv=mma-s8",
                        "rmsnorm_swiglu int8 w_down_t_DF",
                        dict(pallas_opts("rmsnorm_swiglu"), **s8))]
      fill = mma_rows + fill
    elif "attn" in groups:
      fill = attn_rows + fill
    for name, op, kw in fill:
      if name in sw:   # also in another selected group
        continue
      make, args, _ = cases[op]
      sw[name] = _guarded(f"sweep {name}", lambda: timed(
          make("pallas", interpret=interpret, **kw), args, nbytes[op]))
    # W_down^T [D, F]: the down blocks reduced along rows (within quads of threads) instead
    # of across the warpgroup's warps; bf16 and int8, both stores.
    for name in ("rmsnorm_swiglu", "rmsnorm_swiglu int8") if "down-t" in groups else ():
      _, a, _ = cases[name]
      xa, ga, wga, wua, wda = a[:5]
      sc = dict(zip(("w_gate_scale_F", "w_up_scale_F", "w_down_scale_D"), a[5:]))
      targs = (xa, ga, wga, wua, jnp.asarray(wda.T), *sc.values())
      for once in (False, True):
        def fn(x_, g_, wg_, wu_, wdt_, *s_, once=once):
          return rmsnorm_swiglu(x_, g_, wg_, wu_, w_down_t_DF=wdt_, eps=1e-6, impl="pallas",
                                interpret=interpret, store_once=once, **dict(zip(sc, s_)),
                                **opts.get("rmsnorm_swiglu", {}))
        sw[f"{name} w_down_t_DF store_once={once}"] = _guarded(
            f"sweep {name} w_down_t_DF store_once={once}",
            lambda: timed(fn, targs, nbytes[name]))
    # PDL: in the timing loop each call may start while the previous call's kernels run.
    for op in ("rmsnorm_qkv", "out_proj_residual", "rmsnorm_swiglu", "out_proj_mlp",
               "attention_out_mlp", "rmsnorm_swiglu_2k") if "pdl" in groups else ():
      make, args, _ = cases[op]
      for pdl in ("wait", "prefetch"):
        sw[f"{op} pdl={pdl}"] = _guarded(f"sweep {op} pdl={pdl}", lambda: timed(
            make("pallas", pdl=pdl, interpret=interpret, **pallas_opts(op)), args, nbytes[op]))
      if op in ("rmsnorm_qkv", "out_proj_residual", "rmsnorm_swiglu"):   # a deeper prefetch
        name = f"{op} pdl=prefetch prefetch_tiles=4"
        sw[name] = _guarded(f"sweep {name}", lambda: timed(
            make("pallas", pdl="prefetch", prefetch_tiles=4, interpret=interpret,
                 **pallas_opts(op)), args, nbytes[op]))
    for op in ("rmsnorm_qkv", "rmsnorm_swiglu") if "stages" in groups else ():
      make, args, elems = cases[op]
      for st in (2, 3, 4):
        sw[f"{op} stages={st}"] = _guarded(f"sweep {op} stages={st}", lambda: timed(
            make("pallas", stages=st, interpret=interpret), args, elems * dt.itemsize))
    out["sweep"] = sw
  return out


def _log(msg: str):
  print(f"[bench decode] {msg}", file=sys.stderr, flush=True)


def _guarded(what: str, fn) -> dict:
  """fn() or {"error": ...}: on a device run one failing kernel must not lose the
  other variants' figures. The error is recorded and printed, never hidden."""
  try:
    r = fn()
  except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    _log(f"{what}: FAILED {msg}")
    return {"error": msg}
  flat = {k: v for k, v in r.items() if isinstance(v, float)}
  for k, sub in r.items():   # (one level down: the profile's host summary)
    if isinstance(sub, dict):
      flat.update({f"{k}.{kk}": vv for kk, vv in sub.items() if isinstance(vv, float)})
  said = ", ".join(f"{k}={v:.4g}" for k, v in flat.items())
  if said:
    _log(f"{what}: {said}")
  return r


def run(args) -> dict:
  from flax import nnx

  from jaxlab.models import LM, ModelConfig
  from jaxlab.models.decode import make_decoder, prepare_weights
  kwargs, default_kv, default_gemv = CONFIGS[args.config]
  cfg = ModelConfig(**kwargs)
  kv_len = args.kv_len if args.kv_len is not None else default_kv
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f"--variants: unknown variant {v!r} (known: {', '.join(VARIANTS)})")
  opts = json.loads(args.kernel_options) if args.kernel_options else None
  # options of both impls (the cache row write) also reach the XLA variants
  both_impls = {op: o for op, o in (opts or {}).items() if op == "rope_append"} or None
  backend = jax.default_backend()
  dev = jax.devices()[0]
  attention_only = _attention_only(cfg)
  res = dict(config=args.config, device=getattr(dev, "device_kind", str(dev)), backend=backend,
             jax=jax.__version__, dtype=cfg.param_dtype, kv_len=kv_len, steps=args.steps,
             weight_bytes=_weight_bytes(cfg) if attention_only else None, variants={})
  from kernels._common import pdl_launch_supported
  res["pdl_launch"] = pdl_launch_supported()   # do pdl kernels get the PDL launch attribute
  if backend == "cpu":
    res["note"] = ("CPU backend: the Pallas kernels run in interpret mode, so their timings are "
                   "meaningless (and XLA CPU timings say nothing about a GPU)")
  res["gemv"] = gemv_bandwidth(args.gemv_size or default_gemv, args.repeats)
  model = LM(cfg, rngs=nnx.Rngs(args.seed))
  positions = {lp: _loop_positions(lp, args.steps, args.warmup, args.repeats)
               for lp in LOOPS}
  max_len = kv_len + max(positions[lp][0] for lp in ("step",) + tuple(args.loop))
  key = jax.random.key(args.seed + 1)
  first = 1
  if not attention_only:
    from jaxlab.models.decode import SLOT_MULTIPLE, init_state
    res["weight_bytes"] = _model_weight_bytes(model)
    shapes = jax.eval_shape(lambda: init_state(cfg, -(-max_len // SLOT_MULTIPLE) * SLOT_MULTIPLE))

  def bytes_in(loop: str) -> float:
    """Bytes per token of a loop: every weight + the live caches at its mean length."""
    mean_len = kv_len + positions[loop][1]
    if attention_only:
      return res["weight_bytes"] + _kv_bytes(cfg, mean_len)
    return res["weight_bytes"] + _cache_bytes(cfg, shapes, mean_len)

  bytes_tok = res["bytes_per_token"] = bytes_in("step")
  full_weights = _decode_weight_bytes(jax.eval_shape(lambda: prepare_weights(model)))

  def rate(r):
    r["gbps"] = r.setdefault("bytes_per_token", bytes_tok) / (r["ms_per_token"] * 1e-3) / 1e9
    r["frac_of_gemv"] = r["gbps"] / res["gemv"]["gbps"]
    return r

  def one(v):
    """Time variant v with each loop; each row is logged as it finishes."""
    if v == "model" and not attention_only:
      raise ValueError("variant model: the bench builds attention caches only "
                       "(use pallas / xla-unrolled for hybrid configs)")
    if v == "model":   # (the LM's own extend: no in-place form)
      res["variants"][v] = _guarded(f"variant {v}", lambda: rate(_run_model(
          model, cfg, kv_len, max_len, first, args.steps, args.warmup, args.repeats, key)))
      return
    impl, layers, quantize, share = _DECODER_VARIANTS[v]
    kopts = dict(opts or {}, **_VARIANT_OPTIONS.get(v, {})) if impl == "pallas" else both_impls
    dec = make_decoder(model, impl, max_len, layers=layers,
                       interpret=args.interpret if impl == "pallas" else None,
                       kernel_options=kopts, quantize=quantize, share_layers=share)
    for loop in args.loop:
      name = v + LOOP_SUFFIX[loop]

      def timed(loop=loop, name=name):
        r = _run_decoder(dec, cfg, kv_len, first, args.steps, args.warmup, args.repeats, key,
                         loop=loop)
        # the same cache traffic; int8: the weights as this decoder stores them
        r["bytes_per_token"] = bytes_in(loop) + (
            _decode_weight_bytes(dec.weights) - full_weights if quantize else 0)
        if args.profile:
          import os
          r["profile"] = _guarded(f"profile {name}", lambda: _profile_decoder(
              dec, cfg, kv_len, first, key, os.path.join(args.profile, name),
              n_steps=args.steps if loop == "device" else 16, loop=loop))
        return rate(dict(r, variant=v, loop=loop))

      res["variants"][name] = _guarded(f"variant {name}", timed)
    del dec

  for v in variants:
    built = _guarded(f"decoder {v}", lambda v=v: one(v) or {})
    if "error" in built:   # (the decoder itself failed: its row says so)
      res["variants"][v] = built
  if args.ops:
    res["ops"] = op_table(cfg, kv_len, args.interpret, opts, args.repeats, sweep=args.sweep)
  rows = res["variants"]
  ran = lambda name: "ms_per_token" in rows.get(name, {})
  for v, r in rows.items():
    suffix = LOOP_SUFFIX[r.get("loop", "step")]
    # pallas-int8 against the same int8 step in XLA; xla-int8 against the unquantized
    # step (its row then shows the quantization error).
    ref_v = "xla-int8" if r.get("variant", v).startswith("pallas-int8") and any(
        ran("xla-int8" + sfx) for sfx in LOOP_SUFFIX.values()) else "xla-unrolled"
    # Tokens against the reference's row of the same loop (the same positions); the first
    # step's logits against its first row that has them (the device loop has none).
    same = rows.get(ref_v + suffix, {})
    with_logits = [ref_v + sfx for sfx in LOOP_SUFFIX.values()
                   if "logits0" in rows.get(ref_v + sfx, {})]
    # (the reference's own row compares with itself, as a check of the check)
    tok_ref = ref_v + suffix if "tokens" in same else None
    log_ref = with_logits[0] if with_logits else None
    named = log_ref if log_ref and "logits0" in r else tok_ref if "tokens" in r else None
    if named and named != v:
      r["reference"] = named
    if tok_ref and "tokens" in r:
      ref = same["tokens"]
      r["tokens_match_xla"] = f"{sum(a == b for a, b in zip(r['tokens'], ref))}/{len(ref)}"
    if log_ref and "logits0" in r:
      # Same cache, same token: the first step's logits must agree up to bf16 rounding.
      # (Chained greedy tokens of a random-init bf16 model diverge at the first near-tie.)
      ref_logits = rows[log_ref]["logits0"]
      r["logits_rel_err"] = float(np.max(np.abs(r["logits0"] - ref_logits))
                                  / max(float(np.max(np.abs(ref_logits))), 1e-30))
      r["argmax_match_xla"] = bool(np.argmax(r["logits0"]) == np.argmax(ref_logits))
  for r in res["variants"].values():
    r.pop("logits0", None)
  return res


def format_table(res: dict) -> str:
  g = res["gemv"]
  lines = [f"config {res['config']}  device {res['device']} ({res['backend']}, jax {res['jax']})  "
           f"dtype {res['dtype']}  kv_len {res['kv_len']}  steps {res['steps']}  "
           f"pdl launch {'yes' if res.get('pdl_launch') else 'no (JAX < 0.11)'}",
           f"bytes/token {res['bytes_per_token'] / 1e6:.1f} MB (weights "
           f"{res['weight_bytes'] / 1e6:.1f} MB + live caches)",
           f"lone GEMV {g['n']}x{g['n']} bf16: {g['ms']:.3f} ms, {g['gbps']:.1f} GB/s "
           "(reference bandwidth)"]
  if "note" in res:
    lines.append(f"NOTE: {res['note']}")
  vw = max([18] + [len(v) for v in res["variants"]])
  lines.append(f"{'variant':{vw}s} {'ms/token':>9s} {'host ms':>8s} {'MB/tok':>7s} {'GB/s':>8s} "
               f"{'of GEMV':>8s} {'compile s':>9s} {'vs':>12s} {'tokens=':>7s} "
               f"{'logits err':>10s} {'argmax=':>7s}")
  for v, r in res["variants"].items():
    if "error" in r:
      lines.append(f"{v:{vw}s} FAILED {r['error']}")
      continue
    lines.append(f"{v:{vw}s} {r['ms_per_token']:9.3f} "
                 f"{r.get('dispatch_ms_per_token', float('nan')):8.3f} "
                 f"{r['bytes_per_token'] / 1e6:7.1f} "
                 f"{r['gbps']:8.1f} {r['frac_of_gemv']:8.1%} {r['compile_s']:9.1f} "
                 f"{r.get('reference', '-'):>12s} {r.get('tokens_match_xla', '-'):>7s} "
                 f"{r.get('logits_rel_err', float('nan')):10.2e} "
                 f"{str(r.get('argmax_match_xla', '-')):>7s}")
  for v, r in res["variants"].items():
    prof = r.get("profile", {})
    if "top" in prof:
      lines.append(f"profile {v}: {prof['kernels_per_step']:.0f} kernels/step, device busy "
                   f"{prof['busy_us_per_step']:.0f} of {prof['span_us_per_step']:.0f} us/step "
                   f"(idle {prof['idle_fraction']:.0%})")
      row = lambda k: (f"    {k['us_per_step']:8.1f} us/step {k['calls_per_step']:5.1f} calls  "
                       f"{k['name']}")
      lines += [row(k) for k in prof["top"]]
      h = prof.get("host")
      if h:
        lines.append(f"  host {v}: dispatch {h['dispatch_us_per_step']:.0f} us/step, command-"
                     f"buffer updates {h['updates_per_step']:.2f}/step "
                     f"({h['update_us_per_step']:.0f} us), graph launch "
                     f"{h['graph_launch_us_per_step']:.0f} us/step")
        lines += [row(k) for k in h["top"]]
    elif prof:
      lines.append(f"profile {v}: {prof.get('note') or prof.get('error')}")
  if "ops" in res:
    w = max([18] + [len(op) for op in res["ops"] if op != "sweep"])
    lines.append(f"per op (one layer): {'op':{w}s} {'MB':>7s} {'pallas us':>10s} {'GB/s':>7s} "
                 f"{'xla us':>9s} {'GB/s':>7s}")
    for op, r in res["ops"].items():
      if op == "sweep":
        continue
      if "error" in r["pallas"] or "error" in r["xla"]:
        lines.append(f"{'':20s}{op:{w}s} FAILED pallas: {r['pallas'].get('error', 'ok')}; "
                     f"xla: {r['xla'].get('error', 'ok')}")
        continue
      lines.append(f"{'':20s}{op:{w}s} {r['bytes'] / 1e6:7.2f} {r['pallas']['us']:10.1f} "
                   f"{r['pallas']['gbps']:7.1f} {r['xla']['us']:9.1f} {r['xla']['gbps']:7.1f}")
    for name, r in res["ops"].get("sweep", {}).items():
      if "error" in r:
        lines.append(f"{'sweep':20s}{name:38s} FAILED {r['error']}")
        continue
      lines.append(f"{'sweep':20s}{name:38s} {r['us']:9.1f} us {r['gbps']:7.1f} GB/s")
  return "\n".join(lines)


def main(args) -> int:
  res = run(args)
  print(format_table(res))
  if args.json:
    out = {k: v for k, v in res.items()}
    out["variants"] = {k: {kk: vv for kk, vv in v.items() if kk != "tokens"}
                       for k, v in res["variants"].items()}
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return 0


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_arguments(p)
  sys.exit(main(p.parse_args()))
