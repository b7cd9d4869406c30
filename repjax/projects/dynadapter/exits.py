"""Multi-level exits with balanced heads on a staged backbone (Dyn-Adapter, spec §1.1).

Exits sit after blocks T, 2T, ..., N (`interval` T must divide the depth N; S = N/T exits; the reviewers'
question whether T must divide N suggests it does [R]). ASSUMPTION: T = 3 for a 12-block ViT (exits after
blocks 3/6/9/12); T = 4 is the other candidate.

Balanced heads [R]: MLP heads at early exits, lightweight heads at later ones (shallow features get a more
capable head). Their sizes are unknown; the parameter hint (+75% over Adapter ~ +0.12 M at ViT-B) says they
are small. ASSUMPTIONS (all switches): the first `mlp_exits` = S // 2 exits get `LN -> Dense(hidden) -> GELU
-> Dense(C)` with `head_hidden` = 64, the later early exits `LN -> Dense(C)`; every head has its own LayerNorm
(`head_norm`) and reads the CLS token (`pool="cls"`, or `"gap"`: mean of the tokens after the first
`num_prefix` ones); the last exit is the backbone's own head (`last_exit="backbone"`; `"own"` gives it a
light head like the others).

Between stages (training only): `detach` stops the gradient of later exits into earlier stages (ablation,
default off, spec §2); `gate_keep_prob` < 1 puts the random gradient gate there (the in-model reading of the
backward sparsity, `sparsity.gradient_gate`). Forward sparsity lives in the host: `stage_petl` gives every
block of stage `s` the bottleneck dropout `rates[s]` (`repjax.nn.petl`'s per-block `dropout`).

The staged backbone protocol (what `backbone` must offer; `repjax.models.vit.ViT` does):
    embed(images, train) -> tokens [B, L, D]
    block(index, tokens, train) -> tokens           index 0..depth-1
    head(tokens) -> logits                          final norm, pooling and classifier
    depth: int
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from repjax.nn.activations import gelu
from repjax.projects.dynadapter.sparsity import gradient_gate, stage_rates

POOLS = ("cls", "gap")
HEAD_KINDS = ("mlp", "linear")


def exit_blocks(num_blocks: int, interval: int) -> tuple[int, ...]:
    """1-based block numbers after which the exits sit: T, 2T, ..., N."""
    if interval < 1 or num_blocks % interval:
        raise ValueError(f"exit interval T={interval} must be >= 1 and divide the depth N={num_blocks}")
    return tuple(range(interval, num_blocks + 1, interval))


def head_kinds(num_exits: int, mlp_exits: int | None = None, last_exit: str = "backbone") -> tuple[str, ...]:
    """Balanced rule: MLP heads for the first `mlp_exits` (default S // 2) exits, linear heads after;
    the last exit is `backbone` (the backbone's own head) or `linear`."""
    mlp = num_exits // 2 if mlp_exits is None else mlp_exits
    if not 0 <= mlp <= num_exits - 1:
        raise ValueError(f"mlp_exits={mlp} must be in [0, {num_exits - 1}] (the last exit is never an MLP)")
    if last_exit not in ("backbone", "own"):
        raise ValueError(f"last_exit must be 'backbone' or 'own', got {last_exit!r}")
    kinds = ["mlp" if i < mlp else "linear" for i in range(num_exits - 1)]
    return (*kinds, "backbone" if last_exit == "backbone" else "linear")


def stage_petl(petl: dict[str, Any], depth: int, interval: int, rates: Sequence[float] | None = None
               ) -> dict[str, Any]:
    """The host spec `petl` with forward sparsity: every block of stage s gets bottleneck dropout `rates[s]`
    (default `sparsity.stage_rates(S)`, an ASSUMPTION: 0.3 at stage 1 down to 0.1 at stage S)."""
    num_stages = len(exit_blocks(depth, interval))
    rates = stage_rates(num_stages) if rates is None else tuple(float(r) for r in rates)
    if len(rates) != num_stages:
        raise ValueError(f"stage dropout has {len(rates)} rates for {num_stages} stages")
    if petl.get("kind") in ("bitfit", "ssf"):
        raise ValueError(f"petl kind {petl.get('kind')!r} has no bottleneck dropout to make stage-dependent")
    return {**petl, "dropout": tuple(rates[b // interval] for b in range(depth))}


class ExitHead(nn.Module):
    """One early exit: optional own LayerNorm, CLS or mean pooling, then an MLP or a linear classifier."""

    num_classes: int
    kind: str = "linear"
    hidden: int = 64
    pool: str = "cls"
    norm: bool = True
    num_prefix: int = 1  # tokens before the patch tokens (CLS): skipped by "gap"

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"exit head kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        if self.pool not in POOLS:
            raise ValueError(f"exit head pool must be one of {POOLS}, got {self.pool!r}")
        x = tokens.astype(jnp.float32)
        if self.norm:
            x = nn.LayerNorm(epsilon=1e-6, name="norm")(x)
        x = x[:, 0] if self.pool == "cls" else jnp.mean(x[:, self.num_prefix:], axis=1)
        if self.kind == "mlp":
            x = gelu(nn.Dense(self.hidden, name="fc1")(x))
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="fc")(x)


def head_macs(kind: str, width: int, num_classes: int, hidden: int = 64) -> int:
    """Multiply-accumulates of one exit head on one image (LayerNorm and pooling not counted, like fvcore)."""
    if kind == "mlp":
        return width * hidden + hidden * num_classes
    return width * num_classes


class MultiExit(nn.Module):
    """A staged backbone with S = N / T exits; `__call__` returns the list of S exit logits (shallow first)."""

    backbone: nn.Module
    num_classes: int
    interval: int = 3
    mlp_exits: int | None = None
    head_hidden: int = 64
    pool: str = "cls"
    head_norm: bool = True
    num_prefix: int = 1
    last_exit: str = "backbone"
    detach: bool = False
    gate_keep_prob: float = 1.0
    gate_rescale: bool = True
    gate_granularity: str = "element"

    @property
    def exits(self) -> tuple[int, ...]:
        return exit_blocks(self.backbone.depth, self.interval)

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    @property
    def kinds(self) -> tuple[str, ...]:
        return head_kinds(self.num_exits, self.mlp_exits, self.last_exit)

    def setup(self):
        self.heads = [
            None if kind == "backbone" else
            ExitHead(self.num_classes, "mlp" if kind == "mlp" else "linear", self.head_hidden, self.pool,
                     self.head_norm, self.num_prefix, name=f"exit_{i + 1}")
            for i, kind in enumerate(self.kinds)]

    def stage(self, index: int, inputs: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Stage `index` (0-based): images (stage 0) or the previous stage's tokens -> (tokens, exit logits)."""
        if not 0 <= index < self.num_exits:
            raise ValueError(f"stage index {index} out of range for {self.num_exits} stages")
        x = self.backbone.embed(inputs, train=train) if index == 0 else inputs
        first = 0 if index == 0 else self.exits[index - 1]
        for block in range(first, self.exits[index]):
            x = self.backbone.block(block, x, train=train)
        head = self.heads[index]
        logits = self.backbone.head(x) if head is None else head(x)
        return x, logits

    def boundary(self, tokens: jax.Array, train: bool) -> jax.Array:
        """What the next stage receives: detached or gradient-gated tokens in training, the tokens otherwise."""
        if not train:
            return tokens
        if self.detach:
            return jax.lax.stop_gradient(tokens)
        if self.gate_keep_prob < 1.0:
            return gradient_gate(tokens, self.make_rng("dropout"), self.gate_keep_prob, rescale=self.gate_rescale,
                                 granularity=self.gate_granularity)
        return tokens

    def final(self, images: jax.Array) -> jax.Array:
        """The host's plain forward (eval mode): every block, the backbone's own head, no early heads."""
        x = self.backbone.embed(images, train=False)
        for block in range(self.backbone.depth):
            x = self.backbone.block(block, x, train=False)
        return self.backbone.head(x)

    def __call__(self, images: jax.Array, train: bool = False) -> list[jax.Array]:
        outputs: list[jax.Array] = []
        x: Any = images
        for index in range(self.num_exits):
            if index:
                x = self.boundary(x, train)
            x, logits = self.stage(index, x, train=train)
            outputs.append(logits)
        return outputs
