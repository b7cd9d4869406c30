"""Large-kernel ConvNeXt-style backbones (ConvNeXt / SLaK / PeLK mixers) on Imagenette at low resolution.

Recipe: ConvNeXt/SLaK's (AdamW, wd 0.05 with no decay on 1-D parameters and the PE, warmup + cosine,
label smoothing 0.1) at a CPU budget: lr 2e-3 per 128 images (the ImageNet lr 4e-3 per 4096 is for 300
epochs), random-resized crop (scale >= 0.35) + flip; `aug=strong` adds RandAugment(2, 9) and mixup 0.8 /
cutmix 1.0 as the papers. `model=` any registered name (pelk_imagenette, slak_imagenette, convnext_imagenette);
`model.kwargs` override the architecture (e.g. --config.model.kwargs.kernel_sizes="(31, 15, 7, 3)"). The shared
parts: `repjax.recipes.imagenet_style`.

    python -m repjax.train --config configs/pelk/lk_imagenette.py:model=pelk_imagenette,epochs=10 --workdir runs/pelk
"""

from repjax import config as config_lib, recipes

NO_DECAY = r"(^|/)(scale|bias|gamma)$|(^|/)pe_\d+$"


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, model="pelk_imagenette", image_size=64, epochs=30, batch=128, aug="weak",
                               data="folder:../shared/data/imagenette")
    return recipes.imagenet_style(model=arg.model, size=int(arg.image_size), data=arg.data, aug=arg.aug,
                                  batch=arg.batch, epochs=arg.epochs, lr=2e-3 * arg.batch / 128, no_decay=NO_DECAY)
