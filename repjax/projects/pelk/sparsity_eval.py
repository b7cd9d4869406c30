"""`sparsity`: realised weight sparsity of a (dynamically sparse) model, counted from its non-zero weights.

Reports `params` (dense count), `nonzero_params` (SLaK's accounting: only non-zero weights count), `density`
over the leaves with `ndim >= min_ndim` (convs and linears), and with `layers=True` one `density/<path>` each.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from jax.sharding import Mesh

from repjax.evals import EVALUATORS
from repjax.projects.pelk.sparsity import density_report


@EVALUATORS.register("sparsity")
def sparsity(model: nn.Module, variables: dict[str, Any], config, mesh: Mesh, *, min_ndim: int = 2,
             layers: bool = False) -> dict[str, float]:
    report = density_report(variables["params"], min_ndim)
    out = {k: report[k] for k in ("params", "nonzero_params", "density")}
    if layers:
        out.update({f"density/{k}": v for k, v in report["layers"].items()})
    return out
