"""RepMLPNet on CIFAR-10 (32x32) with or without the Local Perceptron (Locality Injection) branches.

Recipe: RepMLPNet's (AdamW, lr 1e-3 per 256 images, wd 0.1 with no decay on 1-D parameters, warmup,
cosine to 0, label smoothing 0.1, global-norm clip 5.0 as the official config.py), with the weak CIFAR
augmentation (pad-crop + flip) by default; `aug=strong` adds RandAugment, mixup 0.4 and cutmix 1.0 as the
paper's ImageNet recipe. `local=0` trains without the conv branches (the same deploy architecture).

    python -m repjax.train --config configs/repmlp/repmlpnet_cifar.py:epochs=30 --workdir runs/repmlp
    python -m repjax.train --config configs/repmlp/repmlpnet_cifar.py:epochs=30,local=0 --workdir runs/repmlp_nolocal
"""

from repjax import config as config_lib

NO_DECAY_1D = r"(^|/)(scale|bias)$"  # BN gammas/betas and biases (the official optimizer skips 1-D params)


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, model="repmlpnet_cifar", local=1, epochs=100, batch=128, aug="weak",
                               data="folder:../shared/data/cifar10")
    if arg.aug not in ("weak", "strong"):
        raise ValueError(f"aug must be weak or strong, got {arg.aug!r}")
    c = config_lib.defaults()
    c.model.name = arg.model
    if not arg.local:
        c.model.kwargs.reparam_conv_k = ()
    c.data.source = arg.data
    c.data.train_pp = "pad_crop(4)|flip_lr|normalize(cifar10)"
    if arg.aug == "strong":
        c.data.train_pp = "pad_crop(4)|flip_lr|randaugment(2,9)|normalize(cifar10)"
        c.data.mixup_alpha, c.data.cutmix_alpha = 0.4, 1.0
    c.data.eval_pp = "normalize(cifar10)"
    c.batch_size = arg.batch
    c.eval_batch_size = 500
    c.total_steps, c.epochs = 0, arg.epochs  # steps resolved from the training split's size at run time
    c.loss.label_smoothing = 0.1
    c.optim.name = "adamw"
    c.optim.lr = 1e-3 * arg.batch / 256
    c.optim.weight_decay = 0.1
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = max(1, arg.epochs // 10)
    c.optim.clip_norm = 5.0
    c.optim.rules = [(NO_DECAY_1D, {"weight_decay": 0.0})]
    c.checkpoint_every_steps = 2000
    c.log_every_steps = 50
    c.eval_every_epochs = 10
    return c
