"""One package per paper: everything a paper introduces lives in `repjax/projects/<paper>/`.

The rule (what a new paper follows):
- `repjax/projects/<paper>/` holds the paper's models, its optax transforms, losses, evaluators, file formats
  and re-parameterizations, each registered by name in the shared registries (model families with
  `repjax.models.register`, `repjax.optim.TRANSFORMS`, `repjax.losses.LOSSES`, `repjax.evals.EVALUATORS`);
  weight import follows from the family contract (`repjax.models.family`). Its `__init__` imports the modules
  that register, and its name is added to `PROJECTS` below.
- Its configs live in `configs/<paper>/`, its reproduction scripts in `experiments/<paper>*.py`, its tests in
  `tests/test_<paper>*.py` or tests named after its modules.
- Shared machinery (`repjax/nn`, `nn/dwconv`, `optim`, `data`, `sharding`, `step`, `train`, `evals`, `io`) never
  imports a project: a project plugs in through the registries. Generic model families used by several papers
  (ResNet, the small CNN, ViT) live in `repjax/models/`.

| package | paper |
|---|---|
| `repopt` | RepVGG and RepOptimizers (Ding et al., ICLR'23): RepVGG, RepOpt-VGG, Grad Mult, scale files, int8 PTQ |
| `repmlp` | RepMLPNet (Ding et al., CVPR'22): RepMLP block, Locality Injection of whole networks |
| `pelk` | PeLK (Chen et al., CVPR'24) and the large-kernel family: peripheral conv, ConvNeXt, SLaK, RepLKNet |
| `lkrobust` | LK robustness (Chen et al., ICML'24): ImageNet-C/A/R/O/9, attacks, occlusion, frequency, structure |
| `dynadapter` | Dyn-Adapter (Zhang et al., ECCV'24): exits, multi-exit loss, bidirectional sparsity, early exit |
"""

from __future__ import annotations

import importlib

PROJECTS = ("repopt", "repmlp", "pelk", "lkrobust", "dynadapter")


def import_all() -> None:
    """Imports every project package, which registers its models, transforms, evaluators and importers."""
    for name in PROJECTS:
        importlib.import_module(f"repjax.projects.{name}")
