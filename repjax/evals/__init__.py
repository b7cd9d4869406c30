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


def check(config) -> None:
    """Checks every `config.evals` entry before any work: a registered evaluator whose keyword arguments bind
    (`inspect.signature`), and any `source`/`split`/`calib_split` it names exists. Raises ValueError."""
    import inspect

    from repjax import data

    errors = []
    for name, spec in config.evals.items():
        spec = dict(spec)
        if "type" not in spec:
            errors.append(f"evals.{name}: no 'type' (the evaluator's name; known: {', '.join(EVALUATORS)})")
            continue
        try:
            fn = get(spec.pop("type"))
        except KeyError as e:
            errors.append(f"evals.{name}: {e.args[0]}")
            continue
        try:
            inspect.signature(fn).bind(None, None, config, None, **spec)
        except TypeError as e:
            errors.append(f"evals.{name}: evaluator {fn.__name__!r}: {e}")
            continue
        for key in ("split", "calib_split"):
            if spec.get(key) is not None or (key == "split" and spec.get("source") is not None):
                try:
                    data.from_config(config, spec.get(key) or config.data.eval_split, spec.get("source"))
                except (ValueError, KeyError, FileNotFoundError) as e:
                    errors.append(f"evals.{name}.{key}: {e}")
    if errors:
        raise ValueError("Invalid config.evals:\n  " + "\n  ".join(errors))
