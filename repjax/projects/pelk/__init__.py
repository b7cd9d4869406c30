"""PeLK (Chen et al., CVPR'24) and the large-kernel family it compares against.

- `peripheral`: sharing grids, kernel expansion (Eq. 1), kernel-wise PE (Eq. 3), partial split.
- `lk_mixers`: dense / stripe (SLaK) / peripheral depthwise mixers with their deploy forms.
- `lk_convnext`: ConvNeXt, SLaK and PeLK on one backbone; `replknet`: RepLKNet.
- `sparsity`: SLaK's dynamic sparsity (optax transform `dynamic_sparsity`), `sparsity_eval`: its evaluator.
The fast depthwise convolution they all use is shared machinery: `repjax.nn.dwconv`.
"""

from repjax.projects.pelk import lk_convnext, replknet, sparsity, sparsity_eval  # noqa: F401  (register)
