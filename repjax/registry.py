"""Name -> factory registries (models, data sources, optimizers, transforms, evaluators).

A registry is a plain mapping filled by decorators at import time, in the style of big_vision:

    MODELS = Registry("model")

    @MODELS.register("resnet20")
    def resnet20(**kw): ...

    MODELS.get("resnet20")   # unknown names raise with the closest known names
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any


class Registry:
    """A named table of factories with helpful errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._table: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, factory: Callable[..., Any] | None = None):
        """Registers `factory` under `name`; usable as a decorator."""

        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._table and self._table[name] is not fn:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._table[name] = fn
            return fn

        return add(factory) if factory is not None else add

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._table[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._table, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(
                f"Unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._table))}"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._table))

    def names(self) -> list[str]:
        return sorted(self._table)
