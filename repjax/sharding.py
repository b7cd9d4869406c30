"""Device mesh, regex -> PartitionSpec rules, and global batches from per-process data.

The mesh comes from config as `[(axis, size), ...]` with one size allowed to be -1 (all remaining
devices). The batch is split over every mesh axis (data parallelism on `data`, and FSDP's batch split
on `fsdp`); parameters and optimizer state are placed by `(regex, rule)` pairs, first match wins:

- `"replicate"`: a full copy on every device;
- `"fsdp"` (or `"fsdp:<axis>"`): the largest dimension divisible by the axis size is split over it
  (arrays with no such dimension stay replicated);
- a tuple such as `(None, "fsdp")`: an explicit PartitionSpec.

Regexes are searched in the leaf's path string (`params/stage1/conv/kernel`), so one rule covers a
parameter and its optimizer moments (`opt_state/.../mu/stage1/conv/kernel`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, Any]]


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a mesh from `[(name, size)]`; one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    names = tuple(name for name, _ in axes)
    sizes = [int(size) for _, size in axes]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may have size -1, got {list(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot fill mesh {list(axes)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        need = math.prod(sizes)
        raise ValueError(f"Mesh {dict(zip(names, sizes))} needs {need} devices, have {len(devices)}")
    # Auto axes: GSPMD propagates shardings through the step (jax.make_mesh defaults to Explicit).
    axis_types = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(tuple(sizes), names, axis_types=axis_types, devices=devices)


def batch_spec(mesh: Mesh) -> PartitionSpec:
    """The batch dimension is split over every mesh axis."""
    return PartitionSpec(tuple(mesh.axis_names))


def path_str(path: tuple) -> str:
    """`(DictKey('params'), DictKey('conv'), ...)` -> `'params/conv/...'` (the name that rules match)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _spec_for(rule: Any, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    if rule == "replicate" or not shape:
        return PartitionSpec()
    if isinstance(rule, str) and rule.startswith("fsdp"):
        axis = rule.partition(":")[2] or "fsdp"
        size = mesh.shape[axis]
        dims = sorted(range(len(shape)), key=lambda d: -shape[d])
        for d in dims:
            if shape[d] % size == 0 and shape[d] >= size:
                spec = [None] * len(shape)
                spec[d] = axis
                return PartitionSpec(*spec)
        return PartitionSpec()
    if isinstance(rule, list | tuple):
        if len(rule) > len(shape):
            raise ValueError(f"PartitionSpec {rule} has more entries than the array's shape {shape}")
        return PartitionSpec(*rule)
    raise ValueError(f"Unknown sharding rule {rule!r}: use 'replicate', 'fsdp[:axis]' or a tuple")


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules, prefix: str = "") -> Any:
    """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs) by the first matching rule."""
    compiled = [(re.compile(pattern), rule) for pattern, rule in rules]

    def one(path, leaf):
        name = prefix + path_str(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for pattern, rule in compiled:
            if pattern.search(name):
                return NamedSharding(mesh, _spec_for(rule, shape, mesh))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, tree)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into one global array sharded along the batch over the mesh."""
    sharding = NamedSharding(mesh, batch_spec(mesh))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
