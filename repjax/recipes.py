"""Training recipes shared by configs: the parts of a `get_config()` that several papers' configs agree on.

`imagenet_style`: ImageNet-style classification from an ImageFolder at low resolution, the recipe family of
DeiT / ConvNeXt / SLaK: random-resized crop (scale >= 0.35) + flip, `aug="strong"` adding RandAugment(2, 9) and
mixup 0.8 / cutmix 1.0; resize 8/7 + centre crop for eval; AdamW with weight decay 0.05 (none on the leaves that
`no_decay` matches), warmup (a tenth of the epochs, at least one) + cosine, label smoothing 0.1; lengths in
epochs, resolved into steps from the training split at run time. Each config keeps its own learning rate and
model keys.
"""

from __future__ import annotations

import ml_collections as mlc

from repjax import config as config_lib

AUGMENTATIONS = ("weak", "strong")


def imagenet_style(*, model: str, size: int, data: str, aug: str, batch: int, epochs: float, lr: float,
                   no_decay: str) -> mlc.ConfigDict:
    """A full config (`config.defaults()` filled in) for `model` at `size` px; see the module docstring."""
    if aug not in AUGMENTATIONS:
        raise ValueError(f"aug must be one of {AUGMENTATIONS}, got {aug!r}")
    c = config_lib.defaults()
    c.model.name = model
    c.model.kwargs.image_size = size
    c.data.source = data
    c.data.eval_split = "val"
    augment = "|randaugment(2,9)" if aug == "strong" else ""
    c.data.train_pp = f"to_rgb|random_resized_crop({size},0.35)|flip_lr{augment}|normalize(imagenet)"
    if aug == "strong":
        c.data.mixup_alpha, c.data.cutmix_alpha = 0.8, 1.0
    c.data.eval_pp = f"to_rgb|resize({size * 8 // 7})|center_crop({size})|normalize(imagenet)"
    c.batch_size = batch
    c.eval_batch_size = 250
    c.total_steps, c.epochs = 0, epochs  # steps resolved from the training split's size at run time
    c.loss.label_smoothing = 0.1
    c.optim.name = "adamw"
    c.optim.lr = lr
    c.optim.weight_decay = 0.05
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = max(1, epochs // 10)
    c.optim.rules = [(no_decay, {"weight_decay": 0.0})]
    c.checkpoint_every_steps = 1000
    c.log_every_steps = 20
    c.eval_every_epochs = 5
    return c
