"""Large-kernel robustness (Chen et al., "Revealing the Dark Secrets of Extremely Large Kernel ConvNets on
Robustness", ICML'24): ImageNet-C corruptions and mCE, distribution-shift sets, attacks, occlusion, frequency
and structure analyses, each a registered evaluator that runs on any registered model."""

from repjax.projects.lkrobust import imagenet_c  # noqa: F401  (registers evaluator `imagenet_c`, source `corrupt`)
