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

On CPU the Pallas forms run interpreted (`interpret=None` picks the fast HLO
interpreter on CPU; `interpret="mosaic"` runs the exact kernel in the Mosaic-GPU
interpreter). The Pallas forms are inference-only. See docs/kernels.md and
jaxlab/models/decode.py (the decode driver that chains them).
"""
