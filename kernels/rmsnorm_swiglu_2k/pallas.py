"""The MLP block as two GEMV kernels (kernels/_gemv.py) instead of one:

  1. [W_gate^T; W_up^T] [2F, D] times norm(x): 2F/BN row blocks (256 CTAs at
     llama-1b-bench), its split-K partials and sum(x^2) slices left unfinished;
  2. W_down^T [D, F] times h, where each CTA finishes h = silu(gate) * up block by
     block from kernel 1's partials as it streams (gemv_partials_swiglu), split over F
     so that it too runs on >= 128 CTAs; one XLA reduction adds its partial rows to x,
     or (finish=False) the next kernel does, as it streams x (kernels/unfinished.py).

The one-kernel MLP (kernels/rmsnorm_swiglu) runs one CTA per 64 hidden units: 128 CTAs
at 1B, one per SM and one warpgroup each, so its FMAs and reductions have little to hide
their latency behind. The LM head, a GEMV over 500 CTAs, reached 80% of the GEMV
bandwidth where the MLP reached 64% (H100, sixth session). This form tests whether
more CTAs per SM close that gap. The cost: the partials of kernel 1 (S1 x 2F x 4 bytes,
64 KB at 1B) are written and then read back by every kernel-2 CTA for its F slice.
"""

from __future__ import annotations

from kernels import _gemv, unfinished


def rmsnorm_swiglu_2k(x_D, scale_D, w_gate_up_t_2FD, w_down_t_DF, *, eps: float, mode: str,
                      pdl=None, gate_up_block=None, down_block=None, finish: bool = True):
  """pdl applies to both kernels; gate_up_block / down_block: each GEMV's options
  (block_n, block_k, split_k, stages, prefetch_tiles). An Unfinished x_D is finished by
  the gate / up GEMV, whose n = 0 CTAs also store it: the residual of the result."""
  D = x_D.shape[0]
  store = isinstance(x_D, unfinished.Unfinished)
  part, ss, *x = _gemv.gemv_partials(x_D, w_gate_up_t_2FD, scale_K=scale_D, mode=mode,
                                     name="mlp_gate_up", pdl=pdl, store_x=store,
                                     **dict(gate_up_block or {}))
  down = _gemv.gemv_partials_swiglu(part, ss, w_down_t_DF, norm_size=D, eps=eps,
                                    dtype=w_down_t_DF.dtype, mode=mode, name="mlp_down",
                                    pdl=pdl, **dict(down_block or {}))
  out = unfinished.Unfinished(x[0] if store else x_D, (down,))
  return unfinished.finish(out) if finish else out
