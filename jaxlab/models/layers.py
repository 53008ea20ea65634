"""Basic layers: Linear, RMSNorm, Embed, SwiGLU MLP.

Every parameter carries `logical_axes` metadata; `jaxlab.sharding` maps those
names to mesh axes in one place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _dtype(name_or_dtype):
  return jnp.dtype(name_or_dtype)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel [in, out] (HF stores the transpose)."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
               axes: tuple[str | None, str | None] = (None, None), init_std: float = 0.02,
               param_dtype="float32", rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    w = init_std * jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32)
    self.kernel = nnx.Param(w.astype(_dtype(param_dtype)), logical_axes=axes)
    if use_bias:
      self.bias = nnx.Param(jnp.zeros((out_features,), _dtype(param_dtype)),
                            logical_axes=(axes[1],))
    else:
      self.bias = None

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    y = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


class RMSNorm(nnx.Module):
  """RMSNorm computed in fp32 and cast back (HF Llama convention)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str | None = "norm",
               param_dtype="float32"):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), _dtype(param_dtype)), logical_axes=(axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    return self.scale[...].astype(x.dtype) * y


def rms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Parameter-free RMSNorm in fp32."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class Embed(nnx.Module):
  """Token embedding table [vocab, d]; `attend` gives tied-output logits."""

  def __init__(self, vocab_size: int, dim: int, *, init_std: float = 0.02, param_dtype="float32",
               rngs: nnx.Rngs):
    e = init_std * jax.random.normal(rngs.params(), (vocab_size, dim), jnp.float32)
    self.embedding = nnx.Param(e.astype(_dtype(param_dtype)), logical_axes=("vocab", "embed"))

  def __call__(self, tokens_BT: jax.Array, dtype=None) -> jax.Array:
    table = self.embedding[...]
    if dtype is not None:
      table = table.astype(dtype)
    return jnp.take(table, tokens_BT, axis=0)

  def attend(self, x_BTD: jax.Array) -> jax.Array:
    return jnp.einsum("btd,vd->btv", x_BTD, self.embedding[...].astype(x_BTD.dtype))


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x))."""

  def __init__(self, d_model: int, hidden: int, *, use_bias: bool = False, init_std: float = 0.02,
               param_dtype="float32", rngs: nnx.Rngs):
    kw = dict(use_bias=use_bias, init_std=init_std, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Linear(d_model, hidden, axes=("embed", "mlp"), **kw)
    self.up_proj = Linear(d_model, hidden, axes=("embed", "mlp"), **kw)
    self.down_proj = Linear(hidden, d_model, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
