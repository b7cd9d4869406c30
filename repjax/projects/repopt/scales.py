"""RepOpt-VGG Hyper-Search scales: the released `RepOpt-VGG-*-scales.pth` files (and our `.npz` copies).

A file holds, per block, `<prefix>.scale_conv.weight` (s, 3x3 branch), `<prefix>.scale_1x1.weight` (t, 1x1
branch) and, for blocks with an identity branch, `<prefix>.scale_identity.weight` (d), where prefix is `stage0`
or `stage{s}.{i}` as in the official code. Blocks are named like the Flax modules of `repjax.projects.repopt.repvgg`
(`stage0`, `stage1_0`, ...); `block_names` may use either spelling. Unlike the official read-out (which loads
with `strict=False`), every key must be accounted for: problems are reported together in `ScaleFileError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

import numpy as np

from repjax.io import torch_zip

Scales = dict[str, dict[str, np.ndarray]]

_KEY = re.compile(r"^(stage\d+)(?:\.(\d+))?\.scale_(conv|1x1|identity)\.weight$")
_FLAX_KEY = re.compile(r"^(stage\d+(?:_\d+)?)/([std])$")  # `repjax.projects.repopt.grad_mult.save_scales` layout
_LETTER = {"conv": "s", "1x1": "t", "identity": "d"}
_SUFFIX = {v: k for k, v in _LETTER.items()}


class ScaleFileError(ValueError):
    """The scale file does not hold exactly the expected scale tensors."""


def block_name(prefix: str) -> str:
    """Official prefix (`stage1.0`) -> Flax block name (`stage1_0`); Flax names pass through."""
    return prefix.replace(".", "_")


def torch_prefix(name: str) -> str:
    """Flax block name (`stage1_0`) -> official prefix (`stage1.0`)."""
    return name.replace("_", ".")


def _order(name: str) -> tuple[int, int]:
    stage, _, index = name.removeprefix("stage").partition("_")
    return int(stage), int(index or -1)


def _read(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".npz"):
        with np.load(path) as f:
            raw = {k: f[k] for k in f.files}
        renamed = {}
        for k, v in raw.items():
            m = _FLAX_KEY.match(k)
            renamed[f"{torch_prefix(m.group(1))}.scale_{_SUFFIX[m.group(2)]}.weight" if m else k] = v
        return renamed
    if path.endswith((".pth", ".pt")):
        return torch_zip.load_state_dict(path, upcast_bfloat16=True)
    raise ScaleFileError(f"unknown scale file format {path!r}: expected .pth/.pt or .npz")


def _strip_module(raw: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    prefixed = [k for k in raw if k.startswith("module.")]
    if prefixed and len(prefixed) < len(raw):
        raise ScaleFileError(f"{path!r}: {len(prefixed)} of {len(raw)} keys carry a 'module.' prefix "
                             f"(e.g. {prefixed[0]!r}); expected all or none")
    return {k.removeprefix("module."): v for k, v in raw.items()}


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}): {', '.join(items[:limit])}{more}"


def load_repopt_scales(path: str | os.PathLike, block_names: Mapping[str, bool] | Iterable[str] | None = None,
                       *, ignore_other_keys: bool = False) -> Scales:
    """Reads `{block: {'s': (C,), 't': (C,), 'd': (C,) if the block has an identity}}` (float32, block order).

    Args:
      path: a released `.pth` (read without torch and without executing pickle code), or an `.npz` with the
        official keys (`save_repopt_scales`) or with `<block>/<s|t|d>` keys
        (`repjax.projects.repopt.grad_mult.save_scales`).
      block_names: the expected blocks; a mapping name -> has_identity also checks where `d` must appear.
        Without it, every block found must have s and t.
      ignore_other_keys: skip keys that are not scales (reading a whole Hyper-Search checkpoint) instead of
        reporting them as unexpected.
    """
    path = os.fspath(path)
    raw = _strip_module(_read(path), path)
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
    if block_names is not None:
        expected = dict(block_names) if isinstance(block_names, Mapping) else dict.fromkeys(block_names)
        expected = {block_name(k): v for k, v in expected.items()}
        unexpected = unexpected + [f"{torch_prefix(b)}.* (block not expected)" for b in found if b not in expected]
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
    problems = [(t, items) for t, items in [("missing keys", missing), ("unexpected keys", unexpected),
                                            ("not 1-D per-channel tensors", bad_shape),
                                            ("blocks whose s/t/d lengths differ", sizes)] if items]
    if problems:
        raise ScaleFileError(f"RepOpt scales {path!r}:\n" + "\n".join(_listing(t, i) for t, i in problems))
    return {b: found[b] for b in sorted(found, key=_order)}


def save_repopt_scales(path: str | os.PathLike, scales: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Writes scales to `.npz` under the official key names (readable by `load_repopt_scales`)."""
    flat = {}
    for name, group in scales.items():
        unknown = set(group) - set(_SUFFIX)
        if unknown:
            raise ValueError(f"block {name!r}: unknown scale names {sorted(unknown)}; expected s, t, d")
        for letter, value in group.items():
            flat[f"{torch_prefix(name)}.scale_{_SUFFIX[letter]}.weight"] = np.asarray(value, np.float32).reshape(-1)
    np.savez(path, **flat)
