"""RepOpt-VGG-{B1,B2,L1,L2} on ImageNet with RepOpt-SGD (spec §5; `configs/repopt/repopt_vgg_b1.py` etc. wrap this).

Recipe: 120 epochs, batch 256, lr 0.1 per 256 images (linear scaling), Nesterov momentum 0.9, wd 4e-5 (none on
BN and biases), 5 warmup epochs then cosine to 0, label smoothing 0.1, no mixup, no EMA, no clipping.
Train: RandomResizedCrop(224) + flip + RandAugment(2 ops). The official raug15 draws the magnitude uniformly
in [0, 15) on a /10 scale; the `randaugment` op here takes one fixed magnitude capped at 10, so this uses 10.
Eval: resize the short side to 224 + centre crop 224. The plain model starts from the re-initialization
s*W3 + pad(t*W1) + pad(diag d) of the searched `scales` (a released `.pth` or an `.npz`;
`repjax.projects.repopt.scales`).

  python -m repjax.train --config configs/repopt/repopt_vgg_b1.py:scales=b1_scales.npz,data=folder:/data/imagenet \
    --workdir runs/repopt_vgg_b1
"""

from repjax import config as config_lib
from repjax.projects.repopt.grad_mult import repopt_sgd_rules


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, variant="b1", scales="", data="folder:<imagenet path>", epochs=120,
                               batch=256, randaug=10.0)
    if not arg.scales:
        raise ValueError("pass scales=<.npz of the searched RepOpt-VGG scales> (see the module docstring)")
    c = config_lib.defaults()
    c.model.name = f"repopt_vgg_{arg.variant}"
    c.model.kwargs.mode = "target"
    c.model.kwargs.init_scales = arg.scales
    c.data.source = arg.data
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.train_pp = f"random_resized_crop(224)|flip_lr|randaugment(2,{arg.randaug})|normalize(imagenet)"
    c.data.eval_pp = "resize_small(224)|center_crop(224)|normalize(imagenet)"
    c.data.num_threads = 16
    c.batch_size = arg.batch
    c.eval_batch_size = 500
    c.total_steps, c.epochs = 0, arg.epochs  # steps resolved from the training split's size at run time
    c.loss.label_smoothing = 0.1
    c.optim.name = "sgd"
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.lr = 0.1 * arg.batch / 256
    c.optim.weight_decay = 4e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = 5
    c.optim.clip_norm = 0.0  # never clip with RepOptimizer (§1.7)
    c.optim.rules = repopt_sgd_rules(arg.scales)
    c.ema_decay = 0.0
    c.checkpoint_every_steps = 5000
    c.log_every_steps = 100
    c.eval_every_epochs = 5
    return c
