"""SSL input streams (spec §3.1, §3.6): round trip, augmentation, determinism, resume, errors."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from libml.data import pipeline as data_lib
from libml.data.augment import to_float
from libml.data import datasets
from libml.data.pipeline import load_ssl
from libml.data.datasets import dataset_info
from libml.base.errors import UserError
from tests.fixtures_data import make_ssl_dataset, test_options, toy_images, write_set

NUNLABELED, NVALID = 60, 10


@pytest.fixture
def toy(tmp_path):
    # Unique unlabeled labels identify each unlabeled record in the streams.
    return make_ssl_dataset(tmp_path, nlabeled=24, nunlabeled=NUNLABELED, nvalid=NVALID, ntest=25,
                            unlabeled_labels=np.arange(NUNLABELED))


def load(toy, **kwargs):
    kwargs.setdefault("options", test_options())
    return load_ssl(toy.name, toy.root, **kwargs)


def take(ds, n):
    it = iter(ds)
    return [{k: v.numpy() for k, v in next(it).items()} for _ in range(n)]


def collect(ds):
    batches = list(ds.as_numpy_iterator())
    return (np.concatenate([b["image"] for b in batches]), np.concatenate([b["label"] for b in batches]),
            [len(b["label"]) for b in batches])


def views_of(source):
    """Every flip/translate (reflect pad 4) of one uint8 image, as float [-1,1]: {bytes: flipped}."""
    out = {}
    for flipped, image in ((False, source), (True, source[:, ::-1])):
        padded = np.pad(image, [[4, 4], [4, 4], [0, 0]], mode="reflect")
        for oy in range(9):
            for ox in range(9):
                crop = padded[oy:oy + image.shape[0], ox:ox + image.shape[1]]
                crop = crop.astype(np.float32) * np.float32(2 / 255) - np.float32(1)  # as to_float
                out.setdefault(crop.tobytes(), flipped)
    return out


# --- round trip and evaluation streams ------------------------------------------------------

@pytest.mark.parametrize("cache", [True, False])
def test_eval_streams_round_trip_in_order(toy, cache):
    data = load(toy, cache=cache)
    assert data.is_cached("test") == cache
    for stream, (images, labels), nvalid in ((data.test, toy.test, None),
                                             (data.eval_labeled, toy.labeled, None),
                                             (data.valid, toy.unlabeled, NVALID)):
        got_images, got_labels, sizes = collect(stream(7))
        images, labels = images[:nvalid], labels[:nvalid]
        np.testing.assert_array_equal(got_labels, labels)
        np.testing.assert_allclose(got_images, to_float(images).numpy(), atol=0)
        assert sizes[-1] == len(labels) % 7 or sizes[-1] == 7   # last partial batch kept
        assert sum(sizes) == len(labels)


def test_validation_beyond_the_labeled_records_is_one_line(tmp_path):
    """create_split's map says how many leading -unlabel records have labels (custom sets with
    an unlabeled folder): a larger validation size stops in one line; splits without that key
    (mismatch sets validate on a mix that includes unknown labels) are not checked."""
    labels = np.array([0, 1, 2, -1, -1] * 4)
    toy = make_ssl_dataset(tmp_path, nunlabeled=20, nvalid=10, unlabeled_labels=labels)
    load(toy)                                               # no map key: no check
    with open(toy.unlabel_path.replace("-unlabel.tfrecord", "-map.json"), "w") as f:
        json.dump({"label": [], "unlabel": list(range(20)), "unlabel_labeled_first": 3}, f)
    with pytest.raises(UserError, match=rf"{toy.name} asks for 10 validation images but only the "
                                        rf"first 3 records of .* have labels: use toy.1@\d+-3 or less, "
                                        rf"or add labeled images"):
        load(toy)


# --- training streams -----------------------------------------------------------------------

@pytest.mark.parametrize("cache", [True, False])
def test_train_streams_shapes_range_and_validation_excluded(toy, cache):
    data = load(toy, cache=cache)
    labeled, unlabeled = data.train_labeled(8), data.train_unlabeled(5)
    assert labeled.element_spec["image"].shape == (8, 8, 8, 3)
    assert unlabeled.element_spec["image"].shape == (5, 2, 8, 8, 3)
    assert unlabeled.element_spec["label"].dtype == tf.int64
    batches = take(unlabeled, 40)     # 200 draws > 3 epochs of the 50 training images
    seen = np.concatenate([b["label"] for b in batches])
    assert set(seen) <= set(range(NVALID, NUNLABELED)) and len(set(seen)) > 40
    images = np.concatenate([b["image"] for b in batches])
    assert images.min() >= -1 and images.max() <= 1
    if cache:   # default shuffle: a fresh permutation per epoch, each image once per epoch
        epoch = seen[:NUNLABELED - NVALID]
        assert sorted(epoch) == list(range(NVALID, NUNLABELED))
        assert not np.array_equal(epoch, seen[NUNLABELED - NVALID:2 * (NUNLABELED - NVALID)])


@pytest.mark.parametrize("flip", [True, False])
def test_unlabeled_views_are_independent_augmentations_of_their_image(tmp_path, flip):
    # 12 pixels wide: below 10, some flipped+shifted crops equal unflipped ones (reflection).
    toy = make_ssl_dataset(tmp_path, nunlabeled=40, nvalid=4, flip=flip, size=12,
                           unlabeled_labels=np.arange(40))
    batches = take(load(toy).train_unlabeled(6), 6)
    source = toy.unlabeled[0]
    flips, differ = [], 0
    for batch in batches:
        for views, label in zip(batch["image"], batch["label"]):
            candidates = views_of(source[label])
            for view in views:
                assert view.tobytes() in candidates, "a view is not a flip/translate of its image"
                flips.append(candidates[view.tobytes()])
            differ += not np.array_equal(views[0], views[1])
    assert differ >= 30      # of 36 pairs: the two views are drawn independently
    if flip:
        assert 0.25 < np.mean(flips) < 0.75
    else:
        assert not any(flips)


def test_labeled_stream_is_augmented_per_image(toy):
    batch = take(load(toy).train_labeled(24), 1)[0]
    for image, label in zip(batch["image"], batch["label"]):
        candidates = [views_of(x) for x, y in zip(*toy.labeled) if y == label]
        assert any(image.tobytes() in c for c in candidates)
    assert set(batch["label"]) == {0, 1, 2}


@pytest.mark.parametrize("cache", [True, False])
def test_streams_deterministic_given_seed(toy, cache):
    first = take(load(toy, seed=3, cache=cache).train_unlabeled(4), 3)
    again = take(load(toy, seed=3, cache=cache).train_unlabeled(4), 3)
    other = take(load(toy, seed=4, cache=cache).train_unlabeled(4), 3)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not all(np.array_equal(a["image"], c["image"]) for a, c in zip(first, other))


def test_released_shuffle_buffer_mode(toy):
    data = load(toy, shuffle_buffer=16, seed=2)
    a = np.concatenate([b["label"] for b in take(data.train_unlabeled(10), 10)])
    b = np.concatenate([b["label"] for b in take(load(toy, shuffle_buffer=16, seed=2).train_unlabeled(10), 10)])
    np.testing.assert_array_equal(a, b)
    assert a.min() >= NVALID


@pytest.mark.parametrize("mode", ["cached", "streamed", "sharded"])
def test_restored_iterator_continues_exactly(toy, tmp_path, mode):
    shards = None
    if mode == "sharded":
        images, labels = toy_images(30, 3, seed=9, labels=100 + np.arange(30))
        shards = [write_set(str(tmp_path / f"shard{i}.tfrecord"), images[i::3], labels[i::3])
                  for i in range(3)]
    kwargs = dict(cache=(mode == "cached"), seed=5, unlabeled_files=shards)
    data = load(toy, **kwargs)
    labeled, unlabeled = iter(data.train_labeled(4)), iter(data.train_unlabeled(3))
    for _ in range(7):
        next(labeled), next(unlabeled)
    path = tf.train.Checkpoint(labeled=labeled, unlabeled=unlabeled).save(str(tmp_path / "ckpt"))
    expected = [(next(labeled), next(unlabeled)) for _ in range(9)]

    fresh = load(toy, **kwargs)
    labeled2, unlabeled2 = iter(fresh.train_labeled(4)), iter(fresh.train_unlabeled(3))
    tf.train.Checkpoint(labeled=labeled2, unlabeled=unlabeled2).restore(path)
    for x, u in expected:
        x2, u2 = next(labeled2), next(unlabeled2)
        np.testing.assert_array_equal(x["image"], x2["image"])
        np.testing.assert_array_equal(u["image"], u2["image"])
        np.testing.assert_array_equal(u["label"], u2["label"])
    if mode == "sharded":
        assert all(u["label"].numpy().min() >= 100 for _, u in expected)   # reads the shards, not -unlabel


def test_unlabeled_files_replace_unlabel_but_not_validation(toy, tmp_path):
    images, labels = toy_images(12, 3, seed=9, labels=200 + np.arange(12))
    shard = write_set(str(tmp_path / "ext.tfrecord"), images, labels)
    data = load(toy, unlabeled_files=[shard])
    seen = np.concatenate([b["label"] for b in take(data.train_unlabeled(4), 6)])
    assert set(seen) == set(range(200, 212))
    np.testing.assert_array_equal(collect(data.valid(100))[1], np.arange(NVALID))


def test_auto_cache_threshold(toy, monkeypatch):
    assert load(toy).is_cached("unlabeled")
    monkeypatch.setattr(data_lib, "CACHE_MAX_DECODED_BYTES", 100)
    data = load(toy)
    assert not data.is_cached("unlabeled") and not data.is_cached("test")
    assert take(data.train_unlabeled(4), 1)[0]["image"].shape == (4, 2, 8, 8, 3)


# --- dataset_info ---------------------------------------------------------------------------

def test_dataset_info_registry_meta_and_inference(tmp_path):
    root = str(tmp_path)
    assert dataset_info("cifar10.3@250-5000", root) == datasets.REGISTRY["cifar10"]
    assert dataset_info("cifar10", root).flip and not dataset_info("svhn", root).flip
    assert dataset_info("mnist5k", root).shape == (32, 32, 1)
    mismatch = dataset_info("cifar6_mismatch75", root)
    assert (mismatch.nclass, mismatch.shape, mismatch.flip) == (10, (32, 32, 3), True)
    assert dataset_info("cifar10_aug50", root).class_names == datasets.CIFAR10_CLASSES

    meta = make_ssl_dataset(tmp_path, name="meta", nclass=4, size=6, flip=False)
    info = dataset_info("meta", root)
    assert (info.nclass, info.shape, info.flip) == (4, (6, 6, 3), False)
    assert info.class_names == ("class0", "class1", "class2", "class3")
    assert meta.name == "meta.1@30-10"

    make_ssl_dataset(tmp_path, name="plain", nclass=5, size=10, channels=1, write_meta=False)
    info = dataset_info("plain", root)
    assert (info.nclass, info.shape, info.flip) == (5, (10, 10, 1), True)


def test_dataset_info_errors(tmp_path):
    with pytest.raises(UserError, match=r"unknown dataset 'nothing'.*nothing-test.tfrecord.*create_datasets custom --name=nothing"):
        dataset_info("nothing", str(tmp_path))
    (tmp_path / "broken-meta.json").write_text('{"nclass": 3}')
    with pytest.raises(UserError, match=r"malformed dataset metadata .*broken-meta.json"):
        dataset_info("broken", str(tmp_path))


# --- errors ---------------------------------------------------------------------------------

def test_missing_files_name_the_file_and_the_command(toy, tmp_path):
    with pytest.raises(UserError, match=r"missing .*SSL/toy\.1@500-label\.tfrecord: create it with "
                                        r"`python -m data_prep\.create_split --seed=1 --size=500 "
                                        r".*/SSL/toy .*/toy-train\.tfrecord`"):
        load_ssl("toy.1@500-10", toy.root)
    os.remove(toy.unlabel_path)
    with pytest.raises(UserError, match=r"missing .*toy\.1@24-unlabel\.tfrecord: .*create_split --seed=1 --size=24"):
        load(toy)
    root = str(tmp_path / "other")
    make_ssl_dataset(root, name="cifar10", nlabeled=10, size=32)
    os.remove(os.path.join(root, "cifar10-test.tfrecord"))
    with pytest.raises(UserError, match=r"missing .*cifar10-test\.tfrecord: create it with "
                                        r"`python -m data_prep\.create_datasets cifar10"):
        load_ssl("cifar10.1@10-1", root)
    with pytest.raises(UserError, match=r"cifar6_mismatch75\.2@2400-label\.tfrecord: create it with "
                                        r"`python -m data_prep\.create_mismatch --source=cifar10 --mismatch=75 --seed=2 --data_dir="):
        load_ssl("cifar6_mismatch75.2@2400-1", root)


def test_corrupt_record_detected_at_first_read(toy):
    with open(toy.test_path, "wb") as f:
        f.write(b"this is not a TFRecord file at all" * 10)
    with pytest.raises(UserError, match=r"corrupt TFRecord .*toy-test\.tfrecord.*re-create it"):
        load(toy)


@pytest.mark.parametrize("stream", ["train_labeled", "eval_labeled"])
def test_corrupt_record_detected_while_caching(toy, stream):
    with open(toy.label_path, "rb") as f:
        content = f.read()
    with open(toy.label_path, "wb") as f:
        f.write(content[:-30])            # truncated last record
    data = load(toy, cache=True)          # header and first record are fine
    with pytest.raises(UserError, match=r"corrupt TFRecord .*toy\.1@24-label\.tfrecord"):
        getattr(data, stream)(4)


def test_validation_larger_than_unlabeled_set(toy):
    with pytest.raises(UserError, match=r"asks for 60 validation images but .*-unlabel\.tfrecord holds only 60"):
        load_ssl("toy.1@24-60", toy.root)
    assert load_ssl("toy.1@24-59", toy.root, options=test_options()).info.nclass == 3


def test_image_shape_mismatch_with_metadata(toy):
    with open(toy.meta_path) as f:
        meta = json.load(f)
    meta["height"] = meta["width"] = 32
    with open(toy.meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(UserError, match=r"holds 8x8x3 images but toy is 32x32x3"):
        load(toy)


def test_bad_batch_size(toy):
    with pytest.raises(UserError, match="batch size 0"):
        load(toy).train_labeled(0)


@pytest.mark.parametrize("cache", [True, False])
def test_batch_larger_than_labeled_set(toy, cache):
    batch = take(load(toy, cache=cache).train_labeled(50), 1)[0]     # 24 labeled images
    assert batch["image"].shape == (50, 8, 8, 3)
    if cache:   # consecutive permutations: every image at least twice in 50 draws
        assert np.bincount(batch["label"], minlength=3).min() >= 16
