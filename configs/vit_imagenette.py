"""Pre-training the 12-block ViT backbone (`vit_imagenette`: ViT-Ti width, patch 8) on Imagenette at 64 px.

The backbone that the parameter-efficient transfer and Dyn-Adapter experiments start from (no pretrained ViT can
be downloaded here). 12 blocks, so that exits after blocks 3/6/9/12 exist; 64 patch tokens + a class token.
Recipe: DeiT's (Touvron et al. 2021) at a CPU budget: AdamW, lr 1e-3 per 256 images (DeiT: 5e-4 x batch/512,
doubled for the short schedule; an assumption), wd 0.05 with no decay on 1-D parameters, the position embedding
and the class token, warmup + cosine, label smoothing 0.1, drop-path 0.1, random-resized crop + flip;
`aug=strong` (default, DeiT's) adds RandAugment(2, 9) and mixup 0.8 / cutmix 1.0. `model=` another registered
ViT, `patch=`/`image_size=` change the token grid. The shared parts: `repjax.recipes.imagenet_style`.

    python -m repjax.train --config configs/vit_imagenette.py:epochs=30 --workdir runs/vit_imagenette
    python -m repjax.train --config configs/vit_imagenette.py:epochs=8,aug=weak --workdir runs/vit_imagenette
        # what was run here (60.6% top-1, README): 8 epochs on the shared 2-core CPU
"""

from repjax import config as config_lib, recipes

NO_DECAY = r"(^|/)(scale|bias)$|(^|/)(pos_embed|cls)$"


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, model="vit_imagenette", image_size=64, patch=8, epochs=30, batch=128,
                               aug="strong", drop_path=0.1, data="folder:../shared/data/imagenette")
    c = recipes.imagenet_style(model=arg.model, size=int(arg.image_size), data=arg.data, aug=arg.aug,
                               batch=arg.batch, epochs=arg.epochs, lr=1e-3 * arg.batch / 256, no_decay=NO_DECAY)
    c.model.kwargs.patch_size = int(arg.patch)
    c.model.kwargs.drop_path = float(arg.drop_path)
    c.optim.clip_norm = 1.0
    return c
