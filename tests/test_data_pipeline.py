"""train_batches / eval_batches: determinism, process-count independence, resumption, exact eval coverage."""

import itertools
import json

import numpy as np
import pytest

from repjax import data
from repjax.data import pipeline

PP = "pad_crop(2)|flip_lr|normalize(0.5, 0.25)"


@pytest.fixture(scope="module")
def source():
    """26 synthetic 6x6x3 examples in memory, labelled by index so rows identify their example."""
    synth = data.get_source("synthetic:6x6x3,26,5", "train")
    images = np.stack([synth[i]["image"] for i in range(len(synth))])
    return data.ArraySource(images, np.arange(26) % 5, synth.class_names)


def _take(it, k):
    return [next(it) for _ in range(k)]


def _train(src, **kw):
    args = dict(global_batch_size=8, seed=3, pp=PP, num_threads=1)
    return pipeline.train_batches(src, **{**args, **kw})


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_shapes_and_types(source):
    batch = next(_train(source))
    assert batch["image"].shape == (8, 6, 6, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    mixed = next(_train(source, mixup_alpha=0.2, num_classes=5))
    assert mixed["label"].shape == (8, 5) and mixed["label"].dtype == np.float32
    np.testing.assert_allclose(mixed["label"].sum(1), 1, rtol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        _train(source, process_count=3)


@pytest.mark.parametrize("mix", [{}, {"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0, "mixup_alpha": 0.2}])
def test_global_batch_independent_of_process_count(source, mix):
    whole = _take(_train(source, **mix), 6)  # 48 positions: crosses epoch boundaries at 26
    halves = [_take(_train(source, process_index=p, process_count=2, **mix), 6) for p in (0, 1)]
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves)]
    _assert_same(whole, joined)
    quarters = [_take(_train(source, process_index=p, process_count=4, **mix), 2) for p in range(4)]
    _assert_same(whole[:2], [{k: np.concatenate([q[s][k] for q in quarters]) for k in whole[0]} for s in (0, 1)])


def test_in_memory_and_per_example_sources_agree(source):
    class PerExample:  # the same data without as_arrays(): goes through source[i] one by one
        num_classes, class_names = source.num_classes, source.class_names

        def __len__(self):
            return len(source)

        def __getitem__(self, i):
            return source[i]

    _assert_same(_take(_train(source), 4), _take(_train(PerExample()), 4))


def test_resume_from_start_step_and_state(source):
    it = _train(source, num_threads=2)
    first = _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    assert state["step"] == 5
    rest = _take(it, 3)
    _assert_same(rest, _take(_train(source, start_step=5), 3))
    fresh = _train(source)
    fresh.set_state(state)
    _assert_same(rest, _take(fresh, 3))
    _assert_same(first[2:], _take(_train(source, start_step=2), 3))
    with pytest.raises(ValueError, match="seed"):
        _train(source, seed=4).set_state(state)


def test_epochs_cover_every_example_in_new_orders(source):
    src = data.ArraySource(source.images[:24], np.arange(24), [str(i) for i in range(24)])
    batches = _take(_train(src), 6)  # two epochs of 24
    labels = np.concatenate([b["label"] for b in batches])
    assert sorted(labels[:24]) == list(range(24)) and sorted(labels[24:]) == list(range(24))
    assert not np.array_equal(labels[:24], labels[24:])
    other = np.concatenate([b["label"] for b in _take(_train(src, seed=4), 3)])
    assert not np.array_equal(labels[:24], other)


@pytest.mark.parametrize("seed", [3, -1, 2**40])
def test_epoch_orders_are_grains_index_stream(seed):
    """Stream position q holds `grain.MapDataset.range(n).shuffle(s)[q]` (s derived from any-size seeds):
    grain's stateless per-epoch shuffle, not an order built, cached and locked here."""
    import grain

    src = data.ArraySource(np.zeros((10, 2, 2, 1), np.uint8), np.arange(10), [str(i) for i in range(10)])
    labels = np.concatenate([b["label"] for b in _take(_train(src, seed=seed, pp="normalize(0, 1)"), 5)])
    shuffle_seed = int(pipeline.example_rng(seed, 0).integers(2**32))
    order = grain.MapDataset.range(10).shuffle(seed=shuffle_seed)
    np.testing.assert_array_equal(labels, [order[q] for q in range(40)])
    assert sorted(labels[10:20]) == list(range(10)) and not np.array_equal(labels[:10], labels[10:20])


def test_augmentation_depends_on_seed_and_epoch(source):
    a = next(_train(source, seed=0))
    b = next(_train(source, seed=0))
    c = next(_train(source, seed=1))
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once(source, process_count):
    per_process = [list(pipeline.eval_batches(source, global_batch_size=8, pp="normalize(0.5, 0.25)",
                                              process_index=p, process_count=process_count))
                   for p in range(process_count)]
    assert all(len(b) == 4 for b in per_process)  # ceil(26 / 8)
    joined = [{k: np.concatenate([p[s][k] for p in per_process]) for k in per_process[0][s]} for s in range(4)]
    mask = np.concatenate([b["mask"] for b in joined])
    assert mask.sum() == 26 and (mask[:26] == 1).all() and (mask[26:] == 0).all()
    images = np.concatenate([b["image"] for b in joined])[:26]
    np.testing.assert_allclose(images, (source.images / 255.0 - 0.5) / 0.25, atol=1e-6)
    labels = np.concatenate([b["label"] for b in joined])
    np.testing.assert_array_equal(labels[:26], source.labels)


def test_prefetching_is_ordered(source):
    slow = list(itertools.islice(_train(source, num_threads=0), 7))
    fast = list(itertools.islice(_train(source, num_threads=3, prefetch=6), 7))
    _assert_same(slow, fast)


@pytest.mark.shared_data
def test_shared_cifar_per_example_path(shared_data):
    from repjax.data.folder import FolderSource

    src = FolderSource(shared_data / "cifar10", "test", cache=False)
    batches = _take(pipeline.train_batches(src, global_batch_size=16, seed=0,
                                           pp="pad_crop(4)|flip_lr|normalize(cifar10)"), 2)
    assert batches[0]["image"].shape == (16, 32, 32, 3)
    assert abs(float(batches[0]["image"].mean())) < 1.0 and batches[0]["image"].std() > 0.5
    ev = next(iter(pipeline.eval_batches(src, global_batch_size=20, pp="normalize(imagenet)")))
    np.testing.assert_array_equal(ev["label"], src.labels[:20])
