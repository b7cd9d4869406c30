"""RepOpt-VGG on CIFAR-10: Hyper-Search (mode=hs) and RepOpt-SGD training of the plain model (mode=target).

1. Search the scales with the HS model (§5 HS recipe: SGD Nesterov 0.9, lr 0.1 per 256, wd 4e-5, cosine,
   10 warmup epochs, label smoothing 0.1, clip 5.0; no decay on BN, biases, s and t; decay on d):
     python -m repjax.train --config configs/repopt/repopt_vgg_cifar.py:mode=hs --workdir runs/repopt_hs
   then write its scales: `python -m repjax.projects.repopt.repopt_vgg runs/repopt_hs runs/scales.npz`.
2. Train the plain model with RepOpt-SGD from those scales (re-initialized kernels, Grad Mult, no clipping):
     python -m repjax.train --config configs/repopt/repopt_vgg_cifar.py:mode=target,scales=runs/scales.npz \
       --workdir runs/repopt_target
`model=` picks another registered RepOpt-VGG (e.g. repopt_vgg_b1 for the paper's HS on 32x32 inputs).
"""

from repjax import config as config_lib
from repjax.projects.repopt.grad_mult import hs_rules, repopt_sgd_rules


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, mode="hs", scales="", model="repopt_vgg_cifar", epochs=240, batch=256,
                               data="folder:../shared/data/cifar10")
    if arg.mode not in ("hs", "target"):
        raise ValueError(f"mode must be hs or target, got {arg.mode!r}")
    if arg.mode == "target" and not arg.scales:
        raise ValueError("mode=target needs scales=<.npz of searched scales> (see the module docstring)")
    c = config_lib.defaults()
    c.model.name = arg.model
    c.model.kwargs.mode = arg.mode
    c.data.source = arg.data
    c.data.train_pp = "pad_crop(4)|flip_lr|normalize(cifar10)"
    c.data.eval_pp = "normalize(cifar10)"
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
    c.optim.warmup_epochs = 10
    if arg.mode == "hs":
        c.optim.clip_norm = 5.0
        c.optim.rules = hs_rules()
    else:
        c.model.kwargs.init_scales = arg.scales
        c.optim.clip_norm = 0.0  # clipping breaks the equivalence (§1.7)
        c.optim.rules = repopt_sgd_rules(arg.scales)
    c.checkpoint_every_steps = 2000
    c.log_every_steps = 50
    c.eval_every_epochs = 10
    return c
