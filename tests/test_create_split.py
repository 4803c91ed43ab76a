"""data_prep/create_split.py: the spec §3.3 algorithm, files, reproducibility, errors."""
import json
import os
import shutil

import numpy as np
import pytest

from data_prep import create_split as cs
from libml.data import records
from libml.base.errors import UserError
from tests import fixtures_archives as fx


def reference_split(labels, size, seed):
    """Spec §3.3 pseudo-code, written independently (global legacy RandomState, lists)."""
    nclass = max(labels) + 1
    class_id = [[p for p, l in enumerate(labels) if l == c] for c in range(nclass)]
    stats = np.array([len(x) for x in class_id], np.float64)
    stats /= stats.max()
    if seed:
        np.random.seed(seed)
        for c in range(nclass):
            np.random.shuffle(class_id[c])
    npos = np.zeros(nclass, np.int64)
    label = []
    for _ in range(size):
        c = np.argmax(stats - npos / max(npos.max(), 1))
        label.append(class_id[c][npos[c]])
        npos[c] += 1
    label_set = set(label)
    npos = np.zeros(nclass, np.int64)
    class_data = [[] for _ in range(nclass)]
    unlabel = []
    for pos, l in enumerate(labels):
        if pos in label_set:
            continue
        class_data[l].append(pos)
        while True:
            c = np.argmax(stats - npos / max(npos.max(), 1))
            if class_data[c]:
                unlabel.append(class_data[c].pop(0))
                npos[c] += 1
            else:
                break
    for remain in class_data:
        unlabel.extend(remain)
    return label, unlabel


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("balanced", [True, False])
def test_matches_reference_algorithm(seed, balanced):
    rng = np.random.RandomState(100 + seed)
    if balanced:
        labels = rng.permutation(np.repeat(np.arange(10), 50))
    else:
        labels = rng.permutation(np.repeat(np.arange(4), [90, 40, 25, 60]))
    labels = labels.tolist()
    want_label, want_unlabel = reference_split(labels, 40, seed)
    got = cs.choose_labeled(np.array(labels), 40, seed)
    assert got.tolist() == [int(x) for x in want_label]
    assert cs.unlabeled_order(np.array(labels), got) == [int(x) for x in want_unlabel]


def test_does_not_touch_global_random_state():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    cs.choose_labeled(np.arange(100) % 10, 20, seed=4)
    assert (np.random.get_state()[1] == before).all()


def test_class_balance_and_round_robin():
    labels = np.random.RandomState(0).permutation(np.repeat(np.arange(10), 100))
    labeled = cs.choose_labeled(labels, 250, seed=3)
    assert np.bincount(labels[labeled]).tolist() == [25] * 10
    order = cs.unlabeled_order(labels, labeled)
    assert sorted(order) == sorted(set(range(1000)) - set(labeled.tolist()))
    for start in range(0, 300, 10):   # the write order cycles through the classes
        assert len(set(labels[order[start:start + 10]].tolist())) >= 8


def test_class_ids_with_gaps_interleave_and_draw():
    """Ids 2, 3, 8, 9 only (a mismatch set's 4 classes): the absent ids 0, 1, 4-7 are never
    picked, so the write order keeps cycling (the released code stopped after one round and
    wrote the rest class by class) and the labeled draw does not fail on an empty class."""
    labels = np.repeat([2, 3, 8, 9], 3)
    assert cs.unlabeled_order(labels, ()) == [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]
    assert reference_split(labels.tolist(), 0, 0)[1] == [0, 3, 6, 9, 1, 2, 4, 5, 7, 8, 10, 11]
    labeled = cs.choose_labeled(np.repeat([0, 2], 5), 4, seed=0)
    assert labeled.tolist() == [0, 5, 1, 6]


def test_unknown_labels_are_never_labeled():
    labels = np.array([0, -1, 1, -1, 0, 1, -1, -1, 0, 1])
    labeled = cs.choose_labeled(labels, 6, seed=2)
    assert (labels[labeled] >= 0).all() and len(labeled) == 6
    order = cs.unlabeled_order(labels, labeled)
    assert sorted(order) == [1, 3, 6, 7]
    with pytest.raises(UserError, match="7 labels requested but the input has only 6 labeled images"):
        cs.choose_labeled(labels, 7, seed=2)


def test_validation_is_made_of_labeled_images_unknown_last():
    """Labeled records not drawn for the labeled set come first (round-robin), the unknown ones
    after them in input order: `digits.1@100-50` had 20 labeled validation images, now 50."""
    rng = np.random.RandomState(0)
    labels = np.concatenate([np.repeat(np.arange(10), 15), np.full(300, -1)])
    labels = labels[rng.permutation(len(labels))]
    labeled = cs.choose_labeled(labels, 100, seed=1)
    order = np.asarray(cs.unlabeled_order(labels, labeled))
    assert len(order) == 350 and sorted(order) == sorted(set(range(450)) - set(labeled.tolist()))
    assert (labels[order[:50]] >= 0).all()                     # all 50 leftover labeled images first
    np.testing.assert_array_equal(order[50:], np.flatnonzero(labels < 0))   # unknown in input order
    assert np.bincount(labels[order[:50]]).tolist() == [5] * 10  # still class balanced


def test_split_command_says_how_many_validation_images_are_labeled(tmp_path, capsys):
    labels = np.array([0, 1] * 6 + [-1] * 8, np.int64)
    paths = fx.write_record_dataset(str(tmp_path), "mine", {"train": (fx.random_images(20, (4, 4, 3)), labels)})
    cs.main(["create_split", "--seed=1", "--size=4", str(tmp_path / "SSL" / "mine"), paths["train"]])
    out = capsys.readouterr().out
    assert ("validation: the first 8 unlabeled records are labeled images (then 8 without labels): "
            "use a validation size of at most 8, e.g. --dataset=mine.1@4-8") in out
    with open(tmp_path / "SSL" / "mine.1@4-map.json") as f:
        assert json.load(f)["unlabel_labeled_first"] == 8           # read by the trainer's check


def test_proportional_draw_never_runs_out_of_a_class():
    """Any size up to the number of labeled images works, even on very unequal classes."""
    for counts in ([1, 100], [1, 2, 13], [3, 3, 7, 1], [5, 1, 1, 9]):
        labels = np.repeat(np.arange(len(counts)), counts)
        for size in range(1, len(labels) + 1):
            labeled = cs.choose_labeled(labels, size, seed=1)
            assert len(set(labeled.tolist())) == size
        shares = np.bincount(labels[cs.choose_labeled(labels, len(labels) // 2, 0)], minlength=len(counts))
        assert (np.abs(shares - np.array(counts) / 2) <= 1.5).all()


@pytest.fixture
def tiny_dataset(tmp_path):
    labels = np.random.RandomState(1).permutation(np.repeat(np.arange(10), 30)).astype(np.int64)
    images = fx.random_images(300, (4, 4, 3), seed=2)
    paths = fx.write_record_dataset(str(tmp_path), "tiny", {"train": (images[:200], labels[:200]),
                                                             "more": (images[200:], labels[200:])})
    return tmp_path, paths, labels


def test_files_from_two_inputs(tiny_dataset):
    root, paths, labels = tiny_dataset
    prefix = str(root / "SSL" / "tiny")
    cs.main(["create_split", "--seed=3", "--label_split_size=250", prefix, paths["train"], paths["more"]])
    source = list(records.iterate_serialized(paths["train"])) + list(records.iterate_serialized(paths["more"]))
    with open(f"{prefix}.3@250-map.json") as f:
        split = json.load(f)
    want_label, want_unlabel = reference_split(labels.tolist(), 250, 3)
    assert split["label"] == sorted(int(x) for x in want_label)
    assert split["unlabel"] == [int(x) for x in want_unlabel]
    # records are copied byte for byte: labeled in input order, unlabeled in map order
    assert list(records.iterate_serialized(f"{prefix}.3@250-label.tfrecord")) == [source[p] for p in split["label"]]
    assert list(records.iterate_serialized(f"{prefix}.3@250-unlabel.tfrecord")) == [source[p] for p in split["unlabel"]]
    assert np.bincount(records.load_labels(f"{prefix}.3@250-label.tfrecord")).tolist() == [25] * 10


def test_real_mnist5k_reproducible(tmp_path_factory, tmp_path):
    train = os.path.join(fx.mnist5k_data(tmp_path_factory), "mnist5k-train.tfrecord")
    maps = {}
    for run, seed in (("a", 1), ("b", 1), ("c", 2)):
        prefix = str(tmp_path / run / "mnist5k")
        cs.create_split(prefix, [train], 250, seed)
        with open(f"{prefix}.{seed}@250-map.json") as f:
            maps[run] = json.load(f)
        assert np.bincount(records.load_labels(f"{prefix}.{seed}@250-label.tfrecord")).tolist() == [25] * 10
    assert maps["a"] == maps["b"] and maps["a"]["label"] != maps["c"]["label"]
    assert len(maps["a"]["unlabel"]) == 3750
    unlabel_labels = records.load_labels(str(tmp_path / "a" / "mnist5k.1@250-unlabel.tfrecord"))
    assert np.bincount(unlabel_labels[:500]).tolist() == [50] * 10   # a balanced validation set


def test_errors(tiny_dataset):
    root, paths, _ = tiny_dataset
    prefix = str(root / "SSL" / "tiny")
    with pytest.raises(UserError, match="400 labels requested but the input has only 200"):
        cs.main(["p", "--size=400", prefix, paths["train"]])
    with pytest.raises(UserError, match="--size=0"):
        cs.main(["p", prefix, paths["train"]])
    with pytest.raises(UserError, match="target prefix"):
        cs.main(["p", "--size=10", paths["train"]])
    with pytest.raises(UserError, match=r"missing .*nope.tfrecord: create it with `python -m data_prep.create_datasets"):
        cs.main(["p", "--size=10", prefix, str(root / "nope.tfrecord")])
    cs.main(["p", "--size=10", prefix, paths["train"]])
    label_file = f"{prefix}.0@10-label.tfrecord"
    before = open(label_file, "rb").read()
    with pytest.raises(UserError, match="already exists: pass --overwrite"):
        cs.main(["p", "--size=10", prefix, paths["train"]])
    assert open(label_file, "rb").read() == before
    broken = str(root / "broken.tfrecord")
    shutil.copyfile(paths["train"], broken)
    fx.corrupt_file(broken)
    with pytest.raises(UserError, match="corrupt TFRecord .*broken.tfrecord"):
        cs.main(["p", "--size=10", "--overwrite", prefix, broken])
    assert open(label_file, "rb").read() == before
    assert not [f for f in os.listdir(root / "SSL") if ".tmp-" in f]
