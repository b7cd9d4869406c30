"""Host-side preprocessing from a big_vision-like string: `"pad_crop(4)|flip_lr|normalize(cifar10)"`.

Ops are registered by name in `OPS` (by `repjax.data.ops` and `repjax.data.randaugment`); a factory takes the
op's arguments and returns an `Op`, callable as `op(image, rng) -> image` (numpy/Pillow; `rng` is the example's
own `np.random.Generator`). An op may also carry a `batch(images [N,...], rngs) -> images` form that draws
from each example's generator exactly as the single form does, so batched and per-example preprocessing give
identical results. Arguments are Python
literals; bare words are strings (`normalize(imagenet)`). Images enter as uint8 HWC; `normalize` and
`value_range` turn them into float32, after which Pillow ops no longer apply.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from repjax.registry import Registry

ImageFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]
BatchFn = Callable[[np.ndarray, Sequence[np.random.Generator]], np.ndarray]

OPS = Registry("preprocessing op")

# Per-channel mean and std of images scaled to [0, 1].
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "digits": ((0.3053,), (0.3759,)),
}


@dataclasses.dataclass(frozen=True)
class Op:
    """One preprocessing step; `batch` (optional) is its vectorised form."""

    name: str
    single: ImageFn
    batch: BatchFn | None = None

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.single(image, rng)


class Preprocess:
    """A parsed pp string: per example (`__call__`) or per batch (`batch`)."""

    def __init__(self, ops: list[Op], spec: str = ""):
        self.ops, self.spec = ops, spec

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for op in self.ops:
            image = op(image, rng)
        return image

    def batch(self, images: np.ndarray | Sequence[np.ndarray], rngs: Sequence[np.random.Generator]) -> np.ndarray:
        """Preprocesses a batch, using each op's vectorised form where the images share one shape."""
        x: np.ndarray | list[np.ndarray] = images if isinstance(images, np.ndarray) else list(images)
        for op in self.ops:
            if op.batch is not None and not isinstance(x, np.ndarray) and len({i.shape for i in x}) == 1:
                x = np.stack(x)
            if op.batch is not None and isinstance(x, np.ndarray):
                x = op.batch(x, rngs)
            else:
                x = [op.single(image, rng) for image, rng in zip(x, rngs)]
        if isinstance(x, np.ndarray):
            return x
        shapes = sorted({i.shape for i in x})
        if len(shapes) > 1:
            raise ValueError(f"pp {self.spec!r} gives images of different shapes {shapes[:4]}; end it with a "
                             "fixed-size op such as resize(224) or center_crop(224)")
        return np.stack(x)


def _value(node: ast.expr) -> Any:
    if isinstance(node, ast.Name):
        return node.id
    return ast.literal_eval(node)


def parse(pp: str) -> list[tuple[str, list[Any], dict[str, Any]]]:
    """`"a(1)|b"` -> [("a", [1], {}), ("b", [], {})]."""
    out = []
    for part in (p.strip() for p in pp.split("|")):
        if not part:
            continue
        try:
            node = ast.parse(part, mode="eval").body
            if isinstance(node, ast.Name):
                out.append((node.id, [], {}))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                kwargs = {k.arg: _value(k.value) for k in node.keywords if k.arg}
                out.append((node.func.id, [_value(a) for a in node.args], kwargs))
            else:
                raise ValueError
        except (SyntaxError, ValueError):
            raise ValueError(f"Cannot parse pp op {part!r} in {pp!r}; expected name or name(args)") from None
    return out


def build(pp: str) -> Preprocess:
    """Parses `pp` into a `Preprocess`; unknown op names raise with the closest known names."""
    ops = []
    for name, args, kwargs in parse(pp):
        factory = OPS.get(name)
        try:
            ops.append(factory(*args, **kwargs))
        except (TypeError, ValueError) as e:
            raise ValueError(f"Bad arguments for pp op {name!r} in {pp!r}: {e}") from None
    return Preprocess(ops, pp)


def need_uint8(name: str, image: np.ndarray) -> None:
    if image.dtype != np.uint8:
        raise ValueError(f"pp op {name!r} needs uint8 images, got {image.dtype}; put it before normalize")


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 HWC (C = 1 or 3) -> a Pillow image ('L' or 'RGB')."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def from_pil(img: Image.Image) -> np.ndarray:
    """A Pillow image -> uint8 HWC (greyscale keeps a channel axis of 1)."""
    out = np.asarray(img, np.uint8)
    return out[..., None] if out.ndim == 2 else out
