"""Evaluate the imported akamaster CIFAR ResNet weights (PyTorch layout) on the shared CIFAR-10.

python -m repjax.eval --config configs/resnet_cifar10_pretrained.py:depth=20
"""

from repjax import config as config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, depth=20, data="folder:../shared/data/cifar10",
                               weights_dir="../shared/weights")
    c = config_lib.defaults()
    c.model.name = f"resnet{arg.depth}"
    c.data.source = arg.data
    c.data.eval_split = "test"
    c.data.eval_pp = "normalize(imagenet)"  # the weights were trained on ImageNet-normalised [0, 1] inputs
    c.eval_batch_size = 500
    c.init.path = f"{arg.weights_dir}/resnet{arg.depth}_cifar10_akamaster.npz"
    c.init.format = "torch"
    return c
