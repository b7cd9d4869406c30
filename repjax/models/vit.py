"""Vision Transformer (Dosovitskiy et al., ICLR'21): ViT-Ti/S/B/L with patch 4/8/16/32, staged and PETL-ready.

Layout (pre-norm, as timm and big_vision): patch embedding (a p x p conv with stride p), an optional class token,
position embeddings (learned, or fixed 2-D sin-cos), `depth` blocks
`x = x + DropPath(Attn(LN1 x)); x = x + DropPath(MLP(LN2 x))`, a final LayerNorm, pooling and a linear
classifier. Pooling (`pool`): `cls` reads the class token; `gap` averages the patch tokens, with the final norm
on every token before the mean (`gap_norm="tokens"`, big_vision) or on the pooled vector (`"pooled"`, timm's
`fc_norm`, MAE).

Stages. Blocks are submodules `blocks_0 ... blocks_{depth-1}` and the forward is split into methods that
multi-exit models, lesion studies and staged early-exit inference call one by one
(`model.apply(variables, ..., method=...)`):

    tokens = ViT.embed(x)                   # (B, prefix + N, D): class token (if any) + patch tokens
    tokens = ViT.block(i, tokens)           # one block;  ViT.run_blocks(tokens, start, stop) a range
    logits = ViT.head(tokens)               # final norm, pooling, classifier;  ViT.features: pre-logits

`skip_blocks` removes blocks from `__call__` (lesion study). Between blocks the token count is always
prefix + N: VPT-deep's prompts live inside a block.

Any input size. A learned position embedding is stored for the grid `image_size // patch_size` (plus the class
token's position when `posemb_cls`); another input size resamples the grid part (`resample`: bicubic as timm,
or bilinear as big_vision's loader) on the fly, and the importers resample it once on import. Sin-cos
embeddings (`posemb="sincos2d"`, MoCo-v3 / big_vision) are computed for the actual grid.

Parameter-efficient transfer: `petl=dict(kind=..., ...)` (see `repjax.nn.petl`) adds a host to every block;
`merge_petl` folds the linear hosts (RepAdapter, SSF, LoRA) into the plain ViT (the family's reparameterize).

Weights. `from_torch` reads timm's `VisionTransformer` state_dict (`patch_embed.proj.weight`, `blocks.0.attn.qkv.
weight`, ...) and the big_vision / AugReg `.npz` layout (`embedding/kernel`, `Transformer/encoderblock_0/
MultiHeadDotProductAttention_1/query/kernel`, ...; also big_vision's own naming and scanned stacks), detected by
keys; both strict. `infer` reads the architecture off a checkpoint. The number of heads is not stored in a timm
checkpoint: `infer` keeps the model's unless the width changes, then uses head dimension 64 (all the ViTs above).

Cost. `macs` counts multiply-accumulates of the matmuls and convolutions (what fvcore calls FLOPs): ViT-B/16 at
224 px = 17.56 G (`macs_breakdown` gives the embedding, each block and the head; `macs_to_block` the cost up to
an exit). LayerNorm, softmax, GELU and additions are not counted (XLA counts them: +1.5% at ViT-B/16 size).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from repjax.io import torch as tio
from repjax.models import Family, abstract_variables, register
from repjax.nn import petl as petl_lib
from repjax.nn.activations import gelu
from repjax.nn.layers import Dtype
from repjax.nn.petl import PetlConfig

_init = nn.initializers.truncated_normal(0.02)  # timm's default for Linear weights, position embedding, head


# ------------------------------------------------------------------ position embeddings


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> jnp.ndarray:
    """Fixed 2-D sin-cos embedding (1, h * w, width): [sin x, cos x, sin y, cos y], each width/4 frequencies
    omega_k = temperature^(-k / (width/4 - 1)) (MoCo-v3 / big_vision `posemb_sincos_2d`), row-major grid."""
    if width % 4:
        raise ValueError(f"sin-cos 2-D position embedding needs width divisible by 4, got {width}")
    y, x = np.mgrid[:h, :w]
    quarter = width // 4
    omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return jnp.asarray(pe[None], jnp.float32)


def resample_grid(pe: jnp.ndarray, old: tuple[int, int], new: tuple[int, int], method: str = "bicubic"
                  ) -> jnp.ndarray:
    """Resamples grid position embeddings (1, oh * ow, D) -> (1, nh * nw, D) by 2-D interpolation.

    Half-pixel sample centres (PyTorch `align_corners=False`, `jax.image.resize`); downsampling is
    antialiased. Bilinear upsampling equals `torch.nn.functional.interpolate(mode="bilinear")` (tested);
    bicubic uses Keys' a = -0.5 (jax) where PyTorch uses -0.75, so it differs from timm's by a little.
    """
    if method not in ("bilinear", "bicubic"):
        raise ValueError(f"position-embedding resample must be 'bilinear' or 'bicubic', got {method!r}")
    if pe.shape[1] != old[0] * old[1]:
        raise ValueError(f"position embedding has {pe.shape[1]} grid tokens, not {old[0]}x{old[1]}")
    if tuple(old) == tuple(new):
        return pe
    grid = pe.reshape(old[0], old[1], pe.shape[-1]).astype(jnp.float32)
    out = jax.image.resize(grid, (new[0], new[1], pe.shape[-1]), method=method)
    return out.reshape(1, new[0] * new[1], pe.shape[-1]).astype(pe.dtype)


def pool_tokens(tokens: jnp.ndarray, pool: str, num_prefix: int) -> jnp.ndarray:
    """(B, T, D) -> (B, D): the class token (`cls`) or the mean of the patch tokens (`gap`)."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "gap":
        return jnp.mean(tokens[:, num_prefix:], axis=1)
    raise ValueError(f"pool must be 'cls' or 'gap', got {pool!r}")


# ------------------------------------------------------------------ layers


def _dense(features: int, dtype: Dtype, name: str, kernel_init=_init) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init, name=name)


def _layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


def drop_path(x: jnp.ndarray, rate: float, train: bool, module: nn.Module) -> jnp.ndarray:
    """Stochastic depth: zeroes a sample's branch with probability `rate`, scales survivors by 1/(1 - rate)."""
    if not train or rate == 0.0:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout); LoRA on q and v, SSF after qkv/proj."""

    num_heads: int
    attn_dropout: float = 0.0
    dropout: float = 0.0
    petl: PetlConfig | None = None
    petl_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jnp.ndarray, train: bool) -> jnp.ndarray:
        b, n, d = h.shape
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
        hd = d // self.num_heads
        qkv = petl_lib.ssf(self.petl, "ssf_qkv")(_dense(3 * d, self.dtype, "qkv")(h))
        q, k, v = jnp.split(qkv, 3, axis=-1)
        if self.petl is not None and self.petl.kind == "lora":
            p = self.petl
            q = q + petl_lib.LoRA(d, p.dim, p.scale, self.petl_rate, name="lora_q")(h, train)
            v = v + petl_lib.LoRA(d, p.dim, p.scale, self.petl_rate, name="lora_v")(h, train)
        q, k, v = (t.reshape(b, n, self.num_heads, hd) for t in (q, k, v))
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(hd)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        attn = nn.Dropout(self.attn_dropout, deterministic=not train)(attn)
        out = jnp.einsum("bhqk,bkhc->bqhc", attn, v).reshape(b, n, d)
        out = petl_lib.ssf(self.petl, "ssf_proj")(_dense(d, self.dtype, "proj")(out))
        return nn.Dropout(self.dropout, deterministic=not train)(out)


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (SSF after fc1 and fc2)."""

    hidden: int
    dropout: float = 0.0
    gelu_approximate: bool = False
    petl: PetlConfig | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jnp.ndarray, train: bool) -> jnp.ndarray:
        d = h.shape[-1]
        h = petl_lib.ssf(self.petl, "ssf_fc1")(_dense(self.hidden, self.dtype, "fc1")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(h) if self.gelu_approximate else gelu(h))
        h = petl_lib.ssf(self.petl, "ssf_fc2")(_dense(d, self.dtype, "fc2")(h))
        return nn.Dropout(self.dropout, deterministic=not train)(h)


class Block(nn.Module):
    """One pre-norm transformer block, with the PETL host of `petl` (see `repjax.nn.petl` for placements).

    Takes and returns (B, num_prefix + N, D); VPT-deep inserts its prompts after the prefix tokens on entry
    and drops them on exit.
    """

    num_heads: int
    mlp_dim: int
    drop_path: float = 0.0
    dropout: float = 0.0
    attn_dropout: float = 0.0
    ln_eps: float = 1e-6
    gelu_approximate: bool = False
    num_prefix: int = 1
    patch_size: int = 16
    petl: PetlConfig | None = None
    petl_rate: float = 0.0  # this block's host bottleneck dropout
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        p, kind, d = self.petl, (self.petl.kind if self.petl else None), x.shape[-1]
        if kind == "vpt":  # VPT-deep: fresh prompts at every block (Jia et al. 2022, Eq. 5), Xavier-uniform
            bound = math.sqrt(6.0 / (3 * self.patch_size ** 2 + d))
            prompts = self.param("prompts", nn.initializers.uniform(2 * bound), (p.length, d))
            prompts = nn.Dropout(self.petl_rate, deterministic=not train)(prompts - bound).astype(x.dtype)
            prompts = jnp.broadcast_to(prompts[None], (x.shape[0], *prompts.shape))
            x = jnp.concatenate([x[:, :self.num_prefix], prompts, x[:, self.num_prefix:]], axis=1)
        h = petl_lib.ssf(p, "ssf_norm1")(_layer_norm(self.ln_eps, self.dtype, "norm1")(x))
        if kind == "repadapter":
            h = petl_lib.RepAdapter(d, p.dim, p.groups, p.scale, self.petl_rate, name="repadapter_attn")(h, train)
        h = Attention(self.num_heads, self.attn_dropout, self.dropout, p, self.petl_rate, self.dtype,
                      name="attn")(h, train)
        x = x + drop_path(h, self.drop_path, train, self)
        h = petl_lib.ssf(p, "ssf_norm2")(_layer_norm(self.ln_eps, self.dtype, "norm2")(x))
        if kind == "repadapter":
            h = petl_lib.RepAdapter(d, p.dim, p.groups, p.scale, self.petl_rate, name="repadapter_mlp")(h, train)
        y = Mlp(self.mlp_dim, self.dropout, self.gelu_approximate, p, self.dtype, name="mlp")(h, train)
        if kind == "adapter":  # Houlsby, FFN only: y + up(act(down(y))) inside the residual branch
            y = y + petl_lib.Bottleneck(d, p.dim, p.act, p.scale, self.petl_rate, name="adapter")(y, train)
        y = drop_path(y, self.drop_path, train, self)
        if kind == "adaptformer":  # parallel to the MLP, reading the block's pre-LN2 stream
            y = y + petl_lib.Bottleneck(d, p.dim, p.act, p.scale, self.petl_rate, down_init="lora",
                                        name="adaptformer")(x, train)
        x = x + y
        if kind == "vpt":
            x = jnp.concatenate([x[:, :self.num_prefix], x[:, self.num_prefix + p.length:]], axis=1)
        return x


# ------------------------------------------------------------------ the model

POOLS = ("cls", "gap")
POSEMBS = ("learn", "sincos2d")


class ViT(nn.Module):
    """Vision Transformer; float32 logits. See the module docstring for the staged methods."""

    num_classes: int = 1000  # 0: no classifier, `head` returns the pre-logits features
    image_size: int = 224  # the grid a learned position embedding is stored for (any input size runs)
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int | None = None  # default 4 * width
    pool: str = "cls"  # cls | gap
    gap_norm: str = "tokens"  # gap only: final norm on every token (big_vision) | on the pooled vector (timm)
    posemb: str = "learn"  # learn | sincos2d
    posemb_cls: bool = True  # the class token has a learned position (timm, AugReg); big_vision's has none
    resample: str = "bicubic"  # learned position embedding on another grid: bicubic (timm) | bilinear
    representation_size: int | None = None  # the original IN21k checkpoints' tanh pre-logits layer
    drop_path: float = 0.0  # stochastic depth, linear in depth from 0 to this rate (timm)
    dropout: float = 0.0  # after the embedding, attention projection, MLP layers
    attn_dropout: float = 0.0
    ln_eps: float = 1e-6
    gelu_approximate: bool = False  # exact erf GELU as timm and PyTorch; big_vision's flax default is tanh
    skip_blocks: tuple[int, ...] = ()  # lesion study: these blocks are the identity in __call__
    petl: Any = None  # dict(kind=..., ...) or PetlConfig (repjax.nn.petl); None: plain ViT
    dtype: Dtype = jnp.float32

    # ---------------------------------------------------------------- structure

    @property
    def num_prefix(self) -> int:
        """Tokens before the patch tokens: 1 (class token) with `pool='cls'`, else 0."""
        return 1 if self.pool == "cls" else 0

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size // self.patch_size, self.image_size // self.patch_size

    @property
    def petl_config(self) -> PetlConfig | None:
        return petl_lib.parse(self.petl, self.depth)

    def setup(self):
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.posemb not in POSEMBS:
            raise ValueError(f"posemb must be one of {POSEMBS}, got {self.posemb!r}")
        if self.gap_norm not in ("tokens", "pooled"):
            raise ValueError(f"gap_norm must be 'tokens' or 'pooled', got {self.gap_norm!r}")
        bad = [i for i in self.skip_blocks if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"skip_blocks {bad} outside 0..{self.depth - 1}")
        p = self.petl_config
        ssf = p is not None and p.kind == "ssf"
        d = self.width
        self.patch_embed = nn.Conv(d, (self.patch_size, self.patch_size), strides=self.patch_size, padding="VALID",
                                   dtype=self.dtype, param_dtype=jnp.float32,
                                   kernel_init=nn.initializers.lecun_normal())
        self.ssf_embed = petl_lib.SSF() if ssf else None
        if self.pool == "cls":
            self.cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
        if self.posemb == "learn":
            tokens = self.grid[0] * self.grid[1] + (self.num_prefix if self.posemb_cls else 0)
            self.pos_embed = self.param("pos_embed", _init, (1, tokens, d))
        self.embed_dropout = nn.Dropout(self.dropout)
        rates = np.linspace(0.0, self.drop_path, self.depth) if self.depth > 1 else [0.0] * self.depth
        self.blocks = [
            Block(self.num_heads, self.mlp_dim or 4 * d, float(rates[i]), self.dropout, self.attn_dropout,
                  self.ln_eps, self.gelu_approximate, self.num_prefix, self.patch_size, p,
                  p.rate(i) if p is not None else 0.0, self.dtype)
            for i in range(self.depth)]
        self.norm = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, param_dtype=jnp.float32)
        self.ssf_norm = petl_lib.SSF() if ssf else None
        if self.representation_size:
            self.pre_logits = nn.Dense(self.representation_size, dtype=self.dtype, param_dtype=jnp.float32,
                                       kernel_init=_init)
        if self.num_classes:
            self.classifier = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                                       kernel_init=_init)

    # ---------------------------------------------------------------- stages

    def embed(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Images (B, H, W, C) -> tokens (B, num_prefix + N, D) with position embeddings."""
        if x.ndim != 4:
            raise ValueError(f"ViT expects images (B, H, W, C), got shape {x.shape}")
        x = self.patch_embed(x.astype(self.dtype))
        if self.ssf_embed is not None:
            x = self.ssf_embed(x)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)
        prefix_pe = None
        if self.posemb == "learn":
            pe = self.pos_embed
            if self.posemb_cls and self.num_prefix:
                prefix_pe, pe = pe[:, :self.num_prefix], pe[:, self.num_prefix:]
            pe = resample_grid(pe, self.grid, (gh, gw), self.resample)
        else:
            pe = posemb_sincos_2d(gh, gw, d)
        x = x + pe.astype(x.dtype)
        if self.pool == "cls":
            cls = self.cls if prefix_pe is None else self.cls + prefix_pe
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
        return self.embed_dropout(x, deterministic=not train)

    def block(self, i: int, tokens: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Block `i` (0-based) on tokens (B, num_prefix + N, D)."""
        return self.blocks[i](tokens, train)

    def run_blocks(self, tokens: jnp.ndarray, start: int = 0, stop: int | None = None, train: bool = False,
                   skip: Sequence[int] = ()) -> jnp.ndarray:
        """Blocks start .. stop - 1 (all by default), leaving out the indices in `skip`."""
        stop = self.depth if stop is None else stop
        if not 0 <= start <= stop <= self.depth:
            raise ValueError(f"block range {start}..{stop} outside 0..{self.depth}")
        for i in range(start, stop):
            if i not in skip:
                tokens = self.blocks[i](tokens, train)
        return tokens

    def features(self, tokens: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Tokens -> pre-logits (B, D) (or representation_size): final norm and pooling."""
        if self.pool == "gap" and self.gap_norm == "pooled":
            x = self.norm(pool_tokens(tokens, "gap", self.num_prefix))
            x = x if self.ssf_norm is None else self.ssf_norm(x)
        else:
            x = self.norm(tokens)
            x = pool_tokens(x if self.ssf_norm is None else self.ssf_norm(x), self.pool, self.num_prefix)
        if self.representation_size:
            x = jnp.tanh(self.pre_logits(x))
        return x

    def head(self, tokens: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Tokens -> float32 logits (the features when num_classes == 0)."""
        x = self.features(tokens, train)
        return (self.classifier(x) if self.num_classes else x).astype(jnp.float32)

    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        tokens = self.run_blocks(self.embed(x, train), train=train, skip=self.skip_blocks)
        return self.head(tokens, train)


# ------------------------------------------------------------------ variants

SIZES = {  # name: (width, depth, heads); MLP 4 x width; head dimension 64
    "ti": (192, 12, 3),
    "s": (384, 12, 6),
    "b": (768, 12, 12),
    "l": (1024, 24, 16),
}
PATCHES = (4, 8, 16, 32)


# ------------------------------------------------------------------ cost


@dataclasses.dataclass(frozen=True)
class MacsBreakdown:
    """Multiply-accumulates of one image: the embedding, each block (with its PETL host), the head."""

    embed: int
    blocks: tuple[int, ...]
    head: int

    @property
    def total(self) -> int:
        return self.embed + sum(self.blocks) + self.head

    def to_block(self, k: int) -> int:
        """Cost up to the output of block k (1-based; k = 0 is the embedding alone), head excluded."""
        if not 0 <= k <= len(self.blocks):
            raise ValueError(f"block {k} outside 0..{len(self.blocks)}")
        return self.embed + sum(self.blocks[:k])


def macs_breakdown(model: ViT, height: int, width: int | None = None, in_channels: int = 3) -> MacsBreakdown:
    """Analytic MACs (see the module docstring): per block with T tokens, width D and MLP width M,
    qkv T*D*3D + scores T*T*D + attention-weighted values T*T*D + proj T*D*D + MLP 2*T*D*M, plus the host:
    adapter/AdaptFormer T*2*D*r, LoRA 2*T*2*D*r, RepAdapter (unmerged) 2*T*(D*r + D*r/g); VPT-deep adds
    `length` tokens to T; BitFit and SSF add no MACs (SSF is elementwise)."""
    width = height if width is None else width
    p, d = model.patch_size, model.width
    n = (height // p) * (width // p)
    m = model.mlp_dim or 4 * d
    cfg = model.petl_config
    kind = cfg.kind if cfg else None
    t = n + model.num_prefix + (cfg.length if kind == "vpt" else 0)
    block = t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * m
    if kind in ("adapter", "adaptformer"):
        block += t * 2 * d * cfg.dim
    elif kind == "lora":
        block += 2 * t * 2 * d * cfg.dim
    elif kind == "repadapter":
        block += 2 * t * (d * cfg.dim + d * cfg.dim // cfg.groups)
    rep = model.representation_size
    head = (d * rep + rep * model.num_classes) if rep else d * model.num_classes
    blocks = tuple(0 if i in model.skip_blocks else block for i in range(model.depth))
    return MacsBreakdown(embed=n * p * p * in_channels * d, blocks=blocks, head=head)


def macs(model: ViT, height: int, width: int | None = None) -> int:
    """Total analytic MACs of one `height x width` image (the family contract's `macs`)."""
    return macs_breakdown(model, height, width).total


def macs_to_block(model: ViT, height: int, k: int, width: int | None = None) -> int:
    """MACs from the image to the output of block k (1-based): the backbone cost of an exit after block k."""
    return macs_breakdown(model, height, width).to_block(k)


# ------------------------------------------------------------------ PETL merge (the family's reparameterize)

_SSF_TARGETS = {"ssf_embed": "patch_embed", "ssf_norm": "norm", "ssf_norm1": "norm1", "ssf_norm2": "norm2",
                "ssf_qkv": "qkv", "ssf_proj": "proj", "ssf_fc1": "fc1", "ssf_fc2": "fc2"}


def deploy(model: ViT) -> ViT:
    """The plain ViT that `merge_petl` produces variables for (unchanged for hosts that do not merge)."""
    cfg = model.petl_config
    return model.clone(petl=None) if cfg is not None and cfg.kind in petl_lib.MERGEABLE else model


def merge_petl(variables: Mapping[str, Any], model: ViT) -> dict[str, Any]:
    """Folds a linear PETL host into the frozen layers: variables of `deploy(model)` (pure, exact in fp32).

    RepAdapter before a linear layer (W, c): RA(z) W + c = z (I + s A B) W + (c + s (a B + b) W), with B the
    block-diagonal matrix of the grouped up-projection (`repjax.nn.petl.grouped_up_matrix`); into qkv and fc1.
    LoRA: W_q += s A_q B_q and W_v += s A_v B_v in the fused qkv kernel. SSF after a linear/LayerNorm
    (W, c): (z W + c) g + h = z (W g) + (c g + h). BitFit adds no parameters. Adapter, AdaptFormer and VPT
    are not linear in the stream and raise.
    """
    cfg = model.petl_config
    if cfg is None or cfg.kind == "bitfit":
        return {k: v for k, v in variables.items()}
    if cfg.kind not in petl_lib.MERGEABLE:
        raise ValueError(f"petl kind {cfg.kind!r} cannot be merged (not linear); mergeable: {petl_lib.MERGEABLE}")
    flat = dict(traverse_util.flatten_dict(dict(variables["params"])))
    out: dict[tuple[str, ...], Any] = {}
    merged: set[tuple[str, ...]] = set()

    def take(path: tuple[str, ...]) -> jnp.ndarray:
        if path not in flat:
            raise KeyError(f"merge_petl: parameter {'/'.join(path)} not found")
        merged.add(path)
        return jnp.asarray(flat[path], jnp.float32)

    d = model.width
    for i in range(model.depth):
        blk = f"blocks_{i}"
        if cfg.kind == "lora":
            kernel = take((blk, "attn", "qkv", "kernel"))
            dq = cfg.scale * take((blk, "attn", "lora_q", "a")) @ take((blk, "attn", "lora_q", "b"))
            dv = cfg.scale * take((blk, "attn", "lora_v", "a")) @ take((blk, "attn", "lora_v", "b"))
            out[(blk, "attn", "qkv", "kernel")] = kernel.at[:, :d].add(dq).at[:, 2 * d:].add(dv)
        elif cfg.kind == "repadapter":
            for ra, layer in (("repadapter_attn", ("attn", "qkv")), ("repadapter_mlp", ("mlp", "fc1"))):
                a, a_bias = take((blk, ra, "down", "kernel")), take((blk, ra, "down", "bias"))
                b = petl_lib.grouped_up_matrix(take((blk, ra, "up", "kernel")), cfg.groups)
                b_bias = take((blk, ra, "up", "bias"))
                w, c = take((blk, *layer, "kernel")), take((blk, *layer, "bias"))
                out[(blk, *layer, "kernel")] = w + cfg.scale * (a @ (b @ w))
                out[(blk, *layer, "bias")] = c + cfg.scale * ((a_bias @ b + b_bias) @ w)
    if cfg.kind == "ssf":
        for path in [p for p in flat if len(p) >= 2 and p[-2] in _SSF_TARGETS]:
            if path[-1] != "scale":
                continue
            prefix, target = path[:-2], _SSF_TARGETS[path[-2]]
            g, h = take(path), take((*prefix, path[-2], "shift"))
            weight = "scale" if target.startswith("norm") else "kernel"
            out[(*prefix, target, weight)] = take((*prefix, target, weight)) * g
            out[(*prefix, target, "bias")] = take((*prefix, target, "bias")) * g + h
    host = re.compile(petl_lib.host_regex(cfg.kind))
    for path, value in flat.items():
        if path not in merged and not host.search("/".join(path)):
            out[path] = value
    leftover = [("/".join(p)) for p in flat if p not in merged and host.search("/".join(p))]
    if leftover:
        raise ValueError(f"merge_petl: host parameters not merged: {leftover[:5]}")
    result = {k: v for k, v in variables.items() if k != "params"}
    result["params"] = traverse_util.unflatten_dict(out)
    return result


def attach_backbone(backbone: Mapping[str, Any], model: ViT, rng: jax.Array | int = 0,
                    fresh: str = r"(^|/)classifier/") -> dict[str, Any]:
    """Variables of `model` (a ViT with a PETL host) from a plain ViT's `backbone` variables.

    The host (and parameters matching `fresh`: the classifier, for a new task) are initialised, every other
    parameter is taken from `backbone`, strictly: a backbone parameter the model lacks, or a model parameter
    neither in the backbone nor fresh nor the host's, is an error.
    """
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    size = model.image_size
    init = model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False)
    new = traverse_util.flatten_dict(dict(init["params"]), sep="/")
    old = traverse_util.flatten_dict(dict(backbone["params"]), sep="/")
    cfg = model.petl_config
    host = re.compile(petl_lib.host_regex(cfg.kind)) if cfg is not None and cfg.kind != "bitfit" else None
    keep = re.compile(fresh) if fresh else None
    extra = [k for k in old if k not in new and not (keep and keep.search(k))]
    missing = [k for k in new if k not in old and not (keep and keep.search(k)) and not (host and host.search(k))]
    shape = [f"{k} {np.shape(old[k])} vs {np.shape(new[k])}" for k in old
             if k in new and np.shape(old[k]) != np.shape(new[k]) and not (keep and keep.search(k))]
    if extra or missing or shape:
        raise ValueError(f"attach_backbone: backbone does not fit the model: not in model {extra[:5]}, "
                         f"missing from backbone {missing[:5]}, shape mismatches {shape[:5]}")
    for k in new:
        if k in old and not (keep and keep.search(k)):
            new[k] = jnp.asarray(old[k])
    return {"params": traverse_util.unflatten_dict(new, sep="/")}


# ------------------------------------------------------------------ checkpoints: timm and big_vision / AugReg


def timm_rules(model: ViT) -> list[tio.Rule]:
    """Key map between timm's `VisionTransformer` state_dict and this module's parameters."""
    rules = tio.conv("patch_embed.proj", ("patch_embed",), bias=True)
    if model.pool == "cls":
        rules.append(tio.Rule("cls_token", ("params", "cls")))
    if model.posemb == "learn":
        rules.append(tio.Rule("pos_embed", ("params", "pos_embed")))

    def ln(key: str, path: tuple[str, ...]) -> list[tio.Rule]:
        return [tio.Rule(f"{key}.weight", ("params", *path, "scale")),
                tio.Rule(f"{key}.bias", ("params", *path, "bias"))]

    for i in range(model.depth):
        t, f = f"blocks.{i}", f"blocks_{i}"
        rules += ln(f"{t}.norm1", (f, "norm1")) + ln(f"{t}.norm2", (f, "norm2"))
        rules += tio.linear(f"{t}.attn.qkv", (f, "attn", "qkv")) + tio.linear(f"{t}.attn.proj", (f, "attn", "proj"))
        rules += tio.linear(f"{t}.mlp.fc1", (f, "mlp", "fc1")) + tio.linear(f"{t}.mlp.fc2", (f, "mlp", "fc2"))
    rules += ln("fc_norm" if model.pool == "gap" and model.gap_norm == "pooled" else "norm", ("norm",))
    if model.representation_size:
        rules += tio.linear("pre_logits.fc", ("pre_logits",))
    if model.num_classes:
        rules += tio.linear("head", ("classifier",))
    return rules


_BV_PREFIXES = ("opt/target/", "params/")


def is_big_vision(state_dict: Mapping[str, Any]) -> bool:
    """True for the big_vision / AugReg `.npz` layout (`embedding/kernel`, `Transformer/...`)."""
    return any(k.endswith("embedding/kernel") or k.startswith("Transformer/") or "/Transformer/" in k
               for k in state_dict)


def big_vision_to_timm(state_dict: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    """Renames and re-lays a big_vision / AugReg ViT checkpoint as a timm state_dict; also returns num_heads.

    AugReg (vision_transformer repo) names the block's parts `LayerNorm_0`, `MultiHeadDotProductAttention_1`,
    `LayerNorm_2`, `MlpBlock_3` and stores the position embedding at `Transformer/posembed_input/pos_embedding`
    (class token included); big_vision names them `LayerNorm_0`, `MultiHeadDotProductAttention_0`,
    `LayerNorm_1`, `MlpBlock_0` and stores `pos_embedding` (patches only). Scanned stacks
    (`Transformer/encoderblock/...` with a leading depth axis) are split. Attention kernels (D, H, D/H) are
    flattened into timm's fused qkv (3D, D). Every key must be used (strict).
    """
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    for prefix in _BV_PREFIXES:
        if f"{prefix}embedding/kernel" in sd:
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)} | {
                k: v for k, v in sd.items() if not k.startswith(prefix)}
    scanned = [k for k in sd if k.startswith("Transformer/encoderblock/")]
    for k in scanned:
        stack = sd.pop(k)
        for i in range(stack.shape[0]):
            sd[k.replace("encoderblock/", f"encoderblock_{i}/", 1)] = stack[i]
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in sd:
            raise tio.WeightImportError(f"big_vision ViT checkpoint: missing key {key!r}")
        used.add(key)
        return sd[key]

    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))),
                    default=-1)
    if depth == 0:
        raise tio.WeightImportError("big_vision ViT checkpoint: no Transformer/encoderblock_<i> keys")
    augreg = any(k.startswith("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/") for k in sd)
    mha, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if augreg else (
        "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    out = {"patch_embed.proj.weight": np.transpose(take("embedding/kernel"), (3, 2, 0, 1)),
           "patch_embed.proj.bias": take("embedding/bias")}
    if "cls" in sd:
        out["cls_token"] = take("cls")
    for key in ("Transformer/posembed_input/pos_embedding", "pos_embedding"):
        if key in sd:
            out["pos_embed"] = take(key)
    heads = 0
    for i in range(depth):
        b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}"
        for src, dst in (("LayerNorm_0", "norm1"), (ln2, "norm2")):
            out[f"{t}.{dst}.weight"], out[f"{t}.{dst}.bias"] = take(f"{b}{src}/scale"), take(f"{b}{src}/bias")
        q = take(f"{b}{mha}/query/kernel")
        heads, d = q.shape[1], q.shape[0]
        kernels = [q] + [take(f"{b}{mha}/{n}/kernel") for n in ("key", "value")]
        out[f"{t}.attn.qkv.weight"] = np.concatenate([k.reshape(d, -1).T for k in kernels], axis=0)
        out[f"{t}.attn.qkv.bias"] = np.concatenate([take(f"{b}{mha}/{n}/bias").reshape(-1)
                                                    for n in ("query", "key", "value")])
        out[f"{t}.attn.proj.weight"] = take(f"{b}{mha}/out/kernel").reshape(-1, d).T
        out[f"{t}.attn.proj.bias"] = take(f"{b}{mha}/out/bias")
        for r in (0, 1):
            out[f"{t}.mlp.fc{r + 1}.weight"] = take(f"{b}{mlp}/Dense_{r}/kernel").T
            out[f"{t}.mlp.fc{r + 1}.bias"] = take(f"{b}{mlp}/Dense_{r}/bias")
    out["norm.weight"], out["norm.bias"] = take("Transformer/encoder_norm/scale"), take("Transformer/encoder_norm/bias")
    for src, dst in (("pre_logits", "pre_logits.fc"), ("head", "head")):
        if f"{src}/kernel" in sd:
            out[f"{dst}.weight"], out[f"{dst}.bias"] = take(f"{src}/kernel").T, take(f"{src}/bias")
    unused = sorted(set(sd) - used)
    if unused:
        raise tio.WeightImportError(f"big_vision ViT checkpoint: {len(unused)} keys not understood "
                                    f"(a MAP head, another model?): {unused[:10]}")
    return out, heads


def _posemb_split(pe: np.ndarray) -> tuple[int, int]:
    """(prefix tokens, grid side) of a square-grid position embedding (1, T, D)."""
    for prefix in (0, 1):
        side = math.isqrt(pe.shape[1] - prefix)
        if side * side == pe.shape[1] - prefix:
            return prefix, side
    raise tio.WeightImportError(f"pos_embed {pe.shape}: not a square grid (with or without a class token)")


def _timm_layout(state_dict: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    if is_big_vision(state_dict):
        return big_vision_to_timm(state_dict)
    return {k: np.asarray(v) for k, v in state_dict.items()}, 0


def infer(state_dict: Mapping[str, Any], model: ViT | None = None) -> ViT:
    """`model` (default: a plain ViT) reconfigured to the architecture a timm or big_vision checkpoint holds."""
    sd, heads = _timm_layout(state_dict)
    if "patch_embed.proj.weight" not in sd:
        raise tio.WeightImportError("not a ViT checkpoint: no patch_embed.proj.weight / embedding/kernel")
    model = ViT() if model is None else model
    w = sd["patch_embed.proj.weight"]
    width, patch = int(w.shape[0]), int(w.shape[2])
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    cfg: dict[str, Any] = dict(width=width, patch_size=patch, depth=depth,
                               mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]),
                               num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
                               pool="cls" if "cls_token" in sd else "gap",
                               gap_norm="pooled" if "fc_norm.weight" in sd else "tokens",
                               representation_size=(int(sd["pre_logits.fc.weight"].shape[0])
                                                    if "pre_logits.fc.weight" in sd else None))
    cfg["num_heads"] = heads or (model.num_heads if width == model.width else max(1, width // 64))
    if "pos_embed" in sd:
        prefix, side = _posemb_split(sd["pos_embed"])
        cfg.update(posemb="learn", posemb_cls=bool(prefix), image_size=side * patch)
    else:
        cfg["posemb"] = "sincos2d"
    if cfg["mlp_dim"] == 4 * width:
        cfg["mlp_dim"] = None
    return model.clone(**cfg)


def from_torch(state_dict: Mapping[str, Any], model: ViT) -> dict[str, Any]:
    """A timm state_dict or big_vision / AugReg `.npz` dict -> `{'params'}` of `model` (a plain ViT), strictly.

    A learned position embedding on another grid is resampled to `model.image_size // model.patch_size`
    (`model.resample`). Use `infer` first to read the architecture off the checkpoint.
    """
    if model.petl_config is not None:
        raise ValueError("from_torch imports a plain ViT: import into model.clone(petl=None), then attach_backbone")
    sd, _ = _timm_layout(state_dict)
    if "pos_embed" in sd and model.posemb == "learn":
        prefix, side = _posemb_split(sd["pos_embed"])
        want = model.num_prefix if model.posemb_cls else 0
        if prefix != want:
            raise tio.WeightImportError(f"pos_embed has {prefix} class-token positions, the model expects {want} "
                                        f"(posemb_cls={model.posemb_cls}, pool={model.pool!r})")
        pe = sd["pos_embed"]
        grid = np.asarray(resample_grid(jnp.asarray(pe[:, prefix:]), (side, side), model.grid, model.resample))
        sd["pos_embed"] = np.concatenate([pe[:, :prefix], grid], axis=1)
    target = abstract_variables(model, model.image_size)
    return tio.from_torch_state_dict(sd, timm_rules(model), target)


def to_torch(variables: Mapping[str, Any], model: ViT) -> dict[str, np.ndarray]:
    """`{'params'}` of a plain ViT -> timm's state_dict (numpy arrays by key)."""
    if model.petl_config is not None:
        raise ValueError("to_torch exports a plain ViT: merge_petl first (RepAdapter, SSF, LoRA, BitFit)")
    return tio.to_torch_state_dict(variables, timm_rules(model))


def infer_at_size(state_dict: Mapping[str, Any], model: ViT) -> ViT:
    """`infer`, keeping the requested model's input size: a checkpoint of another grid is loaded with its
    position embeddings resampled (what `repjax.io.load_model` and `config.init.path` use)."""
    return infer(state_dict, model).clone(image_size=model.image_size)


FAMILY = Family("vit", ViT, tiny="vit_test", macs=macs, from_torch=from_torch, to_torch=to_torch,
                reparameterize=merge_petl, deploy=deploy, infer=infer_at_size)


def _variant(**arch):
    def make(**kw) -> ViT:
        return ViT(**{**arch, **kw})

    return make


for _size, (_width, _depth, _heads) in SIZES.items():
    for _patch in PATCHES:
        _name = f"vit_{_size}{_patch}"
        register(_name, FAMILY, input_size=224)(
            _variant(patch_size=_patch, width=_width, depth=_depth, num_heads=_heads))

# A tiny ViT for tests (16 px, 4 blocks; dynadapter's exit tests override depth=12).
register("vit_test", FAMILY, input_size=16)(
    _variant(image_size=16, patch_size=4, width=32, depth=4, num_heads=2, num_classes=10))
# The 12-block backbone pre-trained here (configs/vit_imagenette.py): ViT-Ti width at 64 px, patch 8
# (64 patch tokens + class token); exits after blocks 3/6/9/12 possible.
register("vit_imagenette", FAMILY, input_size=64)(
    _variant(image_size=64, patch_size=8, width=192, depth=12, num_heads=3, num_classes=10))
