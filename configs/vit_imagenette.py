"""Pre-training the 12-block ViT backbone (`vit_imagenette`: ViT-Ti width, patch 8) on Imagenette at 64 px.

The backbone that the parameter-efficient transfer and Dyn-Adapter experiments start from (no pretrained ViT can
be downloaded here). 12 blocks, so that exits after blocks 3/6/9/12 exist; 64 patch tokens + a class token.
Recipe: DeiT's (Touvron et al. 2021) at a CPU budget: AdamW, lr 1e-3 per 256 images (DeiT: 5e-4 x batch/512,
doubled for the short schedule; an assumption), wd 0.05 with no decay on 1-D parameters, the position embedding
and the class token, warmup + cosine, label smoothing 0.1, drop-path 0.1, random-resized crop + flip;
`aug=strong` (default, DeiT's) adds RandAugment(2, 9) and mixup 0.8 / cutmix 1.0. `model=` another registered
ViT, `patch=`/`image_size=` change the token grid.

    python -m repjax.train --config configs/vit_imagenette.py:epochs=30 --workdir runs/vit_imagenette
"""

from repjax import config as config_lib

NO_DECAY = r"(^|/)(scale|bias)$|(^|/)(pos_embed|cls)$"


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, model="vit_imagenette", image_size=64, patch=8, epochs=30, batch=128,
                               aug="strong", drop_path=0.1, data="folder:../shared/data/imagenette")
    if arg.aug not in ("weak", "strong"):
        raise ValueError(f"aug must be weak or strong, got {arg.aug!r}")
    size = int(arg.image_size)
    c = config_lib.defaults()
    c.model.name = arg.model
    c.model.kwargs.image_size = size
    c.model.kwargs.patch_size = int(arg.patch)
    c.model.kwargs.drop_path = float(arg.drop_path)
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
    c.optim.lr = 1e-3 * arg.batch / 256
    c.optim.weight_decay = 0.05
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = max(1, arg.epochs // 10)
    c.optim.clip_norm = 1.0
    c.optim.rules = [(NO_DECAY, {"weight_decay": 0.0})]
    c.checkpoint_every_steps = 1000
    c.log_every_steps = 20
    c.eval_every_epochs = 5
    return c
