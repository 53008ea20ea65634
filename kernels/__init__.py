"""jaxlab kernels: Pallas (Mosaic GPU) kernels for the batch-1 decode step, each
next to its fp32 XLA reference behind one API with an explicit `impl=`
("xla" | "pallas"; anything else raises ValueError).

Layout: kernels/<op>/{__init__.py (the API), reference.py, pallas.py}; import an
op from its package, e.g. `from kernels.decode_attention import decode_attention`.

  rmsnorm_qkv              fused RMSNorm + QKV GEMV (+ bias)
  rope_append              RoPE on q, k and the KV-cache row write
  decode_attention         GQA attention over the KV cache, split-K with (m, l, o) merge
  out_proj_residual        output projection GEMV + residual
  rmsnorm_swiglu           fused RMSNorm + SwiGLU MLP + residual (split over the hidden dim)
  lm_head_argmax           final RMSNorm + LM head + argmax
  path_key_update          PaTH decode key-cache update K <- K - beta (K w) w^T
  log_linear_state_update  log-linear Mamba-2 / GDN decode step on the level states

Fused pairs (two or three kernels that pass unfinished partials to each other, no XLA
kernel between them; the decode driver's default, kernel_options "fuse"):

  qkv_rope_append          rmsnorm_qkv + rope_append (cache row written in place)
  out_proj_mlp             out_proj_residual + rmsnorm_swiglu
  attention_out_mlp        decode_attention + out_proj_mlp (merge inside the O GEMV)

The two-kernel MLP layout (kernel_options layout mlp "2k") chains further: its ops take
and return the residual stream as kernels.unfinished.Unfinished (partial rows the next
GEMV adds up as it streams x), so no XLA kernel runs between layers:

  rmsnorm_swiglu_2k        the MLP as two GEMV kernels (finish=False: result unfinished)
  attention_out_proj       decode_attention + the O GEMV, result unfinished
  (qkv_rope_append and lm_head_argmax take an Unfinished x_D)

On CPU the Pallas forms run interpreted (`interpret=None` picks the fast HLO
interpreter on CPU; `interpret="mosaic"` runs the exact kernel in the Mosaic-GPU
interpreter). The Pallas forms are inference-only. See docs/kernels.md and
jaxlab/models/decode.py (the decode driver that chains them).
"""
