"""data_prep/create_mismatch.py: class composition at each level, files, label remapping, errors."""
import json
import os
import shutil

import numpy as np
import pytest

from data_prep import create_mismatch as cm
from libml.data import names
from libml.data import records
from libml.base.errors import UserError
from tests import fixtures_archives as fx

ANIMALS = [2, 3, 4, 5, 6, 7]
TRANSPORT = [0, 1, 8, 9]


@pytest.fixture(scope="module")
def cifar_like_labels():
    rng = np.random.RandomState(0)
    return rng.permutation(np.repeat(np.arange(10), 60)), rng.permutation(np.repeat(np.arange(10), 10))


@pytest.mark.parametrize("level", [0, 25, 50, 75, 100])
def test_class_composition(cifar_like_labels, level):
    train, test = cifar_like_labels
    split = cm.mismatch_split(train, test, "cifar10", level, labels_per_class=10, seed=1)
    assert np.bincount(train[split.labeled], minlength=10).tolist() == [0, 0] + [10] * 6 + [0, 0]
    unlabeled = train[split.unlabeled]
    classes = sorted(set(unlabeled.tolist()))
    assert len(classes) == 4 and sorted(cm.MISMATCH_CLASSES["cifar10"].unlabeled[level]) == classes
    assert np.isin(unlabeled, TRANSPORT).mean() == level / 100
    assert len(split.unlabeled) == 4 * 50          # 60 - 10 labeled: the same size at every level
    assert [np.sum(unlabeled == c) for c in classes] == [50] * 4
    assert not set(split.unlabeled) & set(split.labeled.tolist())
    for start in range(0, len(unlabeled), 20):     # round-robin over the whole file, so the
        window = unlabeled[start:start + 20]       # validation records mix the 4 classes evenly
        assert [np.sum(window == c) for c in classes] == [5] * 4
    assert split.test.tolist() == np.flatnonzero(np.isin(test, ANIMALS)).tolist()


def test_labeled_draw_is_the_same_at_every_level(cifar_like_labels):
    train, test = cifar_like_labels
    draws = [cm.mismatch_split(train, test, "cifar10", x, 10, seed=2).labeled.tolist() for x in cm.LEVELS]
    assert all(d == draws[0] for d in draws)
    assert draws[0] != cm.mismatch_split(train, test, "cifar10", 0, 10, seed=3).labeled.tolist()


def test_label_tables():
    assert cm.new_labels("cifar10", 75, False).tolist() == [-1, -1, 0, 1, 2, 3, 4, 5, -1, -1]
    assert cm.new_labels("cifar10", 75, True).tolist() == list(range(10))


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mismatch"))
    source = fx.mnist5k_data(tmp_path_factory)
    for f in ("mnist5k-train.tfrecord", "mnist5k-test.tfrecord", "mnist5k-meta.json"):
        shutil.copyfile(os.path.join(source, f), os.path.join(root, f))
    return root


def test_mnist5k_files(mnist_root):
    cm.main(["create_mismatch", "--source=mnist5k", "--mismatch=75", "--seed=1", "--labels_per_class=50",
             f"--data_dir={mnist_root}"])
    dataset = names.parse_dataset_name("mnist6_mismatch75.1@300-100")
    label_labels = records.load_labels(dataset.label_path(mnist_root))
    assert np.bincount(label_labels).tolist() == [50] * 6
    unlabel_labels = records.load_labels(dataset.unlabel_path(mnist_root))
    assert len(unlabel_labels) == 4 * 350 and (unlabel_labels == -1).sum() == 3 * 350   # 6, 7, 8 out
    assert sorted(set(unlabel_labels.tolist())) == [-1, 5]
    test_labels = records.load_labels(dataset.test_path(mnist_root))
    assert np.bincount(test_labels).tolist() == [100] * 6
    with open(os.path.join(mnist_root, "mnist6_mismatch75-meta.json")) as f:
        meta = json.load(f)
    assert meta["nclass"] == 6 and meta["channels"] == 1 and meta["class_names"] == list("012345")
    # images are the source PNG bytes, positions as in the map
    with open(dataset.map_path(mnist_root)) as f:
        split = json.load(f)
    source = list(records.iterate_serialized(os.path.join(mnist_root, "mnist5k-train.tfrecord")))
    import tensorflow as tf
    first = tf.train.Example.FromString(next(records.iterate_serialized(dataset.unlabel_path(mnist_root))))
    original = tf.train.Example.FromString(source[split["unlabel"][0]])
    assert first.features.feature["image"] == original.features.feature["image"]


def test_keep_original_ids(mnist_root):
    cm.create_mismatch(mnist_root, "mnist5k", 50, seed=2, labels_per_class=20, keep_original_ids=True)
    dataset = names.parse_dataset_name("mnist6_mismatch50.2@120-1")
    assert sorted(set(records.load_labels(dataset.unlabel_path(mnist_root)).tolist())) == [4, 5, 6, 7]
    with open(os.path.join(mnist_root, "mnist6_mismatch50-meta.json")) as f:
        assert json.load(f)["nclass"] == 10


def test_errors(mnist_root, tmp_path):
    with pytest.raises(UserError, match=r"missing .*cifar10-train.tfrecord: create it with "
                                        r"`python -m data_prep.create_datasets cifar10`"):
        cm.main(["p", "--mismatch=0", f"--data_dir={tmp_path}"])
    with pytest.raises(UserError, match="--mismatch=30 is not a level"):
        cm.main(["p", "--mismatch=30", f"--data_dir={tmp_path}"])
    with pytest.raises(UserError, match="500 labels per class requested but class 0 of mnist5k has only 400"):
        cm.main(["p", "--source=mnist5k", "--mismatch=0", "--labels_per_class=500", f"--data_dir={mnist_root}"])
    with pytest.raises(UserError, match="--source=svhn has no mismatch classes"):
        cm.main(["p", "--source=svhn", "--mismatch=0", f"--data_dir={mnist_root}"])
    args = ["p", "--source=mnist5k", "--mismatch=25", "--labels_per_class=10", f"--data_dir={mnist_root}"]
    cm.main(args)
    with pytest.raises(UserError, match="already exists: pass --overwrite"):
        cm.main(args)
    cm.main(args + ["--overwrite"])


def test_second_seed_reuses_the_seed_independent_files(mnist_root):
    cm.create_mismatch(mnist_root, "mnist5k", 0, seed=1, labels_per_class=15)
    test_file = names.test_path(mnist_root, "mnist6_mismatch0")
    meta_file = os.path.join(mnist_root, "mnist6_mismatch0-meta.json")
    before = (os.path.getmtime(test_file), open(test_file, "rb").read(), open(meta_file).read())
    cm.create_mismatch(mnist_root, "mnist5k", 0, seed=2, labels_per_class=15)   # no --overwrite needed
    assert os.path.exists(names.parse_dataset_name("mnist6_mismatch0.2@90-1").label_path(mnist_root))
    assert (os.path.getmtime(test_file), open(test_file, "rb").read(), open(meta_file).read()) == before
    # Other settings would change the shared files: refused, and nothing is replaced.
    with pytest.raises(UserError, match="written with other settings.*--overwrite"):
        cm.create_mismatch(mnist_root, "mnist5k", 0, seed=3, labels_per_class=15, keep_original_ids=True)
    assert open(meta_file).read() == before[2]
    assert not os.path.exists(names.parse_dataset_name("mnist6_mismatch0.3@90-1").label_path(mnist_root))


def test_map_keeps_each_unlabeled_records_origin_class(mnist_root):
    """--gamma=auto / realmix_tf.outliers read the truth from the -map.json: the source class
    and the in-distribution flag of every unlabeled record, in file order."""
    cm.create_mismatch(mnist_root, "mnist5k", 25, seed=3, labels_per_class=30, overwrite=True)
    dataset = names.parse_dataset_name("mnist6_mismatch25.3@180-1")
    with open(dataset.map_path(mnist_root)) as f:
        split = json.load(f)
    written = records.load_labels(dataset.unlabel_path(mnist_root))
    source = records.load_labels(os.path.join(mnist_root, "mnist5k-train.tfrecord"))
    origin = np.array(split["unlabel_class"])
    assert origin.tolist() == source[split["unlabel"]].tolist()
    assert sorted(set(origin.tolist())) == [3, 4, 5, 6]          # 25 %: digit 6 replaces 2
    assert split["unlabel_in_distribution"] == (written >= 0).tolist() == (origin != 6).tolist()
    assert split["class_names"] == [str(i) for i in range(10)]
