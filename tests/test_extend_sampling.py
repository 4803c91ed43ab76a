"""Extend's training stream draws every copy equally from the first batch (issue 11): 50 shard
files (one per copy, as data_prep.extend_unlabeled writes them), each record labeled with its
copy id, read through the streamed unlabeled path."""
import numpy as np
import pytest
import tensorflow as tf

from libml.data.pipeline import load_ssl
from tests.fixtures_data import make_ssl_dataset, test_options, toy_images, write_set

COPIES, PER_COPY, BATCH = 50, 120, 64
SHUFFLE = 256        # a small buffer, so that 16 open shards (the old cycle) would show


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    root = tmp_path_factory.mktemp("extend_sampling")
    toy = make_ssl_dataset(root, nunlabeled=20, nvalid=4, size=8)
    images, _ = toy_images(COPIES * PER_COPY, 3, size=8, seed=3)
    shards = [write_set(str(root / f"shard-{k:05d}-of-{COPIES:05d}.tfrecord"),
                        images[k * PER_COPY:(k + 1) * PER_COPY], np.full(PER_COPY, k))
              for k in range(COPIES)]
    return toy, shards


def stream(extended):
    toy, shards = extended
    data = load_ssl(toy.name, toy.root, seed=11, unlabeled_files=shards, cache=False,
                    shuffle_buffer=SHUFFLE, options=test_options())
    return iter(data.train_unlabeled(BATCH))


def test_every_copy_is_equally_likely_from_the_first_batch(extended):
    it = stream(extended)
    copies = np.stack([next(it)["label"].numpy() for _ in range(50)])      # 3,200 records
    first = copies[0]
    # 64 uniform draws among 50 copies show ~36 distinct ones; 16 open shards would show <= 16.
    assert len(set(first)) >= 28, sorted(set(first))
    counts = np.bincount(copies[:20].ravel(), minlength=COPIES)           # first 1,280 records
    assert counts.min() >= 10 and counts.max() <= 45, counts
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
    assert chi2 < 85.4, (chi2, counts)           # 99.9 % quantile of chi-square, 49 d.o.f.
    all_counts = np.bincount(copies.ravel(), minlength=COPIES)
    assert all_counts.min() >= 40 and all_counts.max() <= 90, all_counts   # 64 expected


def test_restored_iterator_continues_exactly_over_all_shards(extended, tmp_path):
    it = stream(extended)
    for _ in range(5):
        next(it)
    path = tf.train.Checkpoint(unlabeled=it).save(str(tmp_path / "ckpt"))
    expected = [next(it) for _ in range(4)]
    fresh = stream(extended)
    tf.train.Checkpoint(unlabeled=fresh).restore(path)
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["label"], want["label"])
        np.testing.assert_array_equal(got["image"], want["image"])
