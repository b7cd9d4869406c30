"""Analytic multiply-accumulates (MACs) of a plain ViT, per block and per exit stage (spec §1.3).

Per block with L tokens, width D, MLP ratio m (LayerNorms, softmax, GELU and residual adds not counted, as in
fvcore):

    qkv 3 L D^2  +  scores L^2 D  +  attention.V L^2 D  +  proj L D^2  +  MLP 2 m L D^2

Patch embedding: (H/p)(W/p) * p^2 C * D. ViT-B/16 at 224 px (L = 197, D = 768, m = 4): embedding 0.116 G, each
block 1.454 G, head 0.77 M, total 17.56 GMACs, the "17.6 GFLOPs" of fvcore. A bottleneck adapter of rank r adds
2 L D r per insertion (0.0024 G at r = 8); merged hosts (RepAdapter, LoRA after merging) add nothing.
"""

from __future__ import annotations

from collections.abc import Sequence


def embed_macs(image_size: int, patch: int, width: int, channels: int = 3) -> int:
    if image_size % patch:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
    return (image_size // patch) ** 2 * patch * patch * channels * width


def block_macs(tokens: int, width: int, mlp_ratio: float = 4.0, adapter_macs: int = 0) -> int:
    """One transformer block on `tokens` tokens, plus `adapter_macs` for the host's unmerged adapters."""
    d2 = tokens * width * width
    return int(3 * d2 + 2 * tokens * tokens * width + d2 + 2 * mlp_ratio * d2) + int(adapter_macs)


def adapter_macs(tokens: int, width: int, rank: int, insertions: int = 1) -> int:
    """Unmerged bottleneck adapters (down D->r, up r->D) per block."""
    return 2 * tokens * width * rank * insertions


def stage_macs(exits: Sequence[int], image_size: int, patch: int, width: int, mlp_ratio: float = 4.0,
               num_prefix: int = 1, channels: int = 3, adapter: int = 0) -> list[int]:
    """Backbone MACs of each stage (the embedding counted in stage 1); `exits` are 1-based block numbers."""
    tokens = (image_size // patch) ** 2 + num_prefix
    per_block = block_macs(tokens, width, mlp_ratio, adapter)
    out, prev = [], 0
    for i, end in enumerate(exits):
        out.append((end - prev) * per_block + (embed_macs(image_size, patch, width, channels) if i == 0 else 0))
        prev = end
    return out


def vit_macs(depth: int, image_size: int, patch: int, width: int, num_classes: int, mlp_ratio: float = 4.0,
             num_prefix: int = 1, channels: int = 3) -> int:
    """A whole single-head ViT."""
    return sum(stage_macs([depth], image_size, patch, width, mlp_ratio, num_prefix, channels)) + width * num_classes
