"""Large-kernel ConvNeXt-style backbones (ConvNeXt / SLaK / PeLK mixers) on Imagenette at low resolution.

Recipe: ConvNeXt/SLaK's (AdamW, wd 0.05 with no decay on 1-D parameters and the PE, warmup + cosine,
label smoothing 0.1) at a CPU budget: lr 2e-3 per 128 images (the ImageNet lr 4e-3 per 4096 is for 300
epochs), random-resized crop (scale >= 0.35) + flip; `aug=strong` adds RandAugment(2, 9) and mixup 0.8 /
cutmix 1.0 as the papers. `model=` any registered name (pelk_imagenette, slak_imagenette, convnext_imagenette);
`model.kwargs` override the architecture (e.g. --config.model.kwargs.kernel_sizes="(31, 15, 7, 3)").

    python -m repjax.train --config configs/pelk/lk_imagenette.py:model=pelk_imagenette,epochs=10 --workdir runs/pelk
"""

from repjax import config as config_lib

NO_DECAY = r"(^|/)(scale|bias|gamma)$|(^|/)pe_\d+$"


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, model="pelk_imagenette", image_size=64, epochs=30, batch=128, aug="weak",
                               data="folder:../shared/data/imagenette")
    if arg.aug not in ("weak", "strong"):
        raise ValueError(f"aug must be weak or strong, got {arg.aug!r}")
    size = int(arg.image_size)
    c = config_lib.defaults()
    c.model.name = arg.model
    c.model.kwargs.image_size = size
    c.data.source = arg.data
    c.data.eval_split = "val"
    c.data.train_pp = f"to_rgb|random_resized_crop({size},0.35)|flip_lr|normalize(imagenet)"
    if arg.aug == "strong":
        c.data.train_pp = f"to_rgb|random_resized_crop({size},0.35)|flip_lr|randaugment(2,9)|normalize(imagenet)"
        c.data.mixup_alpha, c.data.cutmix_alpha = 0.8, 1.0
    c.data.eval_pp = f"to_rgb|resize({size * 8 // 7})|center_crop({size})|normalize(imagenet)"
    c.batch_size = arg.batch
    c.eval_batch_size = 250
    c.total_steps, c.epochs = 0, arg.epochs  # steps resolved from the training split's size at run time
    c.loss.label_smoothing = 0.1
    c.optim.name = "adamw"
    c.optim.lr = 2e-3 * arg.batch / 128
    c.optim.weight_decay = 0.05
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = max(1, arg.epochs // 10)
    c.optim.rules = [(NO_DECAY, {"weight_decay": 0.0})]
    c.checkpoint_every_steps = 1000
    c.log_every_steps = 20
    c.eval_every_epochs = 5
    return c
