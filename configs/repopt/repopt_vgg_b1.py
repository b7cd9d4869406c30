"""RepOpt-VGG-B1 on ImageNet with RepOpt-SGD: `configs/repopt/repopt_vgg_imagenet.py` with variant=b1.

  python -m repjax.train --config configs/repopt/repopt_vgg_b1.py:scales=<scales.npz>,data=folder:<imagenet path> \
    --workdir runs/repopt_vgg_b1
"""

import importlib.util
import pathlib


def get_config(arg=None):
    path = pathlib.Path(__file__).with_name("repopt_vgg_imagenet.py")
    spec = importlib.util.spec_from_file_location("repopt_vgg_imagenet", path)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    return base.get_config(",".join(filter(None, ["variant=b1", arg])))
