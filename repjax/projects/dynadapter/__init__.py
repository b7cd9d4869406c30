"""Dyn-Adapter (Zhang et al., ECCV'24, arXiv 2407.14302): multi-level exits with balanced heads, the adaptive
multi-exit loss, bidirectional sparsity and early-exit inference on a ViT with a PETL host; plus mini-VTAB."""

from repjax.data import vtab  # noqa: F401  (registers the vtab / vtab_txt sources)
from repjax.projects.dynadapter import early_exit, evaluator, exits, loss, minivtab, sparsity  # noqa: F401
