"""The streamed (batch-decoded) training path of libml/data/pipeline.py: the Extend shards and sets too
large to cache. Shuffled serialized records are batched, parsed in one call and decoded per
batch (unrolled up to UNROLL_MAX_BATCH, a while loop above)."""
import numpy as np
import pytest

from libml.data import pipeline as data_lib
from libml.data.pipeline import load_ssl
from tests.fixtures_data import test_options
from tests.fixtures_data import make_ssl_dataset, toy_images, write_set
from tests.test_data import take, views_of


@pytest.fixture
def sharded(tmp_path):
    """A toy set plus 3 extension shards whose labels 100..129 identify their 30 images."""
    toy = make_ssl_dataset(tmp_path, nunlabeled=20, nvalid=4, size=12)
    images, labels = toy_images(30, 3, size=12, seed=9, labels=100 + np.arange(30))
    shards = [write_set(str(tmp_path / f"shard{i}.tfrecord"), images[i::3], labels[i::3])
              for i in range(3)]
    return toy, shards, images


def unlabeled_batches(toy, shards, batch, steps, **kwargs):
    data = load_ssl(toy.name, toy.root, seed=7, unlabeled_files=shards, cache=False,
                    options=test_options(), **kwargs)
    assert not data.is_cached("unlabeled")
    return take(data.train_unlabeled(batch), steps)


@pytest.mark.parametrize("unroll_max", [data_lib.UNROLL_MAX_BATCH, 2])   # unrolled, while loop
def test_streamed_views_are_augmentations_of_their_record(sharded, monkeypatch, unroll_max):
    toy, shards, images = sharded
    monkeypatch.setattr(data_lib, "UNROLL_MAX_BATCH", unroll_max)
    batches = unlabeled_batches(toy, shards, batch=5, steps=12)    # 60 draws: 2 passes
    seen = np.concatenate([b["label"] for b in batches])
    # The shuffle buffer spans many passes, so draws are close to uniform with replacement.
    assert set(seen) <= set(range(100, 130)) and len(set(seen)) >= 20
    assert set((seen - 100) % 3) == {0, 1, 2}      # every shard contributes
    for batch in batches:
        assert batch["image"].shape == (5, 2, 12, 12, 3)
        for views, label in zip(batch["image"], batch["label"]):
            candidates = views_of(images[label - 100])
            assert all(view.tobytes() in candidates for view in views)


def test_unrolled_and_loop_decoders_give_identical_streams(sharded, monkeypatch):
    toy, shards, _ = sharded
    unrolled = unlabeled_batches(toy, shards, batch=4, steps=5)
    monkeypatch.setattr(data_lib, "UNROLL_MAX_BATCH", 1)
    looped = unlabeled_batches(toy, shards, batch=4, steps=5)
    for a, b in zip(unrolled, looped):
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["image"], b["image"])


def test_streamed_grayscale_single_file(tmp_path):
    toy = make_ssl_dataset(tmp_path, nunlabeled=30, nvalid=5, channels=1, flip=False,
                           unlabeled_labels=np.arange(30))
    data = load_ssl(toy.name, toy.root, cache=False, options=test_options())
    labeled, unlabeled = take(data.train_labeled(6), 1)[0], take(data.train_unlabeled(5), 10)
    assert labeled["image"].shape == (6, 8, 8, 1)
    seen = np.concatenate([b["label"] for b in unlabeled])
    assert set(seen) <= set(range(5, 30)) and len(set(seen)) >= 15   # validation excluded
    for views, label in zip(unlabeled[0]["image"], unlabeled[0]["label"]):
        candidates = views_of(toy.unlabeled[0][label])
        assert all(view.tobytes() in candidates and not candidates[view.tobytes()] for view in views)
