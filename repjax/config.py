"""The configuration schema: every key the trainer reads, with its default and type.

Config files (`configs/<name>.py`) start from `defaults()` and override fields; `validate` then rejects
unknown keys (with the closest known key) and wrong types before any work starts. Sub-dicts listed in
`FREE_FORM` (model constructor kwargs, evaluator settings, ...) are passed through unchecked.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import math
import pathlib
import re
import traceback
from typing import Any, NamedTuple

import ml_collections as mlc

# Paths (dotted) whose contents are free-form: checked by the component that consumes them.
FREE_FORM = ("model.kwargs", "optim.kwargs", "loss.kwargs", "evals", "init")


def defaults() -> mlc.ConfigDict:
    """The default experiment: a small CNN on sklearn's 8x8 digits (ships with scikit-learn)."""
    c = mlc.ConfigDict()
    c.seed = 0
    c.total_steps = 1500  # or 0 with `epochs` > 0: resolved from the training split's size at run time
    c.epochs = 0.0  # total_steps = floor(epochs * (len(train split) // batch_size)); set exactly one of the two
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
    c.data.cache_gb = 2.0  # folder/tfds splits smaller than this (decoded) are decoded once into memory
    c.data.skip_bad_files = False  # drop undecodable images (counted in the log) instead of stopping
    c.data.allow_missing_classes = False  # accept folder splits lacking some classes (labels: sorted union)

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
    c.optim.warmup_epochs = 0.0  # alternative to warmup_steps (at most one of the two)
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
    c.eval_every_epochs = 0.0  # alternative to eval_every_steps (at most one of the two)
    # Weight gradient of convolutions in batch chunks (repjax.nn.conv): "auto" (on the CPU backend only),
    # "on" or "off". The same sum in another order: speed only.
    c.conv_chunked_wgrad = "auto"

    c.evals = mlc.ConfigDict()  # name -> ConfigDict(type=<evaluator>, ...), run at the end
    c.init = mlc.ConfigDict()  # optional: init.path (imported weights), init.format, init.reinit (regexes),
    # init.reinit_mismatched_head (bool): see repjax.build.load_init
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


class Range(NamedTuple):
    """Allowed values of a numeric key: `lo <= v` (`lo < v` if `lo_open`), `v <= hi` (`v < hi` if `hi_open`)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        return (self.lo is None or v > self.lo or (v == self.lo and not self.lo_open)) and \
               (self.hi is None or v < self.hi or (v == self.hi and not self.hi_open))

    def __str__(self) -> str:
        lo = "(-inf" if self.lo is None else ("(" if self.lo_open else "[") + f"{self.lo:g}"
        hi = "inf)" if self.hi is None else f"{self.hi:g}" + (")" if self.hi_open else "]")
        return f"in {lo}, {hi}"


_ATLEAST0, _ATLEAST1, _UNIT, _UNIT_OPEN = Range(0), Range(1), Range(0, 1), Range(0, 1, hi_open=True)

# Every numeric key of the schema and its allowed values (tests check that none is missing). A new numeric key
# needs an entry here. Steps/epochs pairs where 0 means "not set" allow 0; `resolve_epochs` checks the pairs.
RANGES: dict[str, Range] = {
    "seed": _ATLEAST0,
    "total_steps": _ATLEAST0,
    "epochs": _ATLEAST0,
    "batch_size": _ATLEAST1,
    "eval_batch_size": _ATLEAST1,
    "data.mixup_alpha": _ATLEAST0,
    "data.cutmix_alpha": _ATLEAST0,
    "data.num_threads": _ATLEAST1,
    "data.cache_gb": _ATLEAST0,
    "loss.label_smoothing": _UNIT_OPEN,
    "optim.lr": _ATLEAST0,
    "optim.momentum": _UNIT_OPEN,
    "optim.b1": _UNIT_OPEN,
    "optim.b2": _UNIT_OPEN,
    "optim.eps": _ATLEAST0,
    "optim.weight_decay": _ATLEAST0,
    "optim.clip_norm": _ATLEAST0,
    "optim.warmup_steps": _ATLEAST0,
    "optim.warmup_epochs": _ATLEAST0,
    "optim.min_lr_ratio": _UNIT,
    "ema_decay": _UNIT_OPEN,
    "checkpoint_every_steps": _ATLEAST1,
    "keep_checkpoints": _ATLEAST1,
    "log_every_steps": _ATLEAST1,
    "eval_every_steps": _ATLEAST0,
    "eval_every_epochs": _ATLEAST0,
}

# String keys with a fixed set of values.
CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": ("float32", "bfloat16"),
    "conv_chunked_wgrad": ("auto", "on", "off"),
    "optim.schedule": ("cosine", "constant", "linear"),
}

# (steps key, epochs key): an epochs value > 0 is turned into steps by `resolve_epochs`.
EPOCH_KEYS = (("total_steps", "epochs"), ("optim.warmup_steps", "optim.warmup_epochs"),
              ("eval_every_steps", "eval_every_epochs"))


def get(config: Any, dotted: str) -> Any:
    node = config
    for key in dotted.split("."):
        node = node[key]
    return node


def set_value(config: Any, dotted: str, value: Any) -> None:
    """`config.<dotted> = value`."""
    *parents, leaf = dotted.split(".")
    (get(config, ".".join(parents)) if parents else config)[leaf] = value


def _range_errors(path: str, value: Any) -> list[str]:
    if path in RANGES and isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            return [f"{path!r} must be finite, got {value!r}"]
        if value not in RANGES[path]:
            return [f"{path!r} must be {RANGES[path]}, got {value!r}"]
    if path in CHOICES and isinstance(value, str) and value not in CHOICES[path]:
        return [f"{path!r} must be one of {', '.join(map(repr, CHOICES[path]))}, got {value!r}"]
    return []


def _mesh_errors(mesh: Any) -> list[str]:
    """`config.mesh` is a list of (axis name, size) with sizes >= 1 or one -1, names distinct."""
    if not isinstance(mesh, list | tuple):
        return []  # the type check reports it
    form = "a list of (axis name, size) pairs such as [('data', -1), ('fsdp', 1)]"
    if not mesh:
        return [f"'mesh' is empty: give {form}"]
    errors, names = [], []
    for i, axis in enumerate(mesh):
        ok = isinstance(axis, list | tuple) and len(axis) == 2 and isinstance(axis[0], str) and axis[0] \
            and isinstance(axis[1], int) and not isinstance(axis[1], bool) and (axis[1] >= 1 or axis[1] == -1)
        if not ok:
            errors.append(f"'mesh' entry {i} is {axis!r}: each entry is (name, size >= 1 or -1); {form}")
        else:
            names.append(axis[0])
    if [n for n in names if names.count(n) > 1]:
        errors.append(f"'mesh' axis names must be distinct, got {names}")
    if sum(1 for a in mesh if isinstance(a, list | tuple) and len(a) == 2 and a[1] == -1) > 1:
        errors.append(f"'mesh' may have at most one axis of size -1, got {list(mesh)}")
    return errors


def _sharding_errors(rules: Any, axes: list[str]) -> list[str]:
    """`config.sharding_rules` is a list of (regex, 'replicate' | 'fsdp[:axis]' | PartitionSpec-like tuple)."""
    if not isinstance(rules, list | tuple):
        return []
    errors = []
    for i, rule in enumerate(rules):
        where = f"'sharding_rules' entry {i} ({rule!r})"
        if not (isinstance(rule, list | tuple) and len(rule) == 2 and isinstance(rule[0], str)):
            errors.append(f"{where}: each entry is (regex, 'replicate' | 'fsdp[:axis]' | (axis or None, ...))")
            continue
        pattern, spec = rule
        try:
            re.compile(pattern)
        except re.error as e:
            errors.append(f"{where}: bad regex: {e}")
        if isinstance(spec, str):
            axis = spec.partition(":")[2] or "fsdp"
            if spec != "replicate" and not spec.startswith("fsdp"):
                errors.append(f"{where}: unknown rule {spec!r}; use 'replicate', 'fsdp[:axis]' or a tuple")
            elif spec.startswith("fsdp") and axes and axis not in axes:
                errors.append(f"{where}: mesh has no axis {axis!r} (axes: {axes})")
        elif isinstance(spec, list | tuple):
            for entry in spec:
                names = entry if isinstance(entry, list | tuple) else [entry]
                bad = [n for n in names if n is not None and (not isinstance(n, str) or (axes and n not in axes))]
                if bad:
                    errors.append(f"{where}: {bad[0]!r} is not a mesh axis (axes: {axes}) or None")
                    break
        else:
            errors.append(f"{where}: rule must be 'replicate', 'fsdp[:axis]' or a tuple, got {spec!r}")
    return errors


def validate(config: mlc.ConfigDict) -> None:
    """Raises ValueError on unknown keys, wrong types, out-of-range numbers and malformed mesh/sharding."""
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
            continue
        errors += _range_errors(path, value)
    mesh = config.get("mesh")
    errors += _mesh_errors(mesh)
    axes = [a[0] for a in mesh if isinstance(a, list | tuple) and a and isinstance(a[0], str)] \
        if isinstance(mesh, list | tuple) else []
    errors += _sharding_errors(config.get("sharding_rules"), axes)
    if errors:
        raise ValueError("Invalid config:\n  " + "\n  ".join(errors))


def resolve_epochs(config: mlc.ConfigDict, num_examples: int) -> mlc.ConfigDict:
    """A copy of `config` with every `*epochs` key > 0 turned into its steps key (`EPOCH_KEYS`).

    An epoch is `num_examples // batch_size` full batches (`num_examples`: the training split's length), and
    steps = floor(epochs * that) (fractional epochs allowed). A config
    already resolved (steps equal to the derived value) resolves to itself. Raises ValueError when both keys of
    a pair are set inconsistently, or when no total length results.
    """
    out = copy.deepcopy(config)
    for steps_key, epochs_key in EPOCH_KEYS:
        steps, epochs = get(out, steps_key), get(out, epochs_key)
        if epochs > 0:
            derived = int(epochs * (num_examples // out.batch_size))
            if steps not in (0, derived):
                raise ValueError(f"Set one of {steps_key!r} and {epochs_key!r}, not both: {steps_key}={steps}, "
                                 f"{epochs_key}={epochs:g} (= {derived} steps of {num_examples} examples "
                                 f"at batch {out.batch_size})")
            set_value(out, steps_key, derived)
    if out.total_steps < 1:
        how = (f"epochs={out.epochs:g} of {num_examples} examples at batch {out.batch_size} is 0 steps"
               if out.epochs > 0 else "set total_steps >= 1 or epochs > 0")
        raise ValueError(f"Nothing to train: {how}")
    return out


class ConfigFileError(ValueError):
    """A config file could not be loaded: the message names the file, line and argument."""


def _where(error: BaseException, file: pathlib.Path) -> str:
    """`file:line` of the innermost frame of `error` inside `file` (or just the file)."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f"{file}:{error.lineno}"
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
             if pathlib.Path(f.filename).resolve() == file.resolve()]
    return f"{file}:{lines[-1]}" if lines else str(file)


def load(path: str) -> mlc.ConfigDict:
    """Loads `configs/x.py[:arg]` (calls its `get_config(arg)`) and validates it.

    Errors in the file or in `get_config(arg)` are one-line `ConfigFileError`s naming the file and line.
    """
    file, _, arg = path.partition(":")
    file_path = pathlib.Path(file)
    if not file_path.is_file():
        raise FileNotFoundError(f"Config file not found: {file}")
    spec = importlib.util.spec_from_file_location(file_path.stem, file_path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigFileError(f"{_where(e, file_path)}: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigFileError(f"{file} defines no get_config(arg) function")
    try:
        config = module.get_config(arg or None)
    except ConfigArgumentError as e:
        raise ConfigArgumentError(f"{file}: {e}") from None
    except Exception as e:
        raise ConfigFileError(f"{_where(e, file_path)}: get_config({arg or None!r}) failed: "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(config, mlc.ConfigDict):
        raise ConfigFileError(f"{file}: get_config must return an ml_collections.ConfigDict, "
                              f"got {type(config).__name__}")
    validate(config)
    return config


class ConfigArgumentError(ValueError):
    """A `get_config` argument (`file.py:k=v,...`) is unknown or has the wrong type."""


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_arg(arg: str | None, **spec: Any) -> mlc.ConfigDict:
    """Parses a config-file argument `"k1=v1,k2=v2"` against typed defaults `spec`.

    `parse_arg("depth=56", depth=20, epochs=182)` -> ConfigDict(depth=56, epochs=182); a bare word `x`
    sets a boolean `x=True`. Unknown keys and values of the wrong type fail naming the argument.
    """
    out = mlc.ConfigDict(spec)
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        if key not in spec:
            raise ConfigArgumentError(f"Unknown config argument {key!r}; known: {sorted(spec)}")
        default = spec[key]
        if not eq:
            if not isinstance(default, bool):
                raise ConfigArgumentError(f"Config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in _TRUE + _FALSE:
                raise ConfigArgumentError(f"Config argument {key!r} must be true or false, got {value!r}")
            out[key] = value.lower() in _TRUE
        elif default is None or isinstance(default, str):
            out[key] = value
        else:
            try:
                out[key] = type(default)(value)
            except (TypeError, ValueError):
                raise ConfigArgumentError(f"Config argument {key!r} must be {type(default).__name__}, "
                                          f"got {value!r}") from None
    return out
