"""Reference: out_proj_residual, then rmsnorm_swiglu (the two ops' own references)."""

from __future__ import annotations

from kernels.out_proj_residual.reference import out_proj_residual
from kernels.rmsnorm_swiglu.reference import rmsnorm_swiglu


def out_proj_mlp(o_M, w_o_t_DM, resid_D, scale_D, w_gate_t_FD, w_up_t_FD, w_down_FD=None, *,
                 eps: float, w_down_t_DF=None, w_o_scale_D=None, w_gate_scale_F=None,
                 w_up_scale_F=None, w_down_scale_D=None):
  x = out_proj_residual(o_M, w_o_t_DM, resid_D, w_o_scale_D)
  return rmsnorm_swiglu(x, scale_D, w_gate_t_FD, w_up_t_FD, w_down_FD, eps=eps,
                        w_down_t_DF=w_down_t_DF,
                        w_gate_scale_F=w_gate_scale_F, w_up_scale_F=w_up_scale_F,
                        w_down_scale_D=w_down_scale_D)
