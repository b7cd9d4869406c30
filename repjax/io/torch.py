"""PyTorch state_dict <-> Flax variables, driven by explicit per-key rules (pure numpy).

A `Rule` maps one PyTorch key to one Flax leaf path, whose first element is the collection
(`('params', 'stem', 'conv', 'kernel')`, `('batch_stats', 'stem', 'bn', 'mean')`), with a converter each way.
`conv`, `bn` and `linear` build the rules of a whole layer. `from_torch_state_dict` is strict: every PyTorch key
is used or explicitly ignored, every Flax leaf of the target is filled, and shapes must equal the target's
(`jax.eval_shape(model.init, ...)`); all problems are reported together in one `WeightImportError`.

Layouts: conv OIHW -> HWIO. Grouped and depthwise convs need no regrouping: PyTorch stores (O, I/g, H, W) and
Flax (H, W, I/g, O), so the same transpose applies. Linear (out, in) -> (in, out).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import pickle
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from flax import traverse_util

Converter = Callable[[np.ndarray], np.ndarray]
Path = tuple[str, ...]

# PyTorch-only bookkeeping that has no Flax counterpart.
DEFAULT_IGNORE = ("num_batches_tracked", "*.num_batches_tracked")


class WeightImportError(ValueError):
    """A state_dict does not match the rules or the target variables."""


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight OIHW (O, I/groups, H, W) -> Flax HWIO (H, W, I/groups, O)."""
    if w.ndim != 4:
        raise ValueError(f"conv weight must be 4-D OIHW, got shape {w.shape}")
    return np.transpose(w, (2, 3, 1, 0))


def conv_kernel_to_torch(k: np.ndarray) -> np.ndarray:
    """Flax HWIO -> PyTorch OIHW (inverse of `conv_kernel`)."""
    if k.ndim != 4:
        raise ValueError(f"conv kernel must be 4-D HWIO, got shape {k.shape}")
    return np.transpose(k, (3, 2, 0, 1))


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch linear weight (out, in) -> Flax Dense kernel (in, out); also its own inverse."""
    if w.ndim != 2:
        raise ValueError(f"linear weight must be 2-D, got shape {w.shape}")
    return w.T


@dataclasses.dataclass(frozen=True)
class Rule:
    """One PyTorch key <-> one Flax leaf (path starts with the collection name)."""

    torch_key: str
    flax_path: Path
    to_flax: Converter = _identity
    to_torch: Converter = _identity


def conv(prefix: str, path: Path, bias: bool = False) -> list[Rule]:
    """Rules for `nn.Conv2d` at `prefix` -> Flax `nn.Conv` at params/`path`."""
    weight = Rule(f"{prefix}.weight", ("params", *path, "kernel"), conv_kernel, conv_kernel_to_torch)
    return [weight, Rule(f"{prefix}.bias", ("params", *path, "bias"))] if bias else [weight]


def linear(prefix: str, path: Path, bias: bool = True) -> list[Rule]:
    """Rules for `nn.Linear` at `prefix` -> Flax `nn.Dense` at params/`path`."""
    weight = Rule(f"{prefix}.weight", ("params", *path, "kernel"), linear_kernel, linear_kernel)
    return [weight, Rule(f"{prefix}.bias", ("params", *path, "bias"))] if bias else [weight]


def bn(prefix: str, path: Path) -> list[Rule]:
    """Rules for `nn.BatchNorm2d` at `prefix` -> Flax `nn.BatchNorm` at `path` (num_batches_tracked ignored)."""
    return [
        Rule(f"{prefix}.weight", ("params", *path, "scale")),
        Rule(f"{prefix}.bias", ("params", *path, "bias")),
        Rule(f"{prefix}.running_mean", ("batch_stats", *path, "mean")),
        Rule(f"{prefix}.running_var", ("batch_stats", *path, "var")),
    ]


def listing(title: str, items: Sequence[str], limit: int = 25) -> str:
    """`  title (n):` and one indented line per item (the first `limit`): the project's error listing."""
    shown = "\n".join(f"    {s}" for s in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def problems_message(what: str, problems: Sequence[tuple[str, Sequence[str]]]) -> str | None:
    """`what:` and one `listing` per non-empty problem list; None when there is nothing to report."""
    problems = [(t, items) for t, items in problems if items]
    return f"{what}:\n" + "\n".join(listing(t, list(items)) for t, items in problems) if problems else None


def raise_weight_problems(problems: list[tuple[str, list[str]]], what: str) -> None:
    """`WeightImportError` listing every non-empty `(title, items)` problem of `what`; nothing when all are empty."""
    message = problems_message(f"{what} failed", problems)
    if message:
        raise WeightImportError(message)


def strip_module_prefix(state_dict: Mapping[str, Any], source: str = "state_dict") -> dict[str, Any]:
    """Drops the `module.` prefix that `DataParallel` puts on every key; keys prefixed only in part raise."""
    prefixed = [k for k in state_dict if k.startswith("module.")]
    if prefixed and len(prefixed) < len(state_dict):
        raise WeightImportError(f"{source}: {len(prefixed)} of {len(state_dict)} keys carry a 'module.' prefix "
                                f"(e.g. {prefixed[0]!r}); expected all or none")
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def to_numpy(value: Any) -> np.ndarray:
    """A numpy array from a numpy/JAX array or a torch tensor (bfloat16 tensors are upcast to float32)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def numpy_state_dict(state_dict: Mapping[str, Any], source: str = "state_dict") -> dict[str, np.ndarray]:
    """The flat `{key: numpy array}` every importer takes: values as numpy, `module.` prefixes dropped."""
    return {k: to_numpy(v) for k, v in strip_module_prefix(state_dict, source).items()}


def bn_counters(rules: Sequence[Rule]) -> dict[str, np.ndarray]:
    """`<bn>.num_batches_tracked = 0` (int64) for every BatchNorm among `rules`: what PyTorch's strict
    `load_state_dict` expects beside the running statistics."""
    return {r.torch_key.removesuffix("running_mean") + "num_batches_tracked": np.array(0, np.int64)
            for r in rules if r.torch_key.endswith(".running_mean")}


def _check_rules(rules: Sequence[Rule]) -> None:
    def dupes(xs: Iterable[Any]) -> list[str]:
        seen: set = set()
        return sorted({str(x) for x in xs if x in seen or seen.add(x)})

    raise_weight_problems([("duplicate torch keys in rules", dupes(r.torch_key for r in rules)),
                           ("duplicate flax paths in rules", dupes(r.flax_path for r in rules))], "rule check")


def _name(path: Path) -> str:
    return "/".join(path)


def from_torch_state_dict(state_dict: Mapping[str, Any], rules: Sequence[Rule], target: Mapping,
                          ignore: Sequence[str] = DEFAULT_IGNORE) -> dict:
    """Builds nested Flax variables from `state_dict` following `rules`, strictly checked against `target`.

    Args:
      state_dict: PyTorch key -> array (numpy, or anything `np.asarray` accepts).
      rules: one `Rule` per Flax leaf.
      target: the variables the result must match (leaves with .shape/.dtype, e.g. from `jax.eval_shape`).
      ignore: fnmatch patterns of PyTorch keys that are deliberately dropped.
    Returns:
      Nested dict {collection: {...}} of numpy arrays with the target's shapes and dtypes.
    """
    _check_rules(rules)
    state_dict = strip_module_prefix(state_dict)
    leaves = traverse_util.flatten_dict(dict(target))
    by_key = {r.torch_key: r for r in rules}
    missing = [r.torch_key for r in rules if r.torch_key not in state_dict]
    unexpected = [k for k in state_dict if k not in by_key and not any(fnmatch.fnmatchcase(k, p) for p in ignore)]
    unknown = [f"{r.torch_key} -> {_name(r.flax_path)}" for r in rules if r.flax_path not in leaves]
    covered = {r.flax_path for r in rules}
    unfilled = [_name(p) for p in leaves if p not in covered]
    flat, mismatched = {}, []
    for r in rules:
        if r.torch_key not in state_dict or r.flax_path not in leaves:
            continue
        want = leaves[r.flax_path]
        source = to_numpy(state_dict[r.torch_key])
        try:
            value = np.asarray(r.to_flax(source))
        except ValueError as e:
            value, err = None, str(e)
        if value is None or value.shape != tuple(want.shape):
            got = f"converted {value.shape}" if value is not None else err
            mismatched.append(f"{r.torch_key} {source.shape} -> {_name(r.flax_path)}: {got}, expected {want.shape}")
            continue
        flat[r.flax_path] = value.astype(want.dtype)
    raise_weight_problems([("missing torch keys", missing), ("unexpected torch keys", unexpected),
                           ("rules pointing to no flax leaf", unknown), ("flax leaves not filled", unfilled),
                           ("shape mismatches", mismatched)], "PyTorch -> Flax import")
    return traverse_util.unflatten_dict(flat)


def to_torch_state_dict(variables: Mapping, rules: Sequence[Rule], counters: bool = True) -> dict[str, np.ndarray]:
    """Inverse of `from_torch_state_dict`: Flax variables -> PyTorch key -> numpy array (strict, writable copies).

    `counters` adds `num_batches_tracked` per BatchNorm (`bn_counters`), so that PyTorch loads it strictly."""
    _check_rules(rules)
    leaves = traverse_util.flatten_dict(dict(variables))
    covered = {r.flax_path for r in rules}
    dangling = [_name(r.flax_path) for r in rules if r.flax_path not in leaves]
    raise_weight_problems([("rules pointing to no flax leaf", dangling),
                           ("flax leaves without a rule", [_name(p) for p in leaves if p not in covered])],
                          "Flax -> PyTorch export")
    sd = {r.torch_key: np.array(r.to_torch(np.asarray(leaves[r.flax_path])), order="C") for r in rules}
    return sd | bn_counters(rules) if counters else sd


def _unwrap(obj: Any) -> Mapping[str, Any]:
    """Finds the state_dict in a checkpoint ({'state_dict': ...} / {'model': ...}) and drops 'module.'."""
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    return strip_module_prefix(obj) if obj else obj


def load_state_dict(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> dict[str, np.ndarray]:
    """Loads a state_dict as numpy arrays from `.npz` or `.pth`/`.pt`/`.th`.

    Zip-format PyTorch files (torch >= 1.6) are read by the torch-free `repjax.io.torch_zip` reader whether or not
    torch is installed: it never runs pickled code, bounds memory, and skips objects pickled beside the tensors
    (a training config). Legacy pre-1.6 files need torch (`torch.load(weights_only=True)`). Floating-point
    tensors holding NaN or inf are refused, naming the keys, unless `allow_nonfinite`.
    """
    path = os.fspath(path)
    if path.endswith(".npz"):
        try:
            with np.load(path) as f:
                sd = {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # truncated, damaged
            raise WeightImportError(f"cannot read {path!r} as .npz: {type(e).__name__}: {e}") from None
    elif not path.endswith((".pth", ".pt", ".th")):
        raise ValueError(f"unknown state_dict format {path!r}: expected .npz, .pth, .pt or .th")
    elif zipfile.is_zipfile(path) or _starts_with(path, b"PK"):
        from repjax.io import torch_zip

        sd = torch_zip.load_state_dict(path, upcast_bfloat16=True)
    else:
        sd = _load_legacy(path)
    sd = strip_module_prefix(sd, path)
    if not allow_nonfinite:
        check_finite(sd, path)
    return sd


def _starts_with(path: str, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _load_legacy(path: str) -> dict[str, np.ndarray]:
    """A pre-1.6 (non-zip) PyTorch file, through `torch.load(weights_only=True)`."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading the legacy-format {path!r} needs PyTorch (pip install 'repjax[torch]'), "
                          "or convert it to .npz with numpy first") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message suggests weights_only=False, which runs the file's code
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise WeightImportError(
            f"refusing {path!r}: it pickles objects other than tensors, and repjax never runs code from a weight "
            f"file ({first[:200]}); re-save it with a current torch.save(model.state_dict(), ...)") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightImportError(f"cannot read {path!r} as a PyTorch checkpoint: {str(e)[:300]}") from None
    sd = _unwrap(obj)
    if not isinstance(sd, Mapping):
        raise WeightImportError(f"{path!r} holds a {type(sd).__name__}, not a state_dict")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise WeightImportError(f"{path!r}: entry {k!r} is a {type(v).__name__}, not a tensor")
        v = v.detach()
        out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    return out


def check_finite(state_dict: Mapping[str, np.ndarray], path: str = "state_dict") -> None:
    """Raises `WeightImportError` naming every floating-point entry that holds NaN or inf."""
    bad = []
    for k, v in state_dict.items():
        v = np.asarray(v)
        if v.dtype.kind in "fc" or v.dtype == ml_dtypes.bfloat16:
            finite = np.isfinite(v)
            if not finite.all():
                nan = int(np.isnan(v).sum())
                bad.append(f"{k} {v.shape}: {nan} NaN, {int(finite.size - finite.sum()) - nan} inf")
    raise_weight_problems([("entries holding NaN or inf", bad)], f"reading {path!r}")


def save_state_dict(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
    """Writes a numpy state_dict to `.npz` (the format `load_state_dict` reads without torch)."""
    np.savez(path, **{k: np.asarray(v) for k, v in state_dict.items()})
