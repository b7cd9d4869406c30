"""CIFAR ResNet-20/32/44/56 trained from scratch on CIFAR-10 (He et al. 2016, section 4.2).

The paper's recipe: SGD momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 (divided by 10 at 32k and 48k
iterations, 64k in all), pad-4 random crop + flip. Cosine decay replaces the step schedule here (config
switch `optim.schedule`). Default data: the ImageFolder copy in ../shared/data/cifar10.

python -m repjax.train --config configs/resnet_cifar10.py:depth=20,epochs=30 --workdir runs/resnet20
"""

from repjax import config as config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, depth=20, epochs=182, data="folder:../shared/data/cifar10", batch=128)
    c = config_lib.defaults()
    c.model.name = f"resnet{arg.depth}"
    c.data.source = arg.data
    c.data.train_pp = "pad_crop(4)|flip_lr|normalize(imagenet)"
    c.data.eval_pp = "normalize(imagenet)"
    c.batch_size = arg.batch
    c.eval_batch_size = 500
    c.total_steps, c.epochs = 0, arg.epochs  # steps resolved from the training split's size at run time
    c.optim.name = "sgd"
    c.optim.lr = 0.1 * arg.batch / 128
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 200
    c.checkpoint_every_steps = 1000
    c.log_every_steps = 50
    c.eval_every_epochs = 5
    return c
