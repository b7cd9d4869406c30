"""Early-exit inference: confidence, per-sample exits, expected FLOPs, budgeted thresholds, and a real staged path.

Policy (spec §1.2, [R]): at exit k a sample stops when its confidence is >= threshold_k; the last exit always
answers. ASSUMPTIONS (switches): the confidence is the max softmax probability (`measure="max_softmax"`), or
`"entropy"`, scored as 1 - H(p)/log C so that it also lies in [0, 1] and higher means more confident; one
threshold per exit, calibrated on a validation split for a target budget by the MSDNet procedure (the
maintainer's recipe, gaohuang/MSDNet #4): exit proportions q_k ~ a^k (geometric), a found by bisection so the
expected cost meets the budget, each threshold the score quantile that lets q_k of the samples out at exit k.
`calibrate_shared` (one threshold for all exits) is the alternative.

FLOPs (spec §1.3): a sample leaving at exit k paid the backbone up to the end of stage k and *every* head up to
and including k (`cum_macs[k] = backbone_macs[k] + sum_{j<=k} head_macs[j]`). Counts are MACs, which the
papers call "FLOPs" (fvcore convention); XLA counts a multiply-add as 2 FLOPs.

Accuracy and FLOPs follow the simulated protocol (one pass returns all exits, exits chosen afterwards;
`simulate`). Wall-clock speed-up comes from `StagedRunner`: each stage jitted once per bucket size; between
stages the surviving samples are compacted on the host and padded to the smallest bucket that holds them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MEASURES = ("max_softmax", "entropy")


def confidence(logits: Any, measure: str = "max_softmax") -> np.ndarray:
    """Confidence in [0, 1] of each row of `logits` [..., C] (float64 numpy)."""
    if measure not in MEASURES:
        raise ValueError(f"confidence measure must be one of {MEASURES}, got {measure!r}")
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    if measure == "max_softmax":
        return p.max(-1)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300)), 0.0), -1)
    return 1.0 - entropy / math.log(z.shape[-1])


def exit_index(scores: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Per sample, the first exit k with scores[k] >= thresholds[k]; the last exit when none. scores: [S, N]."""
    scores = np.asarray(scores)
    num_exits = scores.shape[0]
    if len(thresholds) not in (num_exits, num_exits - 1):
        raise ValueError(f"{len(thresholds)} thresholds for {num_exits} exits (give S or S-1)")
    out = np.full(scores.shape[1], num_exits - 1, np.int64)
    done = np.zeros(scores.shape[1], bool)
    for k in range(num_exits - 1):
        leave = ~done & (scores[k] >= thresholds[k])
        out[leave] = k
        done |= leave
    return out


def cumulative_macs(stage_macs: Sequence[float], head_macs: Sequence[float]) -> np.ndarray:
    """Cost of leaving at each exit: backbone up to the end of stage k plus every head up to k."""
    if len(stage_macs) != len(head_macs):
        raise ValueError(f"{len(stage_macs)} stage costs but {len(head_macs)} head costs")
    return np.cumsum(np.asarray(stage_macs, np.float64)) + np.cumsum(np.asarray(head_macs, np.float64))


def simulate(logits: Sequence[Any], labels: Any, thresholds: Sequence[float], cum_macs: Sequence[float],
             measure: str = "max_softmax") -> dict[str, Any]:
    """Accuracy, expected MACs and exit histogram of the policy on precomputed exit logits."""
    scores = np.stack([confidence(z, measure) for z in logits])
    idx = exit_index(scores, thresholds)
    preds = np.stack([np.argmax(np.asarray(z), -1) for z in logits])
    chosen = preds[idx, np.arange(len(idx))]
    cum = np.asarray(cum_macs, np.float64)
    return {
        "top1": float(np.mean(chosen == np.asarray(labels))),
        "macs": float(np.mean(cum[idx])),
        "exit_fraction": np.bincount(idx, minlength=len(logits)) / len(idx),
        "exit_index": idx,
    }


def _quantile_thresholds(scores: np.ndarray, proportions: np.ndarray) -> np.ndarray:
    """Thresholds letting `proportions[k]` of all samples out at exit k (of those still running)."""
    num_exits, n = scores.shape
    thresholds = np.full(num_exits, np.inf)
    remaining = np.ones(n, bool)
    for k in range(num_exits - 1):
        take = round(float(proportions[k]) * n)
        if take <= 0 or not remaining.any():
            continue
        s = np.sort(scores[k][remaining])[::-1]
        take = min(take, len(s))
        thresholds[k] = s[take - 1]
        remaining &= ~(scores[k] >= thresholds[k])
    return thresholds


def calibrate(scores: np.ndarray, cum_macs: Sequence[float], budget: float, iters: int = 60) -> np.ndarray:
    """MSDNet-style per-exit thresholds for an expected cost <= `budget` (MACs) on validation `scores` [S, N].

    Proportions q_k ~ a^k (k = 0..S-1), normalised; the expected cost grows with a, so a is bisected in log
    space. Budgets below exit 1's cost give thresholds 0 (everyone leaves first); above the full cost, +inf."""
    scores = np.asarray(scores, np.float64)
    cum = np.asarray(cum_macs, np.float64)
    num_exits = scores.shape[0]
    if budget <= cum[0]:
        return np.concatenate([np.full(num_exits - 1, -np.inf), [np.inf]])
    if budget >= cum[-1]:
        return np.full(num_exits, np.inf)

    def at(log_a: float) -> tuple[np.ndarray, float]:
        q = np.exp(log_a * np.arange(num_exits))
        t = _quantile_thresholds(scores, q / q.sum())
        return t, float(np.mean(cum[exit_index(scores, t)]))

    lo, hi = -20.0, 20.0
    best = np.concatenate([np.full(num_exits - 1, -np.inf), [np.inf]])
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        t, cost = at(mid)
        if cost <= budget:
            best, lo = t, mid
        else:
            hi = mid
    return best


def calibrate_shared(scores: np.ndarray, cum_macs: Sequence[float], budget: float) -> np.ndarray:
    """One threshold for all exits: the highest candidate score whose expected cost is <= `budget` (the cost
    rises with the threshold, so the sorted candidates are bisected)."""
    scores = np.asarray(scores, np.float64)
    cum = np.asarray(cum_macs, np.float64)
    num_exits = scores.shape[0]
    if budget >= cum[-1]:
        return np.full(num_exits, np.inf)
    candidates = np.unique(scores[:-1])

    def cost(t: float) -> float:
        return float(np.mean(cum[exit_index(scores, [t] * num_exits)]))

    lo, hi, best = 0, len(candidates) - 1, -np.inf
    while lo <= hi:
        mid = (lo + hi) // 2
        if cost(candidates[mid]) <= budget:
            best, lo = float(candidates[mid]), mid + 1
        else:
            hi = mid - 1
    return np.full(num_exits, best)


def curve(val_logits: Sequence[Any], test_logits: Sequence[Any], test_labels: Any, cum_macs: Sequence[float],
          budgets: Sequence[float], measure: str = "max_softmax") -> list[dict[str, float]]:
    """Accuracy-FLOPs curve: thresholds calibrated on validation logits per budget, then applied to test."""
    val_scores = np.stack([confidence(z, measure) for z in val_logits])
    points = []
    for budget in budgets:
        t = calibrate(val_scores, cum_macs, budget)
        r = simulate(test_logits, test_labels, t, cum_macs, measure)
        points.append({"budget_macs": float(budget), "macs": r["macs"], "top1": r["top1"],
                       "thresholds": [float(x) for x in t],
                       "exit_fraction": [float(x) for x in r["exit_fraction"]]})
    return points


def default_buckets(batch_size: int, smallest: int = 8) -> tuple[int, ...]:
    """Powers of two from `smallest` up to `batch_size` (and `batch_size` itself)."""
    sizes, b = [], smallest
    while b < batch_size:
        sizes.append(b)
        b *= 2
    return (*sizes, batch_size)


class StagedRunner:
    """Real early exit: jitted stages, survivors compacted on the host into padded buckets between stages.

    stage_fns[k](inputs) -> (tokens, logits) must be jittable; inputs of stage 0 are images. Each (stage,
    bucket) pair compiles once (`warmup`)."""

    def __init__(self, stage_fns: Sequence[Callable], thresholds: Sequence[float], measure: str = "max_softmax",
                 buckets: Sequence[int] = (8, 16, 32, 64)):
        self.stage_fns = [jax.jit(f) for f in stage_fns]
        self.thresholds = [float(t) for t in thresholds]
        self.measure = measure
        self.buckets = tuple(sorted(buckets))

    def _bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"{n} samples exceed the largest bucket {self.buckets[-1]}")

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predictions [B], exit index [B]) of a batch of at most `max(buckets)` images."""
        n = len(images)
        preds = np.zeros(n, np.int64)
        exits = np.zeros(n, np.int64)
        alive = np.arange(n)
        x: Any = images
        for k, fn in enumerate(self.stage_fns):
            size = self._bucket(len(alive))
            pad = size - len(alive)
            if pad:
                x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
            tokens, logits = fn(x)
            logits = np.asarray(logits)[: len(alive)]
            if k == len(self.stage_fns) - 1:
                leave = np.ones(len(alive), bool)
            else:
                leave = confidence(logits, self.measure) >= self.thresholds[k]
            preds[alive[leave]] = np.argmax(logits[leave], -1)
            exits[alive[leave]] = k
            keep = np.flatnonzero(~leave)
            alive = alive[keep]
            if not len(alive):
                break
            x = tokens[jnp.asarray(keep)]
        return preds, exits

    def warmup(self, example: np.ndarray) -> None:
        """Compiles every (stage, bucket) pair on zeros shaped like `example` (one image)."""
        for b in self.buckets:
            x: Any = jnp.zeros((b, *example.shape), jnp.float32)
            for fn in self.stage_fns:
                x, _ = fn(x)
            jax.block_until_ready(x)


def timed(fns: dict[str, Callable[[], Any]], repeats: int = 3) -> dict[str, float]:
    """Best wall-clock seconds of each function over `repeats` rounds; the functions alternate within a round,
    so that a shared machine's load hits them alike (results blocked on)."""
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - start)
    return best
