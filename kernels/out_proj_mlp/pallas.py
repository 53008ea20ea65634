"""Output projection + residual + RMSNorm + SwiGLU MLP + residual as two Mosaic-GPU
kernels with no XLA kernel between them: the O-projection GEMV (kernels/_gemv.py)
leaves its split-K partial rows [S, D] unfinished, and the MLP kernel finishes x =
resid + sum_s part[s] block by block as it streams x (kernels/rmsnorm_swiglu/pallas.py,
finish_x). Each MLP CTA reads the S partial rows (S * D * 4 bytes, 32 KB at
llama-1b-bench with S = 4) where it read x alone; the one XLA reduction after the MLP
(its partial rows) finishes x again, in the same order, for the residual.
"""

from __future__ import annotations

from kernels import _gemv
from kernels.rmsnorm_swiglu.pallas import rmsnorm_swiglu_from_parts


def out_proj_mlp(o_M, w_o_t_DM, resid_D, scale_D, w_gate_t_FD, w_up_t_FD, w_down,
                 w_o_scale_D=None, w_gate_scale_F=None, w_up_scale_F=None, w_down_scale_D=None,
                 *, eps: float, mode: str, o_block=None, pdl=None, **block):
  """pdl applies to both kernels."""
  part, _ = _gemv.gemv_partials(o_M, w_o_t_DM, mode=mode, name="out_proj_residual", pdl=pdl,
                                **dict(o_block or {}))
  return rmsnorm_swiglu_from_parts(resid_D, part, w_o_scale_D, scale_D, w_gate_t_FD, w_up_t_FD,
                                   w_down, w_gate_scale_F, w_up_scale_F, w_down_scale_D,
                                   eps=eps, mode=mode, pdl=pdl, **block)
