"""Analytic multiply-accumulates (MACs) of a ViT per exit stage (spec §1.3), from the ViT family's own count.

`repjax.models.vit.macs_breakdown` counts the embedding, each block and the head (fvcore's convention:
LayerNorms, softmax, GELU and residual adds not counted). ViT-B/16 at 224 px: embedding 0.116 G, each block
1.454 G, total 17.56 GMACs, the "17.6 GFLOPs" of fvcore. A bottleneck adapter of rank r adds 2 L D r per
insertion (0.0024 G at r = 8); merged hosts (RepAdapter, LoRA after merging) add nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from repjax.models import vit


def _breakdown(depth: int, image_size: int, patch: int, width: int, mlp_ratio: float, num_prefix: int,
               channels: int, num_classes: int = 0) -> vit.MacsBreakdown:
    if image_size % patch:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
    if num_prefix not in (0, 1):
        raise ValueError(f"num_prefix must be 0 (average pooling) or 1 (class token), got {num_prefix}")
    model = vit.ViT(num_classes=num_classes, image_size=image_size, patch_size=patch, width=width, depth=depth,
                    num_heads=1, mlp_dim=int(mlp_ratio * width), pool="cls" if num_prefix else "gap")
    return vit.macs_breakdown(model, image_size, image_size, in_channels=channels)


def adapter_macs(tokens: int, width: int, rank: int, insertions: int = 1) -> int:
    """Unmerged bottleneck adapters (down D->r, up r->D) per block."""
    return 2 * tokens * width * rank * insertions


def stage_macs(exits: Sequence[int], image_size: int, patch: int, width: int, mlp_ratio: float = 4.0,
               num_prefix: int = 1, channels: int = 3, adapter: int = 0) -> list[int]:
    """Backbone MACs of each stage (the embedding counted in stage 1; `adapter` extra MACs per block);
    `exits` are 1-based block numbers."""
    costs = _breakdown(exits[-1], image_size, patch, width, mlp_ratio, num_prefix, channels)
    out, prev = [], 0
    for end in exits:
        out.append(costs.to_block(end) - (costs.to_block(prev) if prev else 0) + (end - prev) * int(adapter))
        prev = end
    return out


def vit_macs(depth: int, image_size: int, patch: int, width: int, num_classes: int, mlp_ratio: float = 4.0,
             num_prefix: int = 1, channels: int = 3) -> int:
    """A whole single-head ViT."""
    return _breakdown(depth, image_size, patch, width, mlp_ratio, num_prefix, channels, num_classes).total
