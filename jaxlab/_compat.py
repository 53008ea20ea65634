"""Version-dependent imports, kept in one place (JAX 0.10.2 on CPU, 0.11.x on GPU)."""

import jax

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def auto_mesh(shape, names, devices=None):
  """A mesh whose axes are all AxisType.Auto (sharding by constraints, not types)."""
  axis_types = (jax.sharding.AxisType.Auto,) * len(names)
  if devices is None:
    return jax.make_mesh(tuple(shape), tuple(names), axis_types=axis_types)
  return jax.make_mesh(tuple(shape), tuple(names), axis_types=axis_types, devices=devices)


def mosaic_gpu_interpret_params():
  """InterpretGPUParams: public `plgpu` name on 0.11; on 0.10.2 it lives in
  `jax._src.pallas.mosaic_gpu.interpret.params` (not re-exported by the
  package __init__)."""
  try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
    cls = getattr(plgpu, "InterpretGPUParams", None)
    if cls is not None:
      return cls
  except ImportError:
    pass
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # type: ignore
    return InterpretGPUParams
  except ImportError:
    return None


def enable_x64(enabled: bool = True):
  """Context manager switching 64-bit JAX types on (restored on exit): `jax.enable_x64`
  where this JAX has it, else `jax.experimental.enable_x64`, else the config flag."""
  import contextlib
  fn = getattr(jax, "enable_x64", None)
  if callable(fn):
    return fn(enabled)
  try:
    from jax.experimental import enable_x64 as exp_enable_x64
    return exp_enable_x64(enabled)
  except ImportError:
    pass

  @contextlib.contextmanager
  def flag():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", enabled)
    try:
      yield
    finally:
      jax.config.update("jax_enable_x64", old)
  return flag()
