"""Evaluators by name: `fn(model, variables, config, mesh) -> dict of metrics`.

Every evaluator runs on any registered model, so robustness, quantization and early-exit studies plug in
here and are listed in a config's `evals` block: `config.evals.<name> = dict(type=<evaluator>, ...)`.
"""

from __future__ import annotations

import importlib

from repjax.registry import Registry

EVALUATORS = Registry("evaluator")

_EVAL_MODULES = ("classification", "cost", "erf")


def get(name: str):
    from repjax import projects

    for module in _EVAL_MODULES:
        importlib.import_module(f"repjax.evals.{module}")
    projects.import_all()
    return EVALUATORS.get(name)
