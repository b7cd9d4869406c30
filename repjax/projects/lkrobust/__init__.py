"""Large-kernel robustness (Chen et al., "Revealing the Dark Secrets of Extremely Large Kernel ConvNets on
Robustness", ICML'24): ImageNet-C corruptions and mCE, distribution-shift sets, attacks, occlusion, frequency
and structure analyses, each a registered evaluator that runs on any registered model.

Registered here: evaluators `imagenet_c`, `imagenet_a`, `imagenet_r`, `imagenet_o`, `imagenet_9`,
`imagenet_v2`, `imagenet_sketch`, `adversarial`, `occlusion`, `frequency_noise`, `frequency_filter`,
`fourier_heatmap`, `kernel_attention`, `feature_variance`, `lesion`; data source `corrupt:`.
"""

from repjax.projects.lkrobust import attacks, frequency, imagenet_c, occlusion, shift, structure  # noqa: F401
