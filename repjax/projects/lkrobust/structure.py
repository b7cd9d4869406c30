"""Structure analyses (spec §3.4): kernel attention distance, feature-map variance per block, lesion.

Kernel attention distance (the study's analogue of ViT mean attention distance). For a k x k depthwise kernel
w of one channel, with d(i, j) the Euclidean distance of tap (i, j) to the centre and R = (k - 1) / 2:
  unnormalised (the study's code)   D = sum_ij |w_ij| d_ij / (R sqrt 2)
  normalised (variant)              D_n = D / sum_ij |w_ij|   (in [0, 1]: 0 = all weight at the centre,
                                                               1 = all weight in the corners)
computed on the un-merged large-kernel weights (before BN fusion, without the parallel small kernel):
  lk_convnext dense / RepLKNet      `.../lk/kernel` [k, k, 1, C]
  SLaK stripes                      `lk_h` (k x s) + `lk_w` (s x k) zero-padded to k x k and summed
  PeLK peripheral                   `theta` [k', k', 1, g] expanded by the stage's sharing grid to k x k
(deploy-form models hold merged kernels only and are refused).

Blocks. A model exposes its blocks by module name: `stages_<s>_<i>` (lk_convnext, RepLKNet), `stage<s>_block<i>`
(ResNet-CIFAR, stage 1-based), `blocks_<i>` / `encoderblock_<i>` (ViT: one stage); each block maps x to a tensor of
x's shape (a residual unit). Block outputs are read, and blocks replaced by the identity, with Flax method
interception, so no model code changes.
- Feature-map variance (Park & Kim 2022): per block output, the batch-mean feature map, its spatial variance
  per channel, averaged over channels, then over `batches` random batches of `batch` images (the study: 10 x
  128 from the first 1280 val images); token maps [B, N, C] use the N tokens (`drop_cls` drops the first).
- Lesion: top-1 with n random blocks of one stage (default stage index 2, the study's stage 3) replaced by the
  identity, averaged over `draws` (10) random draws per n. For RepLKNet a unit is the RepLK block + ConvFFN
  pair (`unit_size` 2, detected by class name).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from repjax import data
from repjax.evals import EVALUATORS
from repjax.plot import new_figure, save_figure
from repjax.projects.lkrobust import inputs
from repjax.projects.lkrobust.attacks import plot_curves

# (pattern, offset subtracted from the stage number); one group = a single-stage model
BLOCK_PATTERNS = ((re.compile(r"stages_(\d+)_(\d+)"), 0), (re.compile(r"stage(\d+)_block(\d+)"), 1),
                  (re.compile(r"(?:blocks|encoderblock)_(\d+)"), None))


def block_id(name: str | None) -> tuple[int, int] | None:
    """(stage, index) of a block module name, both 0-based; None for other modules."""
    for pattern, offset in BLOCK_PATTERNS:
        m = pattern.fullmatch(name or "")
        if m:
            return (0, int(m.group(1))) if offset is None else (int(m.group(1)) - offset, int(m.group(2)))
    return None


# ------------------------------------------------------------------------------ kernel attention distance

def distance_weights(k: int) -> np.ndarray:
    """d(i, j) / (R sqrt 2) for a k x k kernel (R = (k - 1) / 2; zeros for k = 1)."""
    r = (k - 1) / 2
    if r == 0:
        return np.zeros((1, 1))
    yy, xx = np.mgrid[0:k, 0:k] - r
    return np.sqrt(yy**2 + xx**2) / (r * np.sqrt(2))


def attention_distance(kernel: np.ndarray, normalized: bool = False) -> np.ndarray:
    """Per channel distance of a depthwise kernel [k, k, 1, C] (or [k, k, C])."""
    w = np.abs(np.asarray(kernel, np.float64)).reshape(kernel.shape[0], kernel.shape[1], -1)
    if w.shape[0] != w.shape[1] or w.shape[0] % 2 == 0:
        raise ValueError(f"attention distance needs an odd square kernel, got {kernel.shape}")
    d = np.einsum("ijc,ij->c", w, distance_weights(w.shape[0]))
    return d / np.maximum(w.sum((0, 1)), 1e-30) if normalized else d


def _pad_to(kernel: np.ndarray, k: int) -> np.ndarray:
    ph, pw = (k - kernel.shape[0]) // 2, (k - kernel.shape[1]) // 2
    return np.pad(kernel, ((ph, k - kernel.shape[0] - ph), (pw, k - kernel.shape[1] - pw), (0, 0), (0, 0)))


def large_kernels(model: nn.Module, params: Any) -> dict[str, np.ndarray]:
    """{block path: un-merged large kernel [k, k, 1, C]} of every block (see the module docstring)."""
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}
    out: dict[str, np.ndarray] = {}
    for path, v in flat.items():
        parts = path.split("/")
        block = next((p for p in parts if block_id(p) is not None), None)
        if block is None or v.ndim != 4:
            continue
        prefix = path.rsplit("/", 2)[0] if parts[-1] == "kernel" else path.rsplit("/", 1)[0]
        if parts[-1] == "kernel" and parts[-2] == "lk":
            out[prefix] = v
        elif parts[-1] == "kernel" and parts[-2] == "lk_h":
            h, w = v, flat[f"{prefix}/lk_w/kernel"]
            k = max(h.shape[0], h.shape[1])
            out[prefix] = _pad_to(h, k) + _pad_to(w, k)
        elif parts[-1] == "theta":
            from repjax.nn import dwconv
            from repjax.projects.pelk import peripheral as pk

            stage = block_id(block)[0]
            kw = model.mixer_kw(stage)
            grid = pk.sharing_grid(kw["kernel_size"], kw["r_c"], kw["m"], kw["merge_degenerate"])
            out[prefix] = np.asarray(dwconv.expand_piecewise(jnp.asarray(v), grid))
        elif parts[-2] == "reparam":
            raise ValueError(f"{path}: a deploy-form (merged) kernel; kernel attention needs the training form")
    if not out:
        raise ValueError(f"{type(model).__name__} has no large depthwise kernels in blocks "
                         "(expected .../lk/kernel, lk_h/lk_w or theta under stages_<s>_<i>)")
    return out


def plot_sorted(curves: dict[str, np.ndarray], path: str | Path, title: str, ylabel: str) -> Path:
    """One curve per block: its per-channel values sorted ascending against the channel fraction."""
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    cmap = __import__("matplotlib").colormaps["viridis"]
    for i, (name, v) in enumerate(curves.items()):
        s = np.sort(v)
        ax.plot(np.linspace(0, 1, len(s)), s, color=cmap(i / max(1, len(curves) - 1)), lw=1,
                label=name if len(curves) <= 12 else None)
    ax.set_xlabel("channel (sorted, fraction)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(curves) <= 12:
        ax.legend(fontsize=6)
    return save_figure(fig, path)


@EVALUATORS.register("kernel_attention")
def kernel_attention(model, variables, config, mesh, *, save: str | None = None) -> dict[str, Any]:
    """`distance/<block>` (unnormalised, the study's) and `distance_norm/<block>` (normalised), means over
    channels, plus the overall means; `save` writes `<save>.png` and `<save>_norm.png` (sorted per-channel
    curves, one per block) and `<save>.npz` (every channel)."""
    kernels = large_kernels(model, variables["params"])
    raw = {p: attention_distance(k) for p, k in kernels.items()}
    norm = {p: attention_distance(k, normalized=True) for p, k in kernels.items()}
    out: dict[str, Any] = {"distance": float(np.mean([v.mean() for v in raw.values()])),
                           "distance_norm": float(np.mean([v.mean() for v in norm.values()]))}
    for p in kernels:
        out[f"distance/{p}"] = float(raw[p].mean())
        out[f"distance_norm/{p}"] = float(norm[p].mean())
    if save:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        np.savez(f"{save}.npz", **{f"raw:{p}": v for p, v in raw.items()}, **{f"norm:{p}": v for p, v in norm.items()})
        plot_sorted(raw, f"{save}.png", f"{config.model.name}: kernel attention distance", "distance (unnormalised)")
        plot_sorted(norm, f"{save}_norm.png", f"{config.model.name}: kernel attention distance",
                    "distance (normalised)")
    return out


# ------------------------------------------------------------------------------------ blocks: variance, lesion

def feature_variances(model: nn.Module, variables: Any, x: jax.Array, drop_cls: bool = False
                      ) -> tuple[list[str], jax.Array]:
    """(block names in call order, [n_blocks] variance of each block's batch-mean feature map)."""
    names: list[str] = []
    stats: list[jax.Array] = []

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and block_id(context.module.name) is not None:
            f = out.astype(jnp.float32)
            f = f[:, 1:] if (drop_cls and f.ndim == 3) else f
            mean = jnp.mean(f, axis=0).reshape(-1, f.shape[-1])  # batch-mean map, spatial positions x C
            stats.append(jnp.mean(jnp.var(mean, axis=0)))
            names.append(context.module.name)
        return out

    with nn.intercept_methods(intercept):
        model.apply(variables, x, train=False)
    return names, jnp.stack(stats)


def lesioned_logits(model: nn.Module, variables: Any, x: jax.Array, drop: jax.Array,
                    blocks: Sequence[str]) -> jax.Array:
    """Logits with block `blocks[i]` replaced by the identity where `drop[i]` (traced: one compile)."""
    index = {b: i for i, b in enumerate(blocks)}

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        i = index.get(context.module.name) if context.method_name == "__call__" else None
        if i is None:
            return out
        return jnp.where(drop[i], args[0].astype(out.dtype), out)

    with nn.intercept_methods(intercept):
        return model.apply(variables, x, train=False).astype(jnp.float32)


def feature_variances_names(model: nn.Module, variables: Any, x: jax.Array) -> list[str]:
    """The model's block names in call order (traced abstractly, nothing computed)."""
    names: list[str] = []

    def fn(v, z):
        n, s = feature_variances(model, v, z)
        names.extend(n)
        return s

    jax.eval_shape(fn, variables, x)
    return names


def shape_preserving_blocks(model: nn.Module, variables: Any, x: jax.Array) -> list[str]:
    """Names, in call order, of the blocks whose output has their input's shape (traced abstractly): the ones
    the identity can replace. A ResNet stage's first block (stride 2, more channels) is not among them."""
    keep: list[str] = []

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        name = context.module.name
        if context.method_name == "__call__" and block_id(name) is not None and name not in keep and \
                getattr(args[0], "shape", None) == getattr(out, "shape", ()):
            keep.append(name)
        return out

    def fn(v, z):
        with nn.intercept_methods(intercept):
            return model.apply(v, z, train=False)

    jax.eval_shape(fn, variables, x)
    return keep


@EVALUATORS.register("feature_variance")
def feature_variance(model, variables, config, mesh, *, batches: int = 10, batch: int = 128, pool: int = 1280,
                     drop_cls: bool = False, seed: int = 0, source: str | None = None, split: str | None = None,
                     save: str | None = None) -> dict[str, Any]:
    """`variance/<block>` averaged over `batches` random batches of `batch` images drawn from the first
    `pool` images of the split; `save` writes `<save>.png` (variance against block depth)."""
    src = data.get_source(source or config.data.source, split or config.data.eval_split)
    ev = inputs.Evaluated(model, variables, config, mesh)
    pool = min(pool, len(src))
    images, _ = inputs.load(src, range(pool), ev.geometry)
    x_all = inputs.to_unit(images) * ev.scale + ev.shift
    rng = np.random.default_rng(seed)
    step = jax.jit(lambda v, z: feature_variances(model, v, z, drop_cls)[1])
    names = feature_variances_names(model, variables, jnp.asarray(x_all[:1]))
    total = np.zeros(len(names))
    for _ in range(batches):
        idx = rng.choice(pool, min(batch, pool), replace=False)
        total += np.asarray(step(variables, jnp.asarray(x_all[idx])))
    var = total / batches
    out: dict[str, Any] = {f"variance/{n}": float(v) for n, v in zip(names, var)}
    if save:
        plot_curves({"variance": (list(range(len(names))), list(var))}, f"{save}.png", xlabel="block",
                    ylabel="feature-map variance", title=f"{config.model.name}: feature-map variance")
    return out


@EVALUATORS.register("lesion")
def lesion(model, variables, config, mesh, *, stage: int = 2, counts: Sequence[int] | None = None,
           draws: int = 10, unit_size: int | None = None, num_images: int | None = 1000, seed: int = 0,
           source: str | None = None, split: str | None = None, batch_size: int | None = None,
           save: str | None = None) -> dict[str, Any]:
    """`top1/<n>`: mean top-1 over `draws` random sets of n units of `stage` replaced by the identity, for n
    in `counts` (default 0..all); `save` writes `<save>.png` (top-1 against n). Only blocks that keep their
    input's shape are units (a ResNet stage's downsampling first block stays, as in Veit et al. 2016)."""
    src = data.get_source(source or config.data.source, split or config.data.eval_split)
    ev = inputs.Evaluated(model, variables, config, mesh, batch_size=batch_size)
    images, labels = inputs.load(src, inputs.subset(len(src), num_images), ev.geometry)
    x01 = inputs.to_unit(images)
    x1 = jnp.asarray(x01[:1] * ev.scale + ev.shift)
    blocks = shape_preserving_blocks(model, variables, x1)
    in_stage = [b for b in blocks if block_id(b)[0] == stage]
    if not in_stage:
        stages = sorted({block_id(b)[0] for b in blocks})
        raise ValueError(f"lesion: {type(model).__name__} has no shape-preserving blocks in stage {stage} "
                         f"(stages with some: {stages})")
    size = unit_size or (2 if type(model).__name__ == "RepLKNet" else 1)
    units = [in_stage[i:i + size] for i in range(0, len(in_stage), size)]
    counts = list(range(len(units) + 1)) if counts is None else list(counts)
    if max(counts) > len(units):
        raise ValueError(f"lesion: {max(counts)} units asked, stage {stage} has {len(units)}")
    s, b = jnp.asarray(ev.scale), jnp.asarray(ev.shift)

    def predict(x, drop):
        return jnp.argmax(lesioned_logits(model, variables, x * s + b, drop[0], blocks), -1)

    fn = jax.jit(predict)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"units": len(units), "blocks_per_unit": size, "stage": stage}
    for n in counts:
        accs = []
        for _ in range(draws if 0 < n < len(units) else 1):
            drop = np.zeros(len(blocks), bool)
            for u in rng.choice(len(units), n, replace=False):
                drop[[blocks.index(name) for name in units[u]]] = True
            pred = inputs.run_batched(fn, [x01, np.broadcast_to(drop, (len(x01), len(blocks)))], ev.batch_size,
                                      ev.mesh)
            accs.append(float(np.mean(pred == labels)))
        out[f"top1/{n}"] = float(np.mean(accs))
    if save:
        plot_curves({"lesion": (counts, [100 * out[f"top1/{n}"] for n in counts])}, f"{save}.png",
                    xlabel=f"units removed from stage {stage}", title=f"{config.model.name}: lesion")
    return out
