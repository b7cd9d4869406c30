"""Deterministic, resumable, process-count-independent batches: `train_batches` and `eval_batches`.

Training reads the source as an endless stream of epochs, each in its own order: grain's index stream
`MapDataset.range(n).shuffle(seed)` maps stream position q to an example, reshuffling every epoch (epoch q // n
is shuffled with seed + epoch by a stateless index permutation, so no epoch order is ever materialised, cached or
locked); global step s holds stream positions [s*B, (s+1)*B), so a batch may straddle two epochs and no example
is dropped. Every example's augmentation draws from its own generator seeded by
(seed, epoch, position in epoch), and mixup/cutmix from one seeded by (seed, step). Hence the global batch at
step s is a pure function of (seed, s): process p of P computes rows [p*B/P, (p+1)*B/P) of the same batch,
and resuming is just starting at another step (`start_step`, or `set_state(get_state())`).

Because each batch is a pure function of its step, prefetching needs no shared state: grain's
`MapDataset.range(start, stop).map(make_batch).to_iter_dataset(ReadOptions(num_threads=...))` computes the
next batches on host threads, in order. Whole batches (not single examples) are the unit of work so that
sources held in memory as one array (`as_arrays()`) are gathered with one indexing call and augmented with
the ops' vectorised forms (`augment.Preprocess.batch`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np

from repjax.data import augment, mixup
from repjax.data.base import DataError

Batch = dict[str, np.ndarray]
STREAM_END = 2**62  # "forever" for the step range of training


class BatchIterator(Iterator[Batch]):
    """Iterates batches `make(step)` for steps start, start+1, ... with threaded prefetch."""

    def __init__(self, make: Callable[[int], Batch], start: int, stop: int, *, num_threads: int,
                 prefetch: int, meta: dict[str, Any]):
        self._make, self._stop, self._meta = make, stop, meta
        self._threads, self._prefetch = num_threads, prefetch
        self._open(start)

    def _open(self, start: int) -> None:
        self._step = start
        ds = grain.MapDataset.range(start, max(start, self._stop)).map(self._make)
        options = grain.ReadOptions(num_threads=self._threads, prefetch_buffer_size=self._prefetch)
        self._it = iter(ds.to_iter_dataset(options))

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        try:
            batch = next(self._it)
        except DataError as e:  # raised on a prefetch thread: keep the message, drop the thread-pool traceback
            raise DataError(str(e)) from None
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-able position: the step of the next batch plus the settings it depends on."""
        return {"step": self._step, **self._meta}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a `get_state()` result (the settings must match)."""
        changed = {k: (state.get(k), v) for k, v in self._meta.items() if state.get(k, v) != v}
        if changed:
            raise ValueError(f"Data state does not match this pipeline (saved, now): {changed}")
        self._open(int(state["step"]))


class _Examples:
    """Fetches and preprocesses examples by index, batched when the source is one in-memory array."""

    def __init__(self, source: Any, pp: str):
        self.source = source
        self.pp = augment.build(pp)
        arrays = source.as_arrays() if hasattr(source, "as_arrays") else None
        self.arrays = arrays

    def __call__(self, indices: np.ndarray, rngs: list[np.random.Generator]) -> tuple[np.ndarray, np.ndarray]:
        if self.arrays is not None:
            images, labels = self.arrays[0][indices], self.arrays[1][indices]
        else:
            examples = [self.source[int(i)] for i in indices]
            images = [np.asarray(e["image"]) for e in examples]
            labels = np.array([e["label"] for e in examples])
        out = self.pp.batch(images, rngs)
        return out.astype(np.float32, copy=False), labels.astype(np.int32)


def example_rng(*parts: int) -> np.random.Generator:
    """A generator seeded by a tuple of integers (packed into one int: half the cost of a seed list)."""
    key = len(parts)
    for part in parts:
        key = (key << 64) | (int(part) & (2**64 - 1))
    return np.random.default_rng(key)


def _local_rows(global_batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    per = global_batch_size // process_count
    return np.arange(process_index * per, (process_index + 1) * per)


def train_batches(source: Any, *, global_batch_size: int, seed: int, pp: str, process_index: int = 0,
                  process_count: int = 1, start_step: int = 0, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                  num_classes: int | None = None, num_threads: int = 2, prefetch: int = 4) -> BatchIterator:
    """Endless per-process training batches `{'image': float32 [B/P,H,W,C], 'label': int32 [B/P]}`
    (labels float32 [B/P, num_classes] with mixup/cutmix), starting at `start_step`."""
    n = len(source)
    if n == 0:
        raise ValueError("train_batches on an empty source")
    rows = _local_rows(global_batch_size, process_index, process_count)
    mixing = mixup_alpha > 0 or cutmix_alpha > 0
    num_classes = num_classes or source.num_classes
    examples = _Examples(source, pp)
    # grain's shuffle takes a 32-bit seed; derive one from the (any-size) run seed.
    order = grain.MapDataset.range(n).shuffle(seed=int(example_rng(seed, 0).integers(2**32)))

    def load(step: int, global_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = step * global_batch_size + global_rows
        indices = np.fromiter((order[int(i)] for i in q), np.int64, len(q))
        rngs = [example_rng(seed, 1, i // n, i % n) for i in q]
        return examples(indices, rngs)

    def make(step: int) -> Batch:
        if not mixing:
            images, labels = load(step, rows)
            return {"image": images, "label": labels}
        partners = global_batch_size - 1 - rows
        needed, where = np.unique(np.concatenate([rows, partners]), return_inverse=True)
        images, labels = load(step, needed)
        soft = mixup.one_hot(labels, num_classes)
        k = len(rows)
        mix = mixup.sample(example_rng(seed, 2, step), images.shape[1], images.shape[2],
                           mixup_alpha, cutmix_alpha)
        mixed, soft = mixup.apply(mix, images[where[:k]], soft[where[:k]], images[where[k:]], soft[where[k:]])
        return {"image": mixed, "label": soft}

    meta = {"seed": seed, "global_batch_size": global_batch_size, "num_examples": n}
    return BatchIterator(make, start_step, STREAM_END, num_threads=num_threads, prefetch=prefetch, meta=meta)


def eval_batches(source: Any, *, global_batch_size: int, pp: str, process_index: int = 0, process_count: int = 1,
                 num_threads: int = 2, prefetch: int = 4) -> BatchIterator:
    """Per-process batches `{'image', 'label', 'mask'}` covering every example once, in order; the last global
    batch is padded (with copies of example 0) and its padding has mask 0."""
    n = len(source)
    rows = _local_rows(global_batch_size, process_index, process_count)
    examples = _Examples(source, pp)

    def make(step: int) -> Batch:
        q = step * global_batch_size + rows
        valid = q < n
        indices = np.where(valid, q, 0)
        images, labels = examples(indices, [example_rng(3, i) for i in indices])
        return {"image": images, "label": np.where(valid, labels, 0).astype(np.int32),
                "mask": valid.astype(np.float32)}

    steps = math.ceil(n / global_batch_size)
    meta = {"global_batch_size": global_batch_size, "num_examples": n}
    return BatchIterator(make, 0, steps, num_threads=num_threads, prefetch=prefetch, meta=meta)
