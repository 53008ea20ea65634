"""The decode benchmark's harness (jaxlab bench decode): trace summary and a CPU smoke run."""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.bench import decode


def _trace():
  meta = [dict(ph="M", name="process_name", pid=1, args=dict(name="/host:CPU")),
          dict(ph="M", name="process_name", pid=2, args=dict(name="/device:GPU:0")),
          dict(ph="M", name="thread_name", pid=2, tid=7, args=dict(name="Stream #7(Compute)")),
          dict(ph="M", name="thread_name", pid=2, tid=9, args=dict(name="XLA Ops"))]
  k = lambda name, ts, dur, tid=7, pid=2: dict(ph="X", name=name, pid=pid, tid=tid, ts=ts, dur=dur)
  # Two steps: kernels a (10 us) and b (20 us, overlapping a by 5 us), then a 20 us gap.
  ev = [k("a", 0, 10), k("b", 5, 20), k("a", 45, 10), k("b", 50, 20),
        k("op row, not a kernel", 0, 70, tid=9), k("host", 0, 1000, pid=1, tid=3)]
  return {"traceEvents": meta + ev}


def test_summarize_trace_counts_kernels_busy_time_and_gaps():
  s = decode.summarize_trace(_trace(), n_steps=2)
  assert s["threads"] == ["Stream #7(Compute)"]
  assert s["kernels_per_step"] == 2
  assert s["busy_us_per_step"] == 25.0            # union of [0, 25] and [45, 70], per step
  assert s["span_us_per_step"] == 35.0
  assert abs(s["idle_fraction"] - (1 - 50 / 70)) < 1e-12
  assert [(t["name"], t["us_per_step"], t["calls_per_step"]) for t in s["top"]] == [
      ("b", 20.0, 1.0), ("a", 10.0, 1.0)]


def test_summarize_trace_reads_the_hosts_command_buffer_work():
  """Per step: the dispatch (nested PjitFunction events count once), command-buffer
  updates and graph launches, as XLA's runtime names them in its host trace."""
  t = _trace()
  h = lambda name, ts, dur: dict(ph="X", name=name, pid=1, tid=3, ts=ts, dur=dur)
  step, launch = "PjitFunction(_step_unrolled)", "cuGraphLaunch (CudaGraph:2)"
  t["traceEvents"] += [h(step, 0, 40), h(step, 1, 38), h("command_buffer::update", 2, 10),
                       h(launch, 12, 20), h(step, 50, 30), h(launch, 52, 6),
                       h("$profiler.py:307 trace", 0, 5000)]
  host = decode.summarize_trace(t, n_steps=2)["host"]
  assert host["dispatch_us_per_step"] == 35.0                  # (40 + 30) / 2
  assert host["updates_per_step"] == 0.5 and host["update_us_per_step"] == 5.0
  assert host["graph_launch_us_per_step"] == 13.0
  assert host["top"][0]["name"] == "host"                      # the longest; Python frames left out
  assert all(not e["name"].startswith("$") for e in host["top"])


def test_cpu_smoke_run_in_place_and_device_loops(tmp_path):
  """--loop inplace,device: rows '<variant>+inplace' (first-step logits checked against
  xla-unrolled's in-place row) and '<variant>+device' (all steps in one call: its tokens
  against xla-unrolled's device loop), with the host's dispatch time per token. (XLA
  variants, for time: tests/test_kernels_decode.py runs the Pallas step both ways.)"""
  p = argparse.ArgumentParser()
  decode.add_arguments(p)
  out = tmp_path / "r.json"
  args = p.parse_args(["--config", "tiny", "--steps", "3", "--repeats", "1", "--warmup", "1",
                       "--variants", "xla-unrolled,xla-scan", "--loop", "inplace,device",
                       "--json", str(out)])
  assert decode.main(args) == 0
  res = json.loads(out.read_text())
  assert sorted(res["variants"]) == ["xla-scan+device", "xla-scan+inplace",
                                     "xla-unrolled+device", "xla-unrolled+inplace"]
  r = res["variants"]["xla-scan+inplace"]
  assert r["reference"] == "xla-unrolled+inplace" and r["argmax_match_xla"] is True
  assert r["logits_rel_err"] < 1e-4 and "tokens_match_xla" not in r
  assert 0 < r["dispatch_ms_per_token"] <= r["ms_per_token"]
  r = res["variants"]["xla-scan+device"]
  assert r["reference"] == "xla-unrolled+device" and r["tokens_match_xla"] == "3/3"
  # the device loop's timed steps sit 3 positions later (its compiling call ran 3 steps)
  assert r["bytes_per_token"] > res["variants"]["xla-scan+inplace"]["bytes_per_token"]


def test_loop_argument_names_the_unknown_loop():
  p = argparse.ArgumentParser()
  decode.add_arguments(p)
  assert p.parse_args([]).loop == ("step", "inplace")
  assert p.parse_args(["--loop", "device,step,device"]).loop == ("device", "step")
  with pytest.raises(SystemExit):
    p.parse_args(["--loop", "step,graph"])


def test_summarize_trace_without_gpu_events_says_so():
  s = decode.summarize_trace({"traceEvents": _trace()["traceEvents"][:1]}, n_steps=1)
  assert s["note"].startswith("no GPU stream events")


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_cpu_smoke_run_records_every_variant(tmp_path):
  p = argparse.ArgumentParser()
  decode.add_arguments(p)
  out = tmp_path / "r.json"
  args = p.parse_args(["--config", "tiny", "--steps", "2", "--repeats", "1", "--warmup", "1",
                       "--variants", "xla-unrolled,pallas,xla-int8,pallas-int8,pallas-unfused,"
                       "pallas-prefetch", "--loop", "step",
                       "--profile", str(tmp_path / "prof"), "--json", str(out)])
  assert decode.main(args) == 0
  res = json.loads(out.read_text())
  for v in ("xla-unrolled", "pallas"):
    r = res["variants"][v]
    assert r["ms_per_token"] > 0 and r["argmax_match_xla"] is True
    assert r["profile"]["note"].startswith("no GPU stream events")   # CPU trace
  assert res["variants"]["pallas"]["logits_rel_err"] < 1e-4            # fp32 tiny model
  ru = res["variants"]["pallas-unfused"]   # without the cross-op fusions: same step
  assert ru["argmax_match_xla"] is True and ru["logits_rel_err"] < 1e-4
  rp = res["variants"]["pallas-prefetch"]   # PDL: the same kernels, launched to overlap
  assert rp["argmax_match_xla"] is True and rp["logits_rel_err"] < 1e-4
  assert res["pdl_launch"] is (tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11))
  # int8: pallas-int8 is checked against the same int8 step in XLA; bytes per token drop
  # by 3 bytes per GEMV weight (fp32 -> int8) and add one fp32 scale per output channel.
  r8 = res["variants"]["pallas-int8"]
  assert r8["reference"] == "xla-int8" and r8["argmax_match_xla"] is True
  assert r8["logits_rel_err"] < 1e-4
  assert res["variants"]["xla-int8"]["reference"] == "xla-unrolled"
  D, F, V, L, N = 128, 256, 512, 2, (6 + 2 * 2) * 32
  weights = L * (N * D + D * 6 * 32 + 3 * F * D) + V * D
  scales = L * (N + D + 2 * F + D) + V
  assert r8["bytes_per_token"] == res["bytes_per_token"] - 3 * weights + 4 * scales


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_cpu_smoke_run_hybrid_config(tmp_path):
  """PaTH / log-linear layers in the bench: pallas agrees with xla; bytes per token count
  the weights once plus each layer kind's cache traffic; unsupported variants say why."""
  p = argparse.ArgumentParser()
  decode.add_arguments(p)
  out = tmp_path / "r.json"
  args = p.parse_args(["--config", "hybrid-tiny", "--steps", "2", "--repeats", "1",
                       "--warmup", "1", "--variants", "xla-unrolled,pallas,model",
                       "--loop", "step", "--json", str(out)])
  assert decode.main(args) == 0
  res = json.loads(out.read_text())
  assert res["variants"]["pallas"]["argmax_match_xla"] is True
  assert res["variants"]["pallas"]["logits_rel_err"] < 1e-4
  assert "attention caches only" in res["variants"]["model"]["error"]
  # hybrid-tiny: 4 layers (path, levels, attention, levels), fp32, Hkv 2, Dh 64.
  from jaxlab.models import ModelConfig
  from jaxlab.models.decode import init_state
  cfg = ModelConfig(**decode.CONFIGS["hybrid-tiny"][0])
  st = init_state(cfg, 128)
  n = 100.0
  want = (2 * 4 + 4) * 2 * 64 * n                      # PaTH: K read + write, V read
  want += 2 * 4 * 2 * 64 * n                           # attention: K, V read
  want += 2 * sum(a.nbytes for a in st["levels"] if a is not None)   # levels read + write
  assert decode._cache_bytes(cfg, st, n) == want


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_hybrid_op_cases_run_and_agree():
  """The per-op rows added for PaTH / log-linear configs call their ops correctly."""
  from jaxlab.models import ModelConfig
  cfg = ModelConfig(**decode.CONFIGS["hybrid-tiny"][0])
  r = lambda i, *shape: jax.random.normal(jax.random.key(i), shape).astype(jnp.float32)
  cases, nbytes = decode._hybrid_op_cases(cfg, 100, 128, r)
  ll = [f"log_linear_state_update ({v}){s}" for v in ("mamba2", "gdn")
        for s in ("", " serial levels", " t+1")]
  assert set(cases) == {"path_decode_attention", *ll}
  from jaxlab.testing import assert_rel_close, tol
  # fp32 throughout; largest reduction: attention over 100 slots x Dh 64, or the level read
  # over L levels x dk 64 (L = 12 for max_seq_len 2048).
  reduction = {"path_decode_attention": 100 * 64}
  for op, (make, args, _) in cases.items():
    assert nbytes[op] > 0
    a = jax.tree.leaves(make("xla")(*args))
    b = jax.tree.leaves(make("pallas")(*args))
    for x, y in zip(a, b):
      x, y = np.asarray(x), np.asarray(y)
      if x.ndim == 3 and x.shape[1] == 128:   # PaTH keys: only the live slots are defined
        x, y = x[:, :100], y[:, :100]
      assert_rel_close(y, x, rtol=tol(jnp.float32, reduction.get(op, 12 * 64)), name=op)


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_cpu_smoke_run_gated_config(tmp_path):
  """PaTH-FoX / FoX layers in the bench: pallas agrees with xla; the cache bytes count the
  gate row (read + rewritten) of each gated layer; the per-op rows for the biased
  attention kernels, and for the kernels that update the gate themselves, run and agree."""
  p = argparse.ArgumentParser()
  decode.add_arguments(p)
  out = tmp_path / "r.json"
  args = p.parse_args(["--config", "gated-tiny", "--steps", "2", "--repeats", "1",
                       "--warmup", "1", "--variants", "xla-unrolled,pallas", "--json", str(out)])
  assert decode.main(args) == 0
  res = json.loads(out.read_text())
  assert res["variants"]["pallas"]["argmax_match_xla"] is True
  assert res["variants"]["pallas"]["logits_rel_err"] < 1e-4
  from jaxlab.models import ModelConfig
  from jaxlab.models.decode import init_state
  cfg = ModelConfig(**decode.CONFIGS["gated-tiny"][0])
  st = init_state(cfg, 128)
  n = 100.0
  want = (2 * 4 + 4) * 2 * 64 * n + 2 * 4 * 6 * n     # PaTH-FoX: K r+w, V r; gate r+w
  want += (4 + 4) * 2 * 64 * n + 2 * 4 * 6 * n        # FoX: K, V read; gate r+w
  assert decode._cache_bytes(cfg, st, n) == want
  r = lambda i, *shape: jax.random.normal(jax.random.key(i), shape).astype(jnp.float32)
  cases, nbytes = decode._hybrid_op_cases(cfg, 100, 128, r)
  assert set(cases) == {f"{a} ({b})" for a in ("path_decode_attention", "decode_attention")
                        for b in ("gate bias", "gate update")}
  from jaxlab.testing import assert_rel_close, tol
  for op, (make, a, _) in cases.items():
    assert nbytes[op] > 0
    x = jax.tree.leaves(make("xla")(*a))
    y = jax.tree.leaves(make("pallas")(*a))
    # fp32 attention over 100 slots x Dh 64
    assert_rel_close(np.asarray(y[0]), np.asarray(x[0]), rtol=tol(jnp.float32, 100 * 64), name=op)
    if "update" in op:   # the updated gate row comes last; its live slots agree exactly
      assert y[-1].shape == (6, 128)
      np.testing.assert_array_equal(np.asarray(y[-1])[:, :100], np.asarray(x[-1])[:, :100])
  upd, bias = "decode_attention (gate update)", "decode_attention (gate bias)"
  assert nbytes[upd] - nbytes[bias] == 4 * 6 * 100   # + the gate row's write


@pytest.mark.slow   # ~35 s: the whole op table at a shape that takes every split
def test_op_table_fill_sweep_rows_run():
  """`--ops --sweep fill`: the fuller-grid rows (two-kernel MLP splits, chained too; O
  split 8 and 16) run at a shape that takes them, interpreted."""
  from jaxlab.models import ModelConfig
  cfg = ModelConfig(**dict(decode.CONFIGS["tiny"][0], d_model=256, n_heads=32, n_kv_heads=4,
                           head_dim=64, ffn_dim=1024))
  out = decode.op_table(cfg, 128, None, None, 1, iters=1, sweep="fill")
  sw = out.pop("sweep")
  two = ("gate_up split_k=2", "down split_k=8", "gate_up split_k=2 down split_k=8")
  assert set(sw) == ({f"rmsnorm_swiglu_2k {n}" for n in two}
                     | {f"rmsnorm_swiglu_2k chained {n}" for n in two}
                     | {"out_proj_residual split_k=8", "out_proj_residual split_k=16"})
  bad = {k: r["error"] for k, r in sw.items() if "error" in r}
  assert not bad, bad


@pytest.mark.slow   # ~35 s: the whole op table, four sweep rows
def test_op_table_attn_sweep_rows_run():
  """`--ops --sweep attn` (scripts/gpu_session.sh's LONG stage): the attention rows with
  their products on the tensor cores, and only those, at a bf16 shape."""
  from jaxlab.models import ModelConfig
  cfg = ModelConfig(**dict(decode.CONFIGS["tiny"][0], d_model=256, n_heads=32, n_kv_heads=4,
                           head_dim=64, ffn_dim=1024, param_dtype="bfloat16"))
  out = decode.op_table(cfg, 128, None, None, 1, iters=1, sweep="attn")
  sw = out.pop("sweep")
  assert set(sw) == {f"{op} scores={sc}" for op in ("decode_attention", "attention_out_proj")
                     for sc in ("mma", "mma-pv")}
  bad = {k: r["error"] for k, r in sw.items() if "error" in r}
  assert not bad, bad


@pytest.mark.slow   # ~2.5 min: 54 rows, interpreted
def test_op_table_mma_sweep_rows_run():
  """`--ops --sweep mma`: every GEMV op with its inner product on the tensor cores, per B
  width (the one-kernel MLP also in the fused layer and with W_down^T), the int8 ops with
  their tiles widened to bf16 and with int8 WGMMA ("mma-s8"), the two-kernel MLP with the fill grids, and attention with
  its scores on the tensor cores, at a bf16 shape, interpreted."""
  from jaxlab.models import ModelConfig
  cfg = ModelConfig(**dict(decode.CONFIGS["tiny"][0], d_model=256, n_heads=32, n_kv_heads=4,
                           head_dim=64, ffn_dim=1024, param_dtype="bfloat16"))
  out = decode.op_table(cfg, 128, None, None, 1, iters=1, sweep="mma")
  sw = out.pop("sweep")
  ops = ("rmsnorm_qkv", "out_proj_residual", "lm_head_argmax", "rmsnorm_swiglu_2k",
         "rmsnorm_swiglu_2k chained", "attention_out_proj", "rmsnorm_swiglu",
         "attention_out_mlp", "out_proj_mlp")
  assert set(sw) == ({f"{op} gemv=mma swizzle={z}" for op in ops for z in (32, 64, 128)}
                     | {f"rmsnorm_swiglu w_down_t_DF gemv=mma swizzle={z}" for z in (32, 64)}
                     | {f"{op} int8 gemv=mma swizzle={z}" for z in (32, 64, 128)
                        for op in ("rmsnorm_swiglu", "rmsnorm_qkv", "out_proj_residual",
                                   "lm_head_argmax")}
                     | {f"rmsnorm_swiglu int8 w_down_t_DF gemv=mma swizzle={z}"
                        for z in (32, 64, 128)}
                     | {f"{op} int8 gemv=mma-s8"
                        for op in ("rmsnorm_swiglu", "rmsnorm_qkv", "out_proj_residual",
                                   "lm_head_argmax")}
                     | {"rmsnorm_swiglu int8 w_down_t_DF gemv=mma-s8"}
                     | {"rmsnorm_swiglu_2k gemv=mma gate_up split_k=2 down split_k=8",
                        "decode_attention scores=mma", "attention_out_proj scores=mma",
                        "decode_attention scores=mma-pv", "attention_out_proj scores=mma-pv"})
  bad = {k: r["error"] for k, r in sw.items() if "error" in r}
  assert not bad, bad


@pytest.mark.slow   # default run under 15 min on the 2-core VM; CI runs it
def test_op_table_pdl_sweep_rows_run():
  """`--ops --sweep pdl`: every per-op row and the PDL rows of the fused and plain ops
  run (interpreted here; failures would be recorded as {"error": ...}); an unknown sweep
  group is an error."""
  import pytest

  from jaxlab.models import ModelConfig
  cfg = ModelConfig(**decode.CONFIGS["tiny"][0])
  out = decode.op_table(cfg, 64, None, None, 1, iters=2, sweep="pdl")
  sw = out.pop("sweep")
  assert set(sw) == {f"{op} pdl={p}" for op in ("rmsnorm_qkv", "out_proj_residual",
                                                "rmsnorm_swiglu", "out_proj_mlp",
                                                "attention_out_mlp", "rmsnorm_swiglu_2k")
                     for p in ("wait", "prefetch")} | {
      f"{op} pdl=prefetch prefetch_tiles=4"
      for op in ("rmsnorm_qkv", "out_proj_residual", "rmsnorm_swiglu")}
  bad = {k: r["error"] for k, r in sw.items() if "error" in r}
  bad.update({f"{op} {i}": r[i]["error"] for op, r in out.items() for i in ("xla", "pallas")
              if "error" in r[i]})
  assert not bad, bad
  with pytest.raises(ValueError, match="unknown group"):
    decode.op_table(cfg, 64, None, None, 1, sweep="pdl,nope")
  p = argparse.ArgumentParser()
  decode.add_arguments(p)
  assert p.parse_args(["--sweep"]).sweep == "all"
  with pytest.raises(SystemExit):   # told when the command line is read
    p.parse_args(["--ops", "--sweep", "pdl,nope"])
