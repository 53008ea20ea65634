import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jaxlab  # noqa: E402,F401  (its XLA:CPU workaround must precede the first computation)
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
