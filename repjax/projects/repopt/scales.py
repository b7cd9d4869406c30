"""RepOpt-VGG Hyper-Search scales: the one reader and the one writer of scale files, and the scales' sources.

Scales are a plain dict `{block: {'s': (C,), 't': (C,), 'd': (C,) (identity blocks only)}}` of float32 vectors,
keyed by the Flax block name (`stage0`, `stage1_0`, ...), in network order: s scales the 3x3 branch, t the 1x1
branch, d the identity branch (paper §1.2).

One file layout, the official one: per block `<prefix>.scale_conv.weight` (s), `<prefix>.scale_1x1.weight` (t)
and, for blocks with an identity branch, `<prefix>.scale_identity.weight` (d), where prefix is `stage0` or
`stage{s}.{i}` as in the official code. `load_scales` reads it from the released `RepOpt-VGG-*-scales.pth`
(without torch and without executing pickle code) or from an `.npz`; `save_scales` writes that `.npz`.
Unlike the official read-out (which loads with `strict=False`), every key must be accounted for: problems are
reported together in `ScaleFileError`.

Sources of scales: a file (`load_scales`), a state_dict in memory (`from_state_dict`), the params of a
Hyper-Search / CSLA model (`from_params`) or the latest checkpoint of a Hyper-Search run (`from_checkpoint`).
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from repjax.io import torch as tio, torch_zip

Scales = dict[str, dict[str, np.ndarray]]
ScalesLike = Scales | Mapping[str, Mapping[str, Any]] | str | os.PathLike
Blocks = Mapping[str, bool] | Iterable[str] | None  # expected block names (-> whether it has an identity branch)

_KEY = re.compile(r"^(stage\d+)(?:\.(\d+))?\.scale_(conv|1x1|identity)\.weight$")
_BLOCK = re.compile(r"^stage(\d+)(?:_(\d+))?$")
_LETTER = {"conv": "s", "1x1": "t", "identity": "d"}
_SUFFIX = {v: k for k, v in _LETTER.items()}
_PARAM = {"s": "scale_conv", "t": "scale_1x1", "d": "scale_identity"}


class ScaleFileError(ValueError):
    """The scale file does not hold exactly the expected scale tensors."""


def block_name(prefix: str) -> str:
    """Official prefix (`stage1.0`) -> Flax block name (`stage1_0`); Flax names pass through."""
    return prefix.replace(".", "_")


def torch_prefix(name: str) -> str:
    """Flax block name (`stage1_0`) -> official prefix (`stage1.0`)."""
    return name.replace("_", ".")


def block_order(name: str) -> tuple[int, int]:
    """Sort key of a block name: `stage0` first, then `stage{s}_{i}` by stage and index."""
    m = _BLOCK.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a block name (stage0, stage1_0, ...)")
    return int(m[1]), int(m[2]) if m[2] is not None else -1


def block_names(params: Mapping[str, Any]) -> list[str]:
    """The `stage*` blocks of a parameter dict, in network order; raises if any block is missing in between."""
    names = sorted((k for k in params if _BLOCK.match(k)), key=block_order)
    if not names or names[0] != "stage0":
        raise ValueError(f"no 'stage0' block among {sorted(params)}")
    stages: dict[int, list[int]] = {}
    for n in names[1:]:
        s, i = block_order(n)
        stages.setdefault(s, []).append(i)
    if sorted(stages) != list(range(1, len(stages) + 1)):
        raise ValueError(f"stages {sorted(stages)} are not consecutive from 1: a block is missing")
    for s, idx in stages.items():
        if idx != list(range(len(idx))):
            raise ValueError(f"stage{s} has blocks {idx}: a block is missing")
    return names


def _read(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".npz"):
        with np.load(path) as f:
            raw = {k: f[k] for k in f.files}
        old = [k for k in raw if re.fullmatch(r"stage\d+(_\d+)?/[std]", k)]
        if old:
            raise ScaleFileError(f"{path!r} holds the retired `<block>/<s|t|d>` layout (e.g. {old[0]!r}); read it "
                                 "with numpy and write it again with `repjax.projects.repopt.scales.save_scales`")
        return raw
    if path.endswith((".pth", ".pt")):
        return torch_zip.load_state_dict(path, upcast_bfloat16=True)
    raise ScaleFileError(f"unknown scale file format {path!r}: expected .pth/.pt or .npz")


def from_state_dict(state_dict: Mapping[str, Any], blocks: Blocks = None, *, ignore_other_keys: bool = False,
                    source: str = "state_dict") -> Scales:
    """Scales from official keys (numpy or torch values; a `module.` prefix on every key is dropped).

    Args:
      blocks: the expected blocks (Flax names or official prefixes); a mapping name -> has_identity also checks
        where `d` must appear. Without it, every block found must have s and t.
      ignore_other_keys: skip keys that are not scales (a whole Hyper-Search checkpoint) instead of reporting
        them as unexpected.
    """
    try:
        raw = tio.numpy_state_dict(state_dict, source)
    except ValueError as e:
        raise ScaleFileError(str(e)) from None
    found: Scales = {}
    other, bad_shape = [], []
    for key, value in raw.items():
        m = _KEY.match(key)
        if m is None:
            other.append(key)
            continue
        if sum(n > 1 for n in value.shape) > 1:
            bad_shape.append(f"{key} {value.shape}")
            continue
        name = m.group(1) + (f"_{m.group(2)}" if m.group(2) is not None else "")
        found.setdefault(name, {})[_LETTER[m.group(3)]] = np.asarray(value, np.float32).reshape(-1)

    missing: list[str] = []
    unexpected = [] if ignore_other_keys else [f"{k} (not a scale)" for k in other]
    if blocks is not None:
        expected = dict(blocks) if isinstance(blocks, Mapping) else dict.fromkeys(blocks)
        expected = {block_name(k): v for k, v in expected.items()}
        unexpected += [f"{torch_prefix(b)}.* (block not expected)" for b in found if b not in expected]
        for b, identity in expected.items():
            have = found.get(b, {})
            need = ["s", "t"] + (["d"] if identity else [])
            missing += [f"{torch_prefix(b)}.scale_{_SUFFIX[x]}.weight" for x in need if x not in have]
            if identity is False and "d" in have:
                unexpected.append(f"{torch_prefix(b)}.scale_identity.weight (block has no identity)")
    else:
        missing = [f"{torch_prefix(b)}.scale_{_SUFFIX[x]}.weight" for b, have in found.items()
                   for x in ("s", "t") if x not in have]
    sizes = [f"{torch_prefix(b)}: {{{', '.join(f'{x}: {v.size}' for x, v in have.items())}}}"
             for b, have in found.items() if len({v.size for v in have.values()}) > 1]
    message = tio.problems_message(f"RepOpt scales {source!r}", [
        ("missing keys", missing), ("unexpected keys", unexpected), ("not 1-D per-channel tensors", bad_shape),
        ("blocks whose s/t/d lengths differ", sizes)])
    if message:
        raise ScaleFileError(message)
    return {b: found[b] for b in sorted(found, key=block_order)}


def load_scales(path: str | os.PathLike, blocks: Blocks = None, *, ignore_other_keys: bool = False) -> Scales:
    """Reads a scale file: a released `.pth`, or an `.npz` written by `save_scales` (see `from_state_dict`)."""
    path = os.fspath(path)
    return from_state_dict(_read(path), blocks, ignore_other_keys=ignore_other_keys, source=path)


def to_state_dict(scales: ScalesLike) -> dict[str, np.ndarray]:
    """Scales -> the official keys (float32 vectors)."""
    return {f"{torch_prefix(name)}.scale_{_SUFFIX[letter]}.weight": value
            for name, group in as_scales(scales).items() for letter, value in group.items()}


def save_scales(path: str | os.PathLike, scales: ScalesLike) -> None:
    """Writes scales to `.npz` under the official key names (what `load_scales` reads)."""
    np.savez(path, **to_state_dict(scales))


def as_scales(scales: ScalesLike) -> Scales:
    """Scales from a dict or a file path, as float32 vectors in block order; each block needs s and t."""
    if isinstance(scales, str | os.PathLike):
        return load_scales(scales)
    out: Scales = {}
    for block, entry in scales.items():
        unknown = set(entry) - set(_SUFFIX)
        if unknown or not {"s", "t"} <= set(entry):
            raise ValueError(f"scales[{block!r}] must hold 's', 't' and optionally 'd'; got {sorted(entry)}")
        out[block] = {k: np.asarray(v, np.float32).reshape(-1) for k, v in entry.items()}
    return out


def from_params(params: Mapping[str, Any]) -> Scales:
    """Per-block scales read from Hyper-Search / CSLA params (§1.5 read-out), strictly: every block must be
    present, with `scale_conv` and `scale_1x1`; `d` where the block has `scale_identity`."""
    out: Scales = {}
    for n in block_names(params):
        p = params[n]
        if "scale_conv" not in p or "scale_1x1" not in p:
            raise ValueError(f"block {n} has no scale_conv / scale_1x1: not an 'hs' or 'csla' model")
        out[n] = {k: np.asarray(p[name], np.float32) for k, name in _PARAM.items() if name in p}
    return out


def from_checkpoint(path: str | os.PathLike) -> Scales:
    """Scales of a Hyper-Search run: `path` is its workdir, its `checkpoints/` or one step's directory (the
    latest step is read)."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).expanduser().resolve()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not (path / "state").is_dir():
        steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []
        if not steps:
            raise FileNotFoundError(f"no checkpoint under {path}")
        path = path / str(steps[-1])
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(path / "state")["params"]
    return from_params(params)
