"""White-box L-inf attacks in pixel space: FGSM (Goodfellow et al. 2015) and PGD (Madry et al. 2018).

As in the robustness study (spec §3.4, torchattacks with `set_normalization_used`): the attacked function
takes images in [0, 1] and normalises inside, so eps and the step size are in [0, 1] pixel units, and every
iterate is clipped to [0, 1]. With x the clean image, y its label, L the summed cross-entropy:
  FGSM   x' = clip_[0,1](x + eps sign(dL/dx))
  PGD    x_0 = clip_[0,1](x + U(-eps, eps)) (random start; x_0 = x without), then `steps` times
         x_{t+1} = clip_[0,1](x + clip_[-eps,eps](x_t + alpha sign(dL/dx_t) - x))
with alpha = `step_size` (absolute) or `rel_step` * eps (default 1/4, the study's alpha = eps/4, 5 steps).
These are the updates of torchattacks' FGSM/PGD and foolbox's LinfFastGradientAttack/LinfPGD; the test checks
the adversarial images against foolbox on the same weights exported to PyTorch.

Metrics: top-1 on the adversarial images, `success` = fraction misclassified after the attack (the study's
"attack success rate"), `flip` = fraction of the clean-correct images made wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from repjax import data
from repjax.evals import EVALUATORS
from repjax.plot import new_figure, save_figure
from repjax.projects.lkrobust import inputs

ATTACKS = ("fgsm", "pgd")


def _input_grad(fn: Callable, x: jax.Array, labels: jax.Array) -> jax.Array:
    def loss(z):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(fn(z), labels))

    return jax.grad(loss)(x)


def fgsm(fn: Callable, x: jax.Array, labels: jax.Array, eps: float | jax.Array) -> jax.Array:
    """One signed-gradient step of size eps from x, clipped to [0, 1]."""
    return jnp.clip(x + eps * jnp.sign(_input_grad(fn, x, labels)), 0.0, 1.0)


def pgd(fn: Callable, x: jax.Array, labels: jax.Array, eps: float | jax.Array, alpha: float | jax.Array,
        steps: int, init: jax.Array | None = None) -> jax.Array:
    """`steps` signed-gradient steps of size alpha projected onto the eps-ball around x and [0, 1];
    `init` (uniform in [-1, 1], same shape as x) gives the random start x + eps init, None starts at x."""
    adv = x if init is None else jnp.clip(x + eps * init, 0.0, 1.0)

    def step(_, a):
        a = a + alpha * jnp.sign(_input_grad(fn, a, labels))
        return jnp.clip(x + jnp.clip(a - x, -eps, eps), 0.0, 1.0)

    return jax.lax.fori_loop(0, steps, step, adv)


def uniform_init(n: int, shape: tuple[int, ...], seed: int, offset: int = 0) -> np.ndarray:
    """Random-start directions, uniform in [-1, 1], seeded per image (index offset + i)."""
    return np.stack([np.random.default_rng([seed, offset + i]).uniform(-1, 1, shape).astype(np.float32)
                     for i in range(n)])


def _attack_fn(ev: inputs.Evaluated, attack: str, steps: int, random_start: bool) -> Callable:
    """Jitted `(x, y, eps, alpha[, init]) -> adversarial predictions`, eps / alpha traced (one compile per
    attack setting, reused across eps), cached on `ev`."""
    cache = ev.__dict__.setdefault("_attacks", {})
    key = (attack, steps, random_start)
    if key not in cache:
        if attack == "fgsm":
            def run(x, y, eps, alpha):
                return jnp.argmax(ev.fn(fgsm(ev.fn, x, y, eps[0])), -1)
        else:
            def run(x, y, eps, alpha, init):
                adv = pgd(ev.fn, x, y, eps[0], alpha[0], steps, init if random_start else None)
                return jnp.argmax(ev.fn(adv), -1)
        cache[key] = jax.jit(run)
    return cache[key]


def attack_accuracy(ev: inputs.Evaluated, x01: np.ndarray, labels: np.ndarray, attack: str, eps: float, *,
                    steps: int = 5, step_size: float | None = None, rel_step: float = 0.25,
                    random_start: bool = True, seed: int = 0) -> dict[str, float]:
    """Top-1, success and flip rates of `attack` at `eps` over the images (sharded batches)."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
    alpha = step_size if step_size is not None else rel_step * eps
    labels = np.asarray(labels, np.int32)

    n = len(x01)
    arrays = [x01, labels, np.full(n, eps, np.float32), np.full(n, alpha, np.float32)]
    if attack == "pgd":
        arrays.append(uniform_init(n, x01.shape[1:], seed) if random_start else np.zeros_like(x01))
    pred = inputs.run_batched(_attack_fn(ev, attack, steps, random_start), arrays, ev.batch_size, ev.mesh)
    clean = ev.predict(x01) == labels
    wrong = pred != labels
    return {"top1": float(np.mean(~wrong)), "success": float(np.mean(wrong)),
            "flip": float(np.mean(wrong[clean])) if clean.any() else float("nan")}


def plot_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *, xlabel: str,
                ylabel: str = "top-1 (%)", title: str = "") -> Path:
    """Line plot, one line per name: {name: (x values, y values)} (shared by the sweep evaluators)."""
    fig = new_figure(5.5, 4)
    ax = fig.add_subplot()
    for name, (xs, ys) in curves.items():
        ax.plot(list(xs), list(ys), marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


@EVALUATORS.register("adversarial")
def adversarial(model, variables, config, mesh, *, attack: str = "fgsm", eps: Sequence[float] = (0.1, 0.2, 0.3, 0.4),
                steps: int = 5, step_size: float | None = None, rel_step: float = 0.25, random_start: bool = True,
                num_images: int | None = 1000, seed: int = 0, source: str | None = None, split: str | None = None,
                batch_size: int | None = None, save: str | None = None) -> dict[str, Any]:
    """`top1/<eps>`, `success/<eps>`, `flip/<eps>` of FGSM or PGD for each eps (pixel units), and clean top-1;
    the study used FGSM eps 0.1-0.4 and PGD (5 steps, alpha eps/4, random start) eps 0.002-0.008.
    `save` writes `<save>.png` (top-1 against eps)."""
    src = data.get_source(source or config.data.source, split or config.data.eval_split)
    ev = inputs.Evaluated(model, variables, config, mesh, batch_size=batch_size)
    images, labels = inputs.load(src, inputs.subset(len(src), num_images), ev.geometry)
    x01 = inputs.to_unit(images)
    out: dict[str, Any] = {"clean_top1": ev.accuracy(x01, labels), "images": len(labels)}
    for e in eps:
        m = attack_accuracy(ev, x01, labels, attack, float(e), steps=steps, step_size=step_size, rel_step=rel_step,
                            random_start=random_start, seed=seed)
        out.update({f"{k}/{e:g}": v for k, v in m.items()})
    if save:
        plot_curves({attack: ([0.0, *eps], [100 * out["clean_top1"]] + [100 * out[f"top1/{e:g}"] for e in eps])},
                    f"{save}.png", xlabel="eps (pixel units, [0, 1])", title=f"{config.model.name}: {attack}")
    return out
