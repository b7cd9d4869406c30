"""RepVGG and RepOptimizers (Ding et al., ICLR'23): structural and gradient re-parameterization.

- `repvgg`: RepVGG A/B/g2/g4/D2se, training and deploy forms, official PyTorch layout.
- `repopt_vgg`: the Hyper-Search / CSLA model and the plain RepOpt-VGG target, scale extraction, re-init.
- `grad_mult`: Grad Mult (Eq. 3) as the optax transform `repopt_grad_mult`, RepOpt-SGD / AdamW rules.
- `scales`: the one reader and writer of scale files (official `.pth` keys or `.npz`).
- `quant`: simulated int8 post-training quantization and its evaluator `int8_ptq`.
"""

from repjax.projects.repopt import grad_mult, repopt_vgg, repvgg  # noqa: F401  (register)
from repjax.projects.repopt.quant import evaluator  # noqa: F401  (registers int8_ptq)
