"""The configuration schema: every key the trainer reads, with its default and type.

Config files (`configs/<name>.py`) start from `defaults()` and override fields; `validate` then rejects
unknown keys (with the closest known key) and wrong types before any work starts. Sub-dicts listed in
`FREE_FORM` (model constructor kwargs, evaluator settings, ...) are passed through unchecked.
"""

from __future__ import annotations

import difflib
import importlib.util
import pathlib
from typing import Any

import ml_collections as mlc

# Paths (dotted) whose contents are free-form: checked by the component that consumes them.
FREE_FORM = ("model.kwargs", "optim.kwargs", "loss.kwargs", "evals", "init")


def defaults() -> mlc.ConfigDict:
    """The default experiment: a small CNN on sklearn's 8x8 digits (ships with scikit-learn)."""
    c = mlc.ConfigDict()
    c.seed = 0
    c.total_steps = 1500
    c.batch_size = 128  # global batch, split over processes and devices
    c.eval_batch_size = 512
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)

    c.model = mlc.ConfigDict(dict(name="small_cnn", kwargs=mlc.ConfigDict()))

    c.data = mlc.ConfigDict()
    c.data.source = "digits"  # digits | folder:<path> | cifar10:<path> | tfds:<name>[@dir] | synthetic[:...]
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.train_pp = "pad_crop(1)|normalize(digits)"
    c.data.eval_pp = "normalize(digits)"
    c.data.mixup_alpha = 0.0
    c.data.cutmix_alpha = 0.0
    c.data.num_threads = 2

    # repjax.losses: a registered loss by name, its free-form settings, label smoothing (training only).
    c.loss = mlc.ConfigDict(dict(name="softmax_xent", kwargs=mlc.ConfigDict(), label_smoothing=0.0))

    c.optim = mlc.ConfigDict()
    c.optim.name = "sgd"  # see repjax.optim.OPTIMIZERS
    c.optim.lr = 0.1
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 5e-4
    c.optim.clip_norm = 0.0  # 0 disables global-norm clipping
    c.optim.warmup_steps = 0
    c.optim.schedule = "cosine"  # cosine | constant | linear
    c.optim.min_lr_ratio = 0.0
    # Per-parameter rules, first match wins: list of (regex on "params/a/b/kernel", dict) with keys
    # frozen (bool), lr_mult (float), weight_decay (float, absolute), transforms (list of (name, kwargs)).
    c.optim.rules = []
    c.optim.kwargs = mlc.ConfigDict()
    c.ema_decay = 0.0  # 0 disables the parameter EMA

    # Mesh axes and sizes (-1: all remaining devices). The batch is split over every axis; parameters are
    # placed by `sharding_rules`: (regex, "replicate" | "fsdp" | PartitionSpec-like tuple), first match wins.
    c.mesh = [("data", -1), ("fsdp", 1)]
    c.sharding_rules = [(".*", "replicate")]

    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 3
    c.log_every_steps = 20
    c.eval_every_steps = 0  # 0: evaluate only at the end
    c.stop_on_nan = True

    c.evals = mlc.ConfigDict()  # name -> ConfigDict(type=<evaluator>, ...), run at the end
    c.init = mlc.ConfigDict()  # optional: init.path (imported weights) and init.format
    return c


# Common names from other codebases -> ours, for "did you mean" hints.
ALIASES = {"learning_rate": "lr", "wd": "weight_decay", "steps": "total_steps", "num_steps": "total_steps",
           "bs": "batch_size", "global_batch_size": "batch_size", "model_name": "name"}


def suggest(path: str, known: list[str]) -> str:
    """` (did you mean 'x'?)` for an unknown dotted key, or an empty string."""
    parent, _, leaf = path.rpartition(".")
    alias = ".".join(filter(None, (parent, ALIASES.get(leaf, ""))))
    close = [alias] if alias in known else difflib.get_close_matches(path, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, mlc.ConfigDict | dict) and path not in FREE_FORM:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def validate(config: mlc.ConfigDict) -> None:
    """Raises ValueError on keys the schema does not know and on wrongly typed values."""
    known = flatten(defaults())
    errors = []
    for path, value in flatten(config).items():
        if path not in known:
            if any(path.startswith(f + ".") for f in FREE_FORM):
                continue
            errors.append(f"unknown key {path!r}" + suggest(path, list(known)))
            continue
        default = known[path]
        if default is None or value is None:
            continue
        ok_types = (int, float) if isinstance(default, float) else (type(default),)
        if isinstance(default, list | tuple):
            ok_types = (list, tuple)
        if not isinstance(value, ok_types) or (isinstance(value, bool) and not isinstance(default, bool)):
            errors.append(f"{path!r} must be {type(default).__name__}, got {type(value).__name__} {value!r}")
    if config.dtype not in ("float32", "bfloat16"):
        errors.append(f"'dtype' must be 'float32' or 'bfloat16', got {config.dtype!r}")
    if errors:
        raise ValueError("Invalid config:\n  " + "\n  ".join(errors))


def load(path: str) -> mlc.ConfigDict:
    """Loads `configs/x.py[:arg]` (calls its `get_config(arg)`) and validates it."""
    file, _, arg = path.partition(":")
    file_path = pathlib.Path(file)
    if not file_path.is_file():
        raise FileNotFoundError(f"Config file not found: {file}")
    spec = importlib.util.spec_from_file_location(file_path.stem, file_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    validate(config)
    return config


def parse_arg(arg: str | None, **spec: Any) -> mlc.ConfigDict:
    """Parses a config-file argument `"k1=v1,k2=v2"` against typed defaults `spec`.

    `parse_arg("depth=56", depth=20, epochs=182)` -> ConfigDict(depth=56, epochs=182); a bare word `x`
    sets a boolean `x=True`. Unknown keys fail with the known ones listed.
    """
    out = mlc.ConfigDict(spec)
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        if key not in spec:
            raise ValueError(f"Unknown config argument {key!r}; known: {sorted(spec)}")
        default = spec[key]
        if not eq:
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(value) if default is not None else value
    return out
