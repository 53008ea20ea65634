"""Memory-efficient optimizers: linear gradient transformations (GaLore and relatives).

`projected(inner, rank=...)` runs any gradient-only optax transformation on
low-rank projections of matrix gradients; `galore(lr, rank=...)` is the usual
GaLore-AdamW recipe. Their adapter duals live in `jaxlab.models.lowrank`.
"""

from jaxlab.optim.projected import (
    PROJECTORS,
    SIDES,
    Factors,
    ProjectedState,
    galore,
    is_matrix,
    leaf_key,
    leaf_name,
    project,
    project_back,
    projected,
    random_basis,
    random_factors,
    resolve_side,
    state_bytes,
    svd_factors,
)

__all__ = [
    "PROJECTORS", "SIDES", "Factors", "ProjectedState", "galore", "is_matrix", "leaf_key",
    "leaf_name", "project", "project_back", "projected", "random_basis", "random_factors",
    "resolve_side", "state_bytes", "svd_factors",
]
