"""Data sources (`get_source`), host-side preprocessing (`augment`) and batching (`pipeline`).

A source spec is `name` or `name:arg`:
  digits                  scikit-learn 8x8 digits (default; fixed train/test split)
  folder:<path>           ImageFolder `<path>/<split>/<class>/*.jpg|png`
  cifar10:<path>          official CIFAR-10 binary archive or its extracted folder
  tfds:<name>[@<dir>]     prepared ArrayRecord TFDS dataset (see `repjax.data.tfds_prepare`)
  synthetic[:HxWxC,N,K]   random images for tests
"""

from __future__ import annotations

# Source modules register themselves in SOURCES, op modules in augment.OPS, when imported.
from repjax.data import augment, cifar10, digits, folder, ops, pipeline, randaugment, synthetic, tfds_source  # noqa: F401
from repjax.data.base import SOURCES, ArraySource, DataError, Source, SourceOptions, UnknownSplitError

__all__ = ["SOURCES", "ArraySource", "DataError", "Source", "SourceOptions", "UnknownSplitError", "augment",
           "from_config", "get_source", "pipeline", "split_spec"]


def split_spec(spec: str) -> tuple[str, str | None]:
    """`"folder:/a/b"` -> ("folder", "/a/b"); `"digits"` -> ("digits", None)."""
    name, sep, arg = spec.strip().partition(":")
    return name.strip(), (arg if sep else None)


def get_source(spec: str, split: str, options: SourceOptions | None = None) -> Source:
    """The `split` of the source named by `spec` (see the module docstring for the forms)."""
    name, arg = split_spec(spec)
    if name not in SOURCES:  # sources registered by a project package (e.g. minivtab)
        from repjax import projects

        projects.import_all()
    return SOURCES.get(name)(arg, split, options or SourceOptions())


def from_config(config, split: str, spec: str | None = None) -> Source:
    """`get_source(spec or config.data.source, split)` with the options of `config.data` (`SourceOptions`)."""
    return get_source(spec or config.data.source, split, SourceOptions.from_config(config))
