"""Extend step (issue 3): libml/data/extend.py and data_prep/extend_unlabeled.py."""
import json
import os
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from libml.data import augment

from libml.data import extend

from libml.data import names

from libml.data import records

from libml.base import storage
from libml.base.errors import UserError
from data_prep import extend_unlabeled
from tests.fixtures_data import test_options

DATASET = "toy.1@10-20"        # 20 validation images, the rest extended


# ------------------------------------------------------------------------------------------
# Helpers

def never_grey(n, size=32, seed=0):
    """Images whose pixels never have R == G == B, so a grey fill is exactly the painted box."""
    red = np.random.RandomState(seed).randint(0, 256, (n, size, size)).astype(np.int64)
    return np.stack([red, (red + 1) % 256, (red + 2) % 256], axis=-1).astype(np.uint8)


def grey_boxes(images):
    """Per image: (is_grey mask [H,W], bbox (top, left, h, w) or None)."""
    grey = (images[..., 0] == images[..., 1]) & (images[..., 1] == images[..., 2])
    boxes = []
    for mask in grey:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        boxes.append(None if rows.size == 0 else
                     (rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))
    return grey, boxes


def check_single_grey_box(original, out, mask, box):
    """The changed pixels form one full rectangle painted with one grey level on all channels."""
    top, left, h, w = box
    assert mask.sum() == h * w, "painted pixels are not one full rectangle"
    values = out[mask]
    assert (values == values[0, 0]).all(), "the box is not one grey level"
    np.testing.assert_array_equal(out[~mask], original[~mask])
    return int(values[0, 0])


def write_split(root, n=120, size=16, seed=0, dataset=DATASET):
    """A split whose unlabeled record i has label i (so every record names its source image)."""
    d = names.parse_dataset_name(dataset)
    images = never_grey(n, size, seed)
    records.write_records(d.unlabel_path(str(root)), zip(records.encode_png_images(images), range(n)),
                          overwrite=True)
    with open(os.path.join(str(root), f"{d.name}-meta.json"), "w") as f:
        json.dump({"name": d.name, "nclass": 10, "height": size, "width": size, "channels": 3,
                   "flip": True, "class_names": []}, f)
    return images


def read_shard(path):
    images, labels = records.load_numpy(path)
    return images, labels


def shard_bytes(files):
    return [open(f, "rb").read() for f in files]


def run(root, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("parallel", 2)
    return extend_unlabeled.extend_unlabeled(kw.pop("dataset", DATASET), str(root), **kw)


# ------------------------------------------------------------------------------------------
# Augmentations

def reference_erase_areas(n, size, placement, rng):
    """Area fractions of the released random eraser's accepted boxes (spec §4.1), in numpy."""
    m = 40 * n
    s = rng.uniform(0.02, 0.4, m) * size * size
    r = rng.uniform(0.3, 1 / 0.3, m)
    w, h = np.sqrt(s / r).astype(int), np.sqrt(s * r).astype(int)
    if placement == "inside":
        fits = (w <= size) & (h <= size)
    else:
        left, top = rng.randint(0, size, m), rng.randint(0, size, m)
        fits = (left + w <= size) & (top + h <= size)
    return (w * h)[fits][:n] / (size * size)


@pytest.mark.parametrize("placement", ["inside", "reject"])
def test_random_erase_share_boxes_and_area_law(placement):
    n, size = 3000, 32
    original = never_grey(n, size, seed=1)
    out = augment.random_erase(original, tf.constant([7, 3], tf.int64), placement=placement).numpy()
    mask, boxes = grey_boxes(out)
    erased = [i for i, b in enumerate(boxes) if b is not None]
    share = len(erased) / n
    assert abs(share - 0.3) < 4.5 * np.sqrt(0.3 * 0.7 / n), share
    for i in range(n):
        if boxes[i] is None:
            np.testing.assert_array_equal(out[i], original[i])
    greys = [check_single_grey_box(original[i], out[i], mask[i], boxes[i]) for i in erased]
    assert 0 <= min(greys) and max(greys) <= 254 and abs(np.mean(greys) - 127) < 10
    areas = np.array([boxes[i][2] * boxes[i][3] for i in erased]) / (size * size)
    reference = reference_erase_areas(20000, size, placement, np.random.RandomState(0))
    assert stats.ks_2samp(areas, reference).pvalue > 1e-3
    # The two placements differ in their area law: the released loop favours small boxes.
    expected_mean = {"inside": 0.196, "reject": 0.136}[placement]
    assert abs(areas.mean() - expected_mean) < 0.015
    assert areas.min() >= 0.01 and areas.max() <= 0.4   # int() truncation shrinks boxes
    tops = np.array([boxes[i][0] for i in erased])
    lefts = np.array([boxes[i][1] for i in erased])
    assert tops.min() == 0 and lefts.min() == 0     # boxes reach every border ...
    assert (tops + [boxes[i][2] for i in erased]).max() == size   # ... and stay inside
    assert (lefts + [boxes[i][3] for i in erased]).max() == size


def test_random_erase_is_deterministic_per_seed_and_single_image():
    images = never_grey(64, 16)
    a = augment.random_erase(images, tf.constant([1, 2], tf.int64)).numpy()
    b = augment.random_erase(images, tf.constant([1, 2], tf.int64)).numpy()
    c = augment.random_erase(images, tf.constant([1, 3], tf.int64)).numpy()
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert augment.random_erase(images[0], tf.constant([1, 2], tf.int64)).shape == (16, 16, 3)


def test_cutout_is_a_clipped_16x16_grey_square_on_every_image():
    n, size = 400, 32
    original = never_grey(n, size, seed=2)
    out = augment.cutout(original, tf.constant([5, 5], tf.int64)).numpy()
    mask, boxes = grey_boxes(out)
    assert all(b is not None for b in boxes)
    sides = []
    for i in range(n):
        assert check_single_grey_box(original[i], out[i], mask[i], boxes[i]) == 128
        sides += [boxes[i][2], boxes[i][3]]
    assert max(sides) == 16 and min(sides) <= 9      # full squares and squares clipped at borders
    assert np.mean(np.array(sides) == 16) > 0.3


def test_simple_is_a_flip_and_translation_of_the_original():
    images = never_grey(40, 16, seed=3)
    out = augment.augment_copy(images, tf.constant([9, 9], tf.int64), "simple", flip=True).numpy()
    flipped = 0
    for x, y in zip(images, out):
        found = None
        for flip in (False, True):
            src = x[:, ::-1] if flip else x
            for dy in range(-4, 5):
                for dx in range(-4, 5):
                    if np.array_equal(y[4:12, 4:12], src[4 + dy:12 + dy, 4 + dx:12 + dx]):
                        found = flip
        assert found is not None, "output is not a flipped/translated original"
        flipped += found
    assert 5 < flipped < 35
    assert not np.array_equal(out, images)
    np.testing.assert_array_equal(augment.augment_copy(images, tf.constant([9, 9], tf.int64), "none"), images)


# ------------------------------------------------------------------------------------------
# Writing extensions

def test_extension_excludes_validation_and_erases_copies(ml_data):
    source = write_split(ml_data)
    files = run(ml_data, copies=3, aug="erase", seed=0)
    folder = names.extend_dir(DATASET, str(ml_data), 3, "erase", 0)
    assert files == [os.path.join(folder, f"shard-0000{j}-of-00003.tfrecord") for j in range(3)]
    assert extend.extended_unlabeled_files(DATASET, str(ml_data), 3, "erase", 0) == files
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert [s["records"] for s in manifest["shard_files"]] == [100, 100, 100]
    assert [s["copies"] for s in manifest["shard_files"]] == [[1], [2], [3]]

    copies, erased_sets = [], []
    for path in files:
        images, labels = read_shard(path)
        # Every training image (labels 20..119) exactly once, validation images (0..19) never.
        assert sorted(labels) == list(range(20, 120))
        assert not np.array_equal(labels, np.arange(20, 120)), "copy is not shuffled"
        mask, boxes = grey_boxes(images)
        erased = set()
        for img, label, m, box in zip(images, labels, mask, boxes):
            if box is None:
                np.testing.assert_array_equal(img, source[label])
            else:
                check_single_grey_box(source[label], img, m, box)
                erased.add(int(label))
        erased_sets.append(erased)
        copies.append(images[np.argsort(labels)])
    share = sum(map(len, erased_sets)) / 300
    assert 0.15 < share < 0.45
    assert len({frozenset(e) for e in erased_sets}) == 3, "copies erase the same images"
    for a in range(3):
        assert not np.array_equal(copies[a], source[20:])
        for b in range(a):
            assert not np.array_equal(copies[a], copies[b])


def test_keep_original_and_fewer_shards(ml_data):
    source = write_split(ml_data)
    files = run(ml_data, copies=3, aug="cutout", seed=0, keep_original=True, shards=2)
    assert len(files) == 2
    manifest = json.load(open(os.path.join(os.path.dirname(files[0]), "manifest.json")))
    assert [s["copies"] for s in manifest["shard_files"]] == [[0, 2], [1, 3]]
    images, labels = read_shard(files[0])
    assert len(labels) == 200
    np.testing.assert_array_equal(images[:100], source[labels[:100]])     # copy 0: the original
    assert not np.array_equal(images[100:], source[labels[100:]])          # copy 2: cut out
    with pytest.raises(UserError, match="includes the original"):
        extend.extended_unlabeled_files(DATASET, str(ml_data), 3, "cutout", 0, keep_original=False)
    assert extend.extended_unlabeled_files(DATASET, str(ml_data), 3, "cutout", 0, keep_original=True) == files


def test_same_seed_gives_byte_identical_shards(tmp_path):
    roots = [tmp_path / r for r in "abcd"]
    for root in roots:
        write_split(root)
    a = shard_bytes(run(roots[0], copies=3, aug="erase", seed=4, parallel=1))
    b = shard_bytes(run(roots[1], copies=3, aug="erase", seed=4, parallel=2))
    c = shard_bytes(run(roots[2], copies=3, aug="erase", seed=5))
    assert a == b
    assert all(x != y for x, y in zip(a, c))
    assert len(set(a)) == 3
    # The PNG compression level changes the bytes, never the pixels.
    compressed = run(roots[3], copies=3, aug="erase", seed=4, png_compression=6)
    assert shard_bytes(compressed) != a
    stored = extend.extended_unlabeled_files(DATASET, str(roots[0]), 3, "erase", 4)
    for x, y in zip(stored, compressed):
        for u, v in zip(read_shard(x), read_shard(y)):
            np.testing.assert_array_equal(u, v)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch):
    full_root, cut_root = tmp_path / "full", tmp_path / "cut"
    write_split(full_root)
    write_split(cut_root)
    expected = shard_bytes(run(full_root, copies=4, aug="erase", seed=2))

    finish = extend_unlabeled._finish_shard
    calls = []

    def finish_then_die(tmp, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt   # as if killed while renaming the second shard
        finish(tmp, path)

    monkeypatch.setattr(extend_unlabeled, "_finish_shard", finish_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(cut_root, copies=4, aug="erase", seed=2)
    monkeypatch.setattr(extend_unlabeled, "_finish_shard", finish)
    folder = names.extend_dir(DATASET, str(cut_root), 4, "erase", 2)
    assert sorted(os.listdir(folder)) == ["plan.json", "shard-00000-of-00004.tfrecord"]
    with pytest.raises(UserError, match="incomplete extension .*extend_unlabeled --dataset=toy.1@10-20"):
        extend.extended_unlabeled_files(DATASET, str(cut_root), 4, "erase", 2)
    first = os.path.join(folder, "shard-00000-of-00004.tfrecord")
    os.utime(first, (1, 1))
    with open(os.path.join(folder, "shard-00001-of-00004.tfrecord"), "wb") as f:
        f.write(expected[1][:1000])   # a truncated shard (say, copied by hand) is rewritten
    with open(os.path.join(folder, "shard-00002-of-00004.tfrecord.tmp-99999"), "wb") as f:
        f.write(b"left by a killed run")
    files = run(cut_root, copies=4, aug="erase", seed=2)
    assert os.stat(first).st_mtime == 1, "a complete shard was rewritten"
    assert shard_bytes(files) == expected


# ------------------------------------------------------------------------------------------
# Errors

def test_errors_before_writing(ml_data, monkeypatch):
    root = str(ml_data)
    with pytest.raises(UserError, match=r"missing .*toy.1@10-unlabel.tfrecord: create it with "
                                        r"`python -m data_prep.create_split --seed=1 --size=10"):
        run(ml_data)
    write_split(ml_data)
    with pytest.raises(UserError, match="--copies=0: use at least 1"):
        run(ml_data, copies=0)
    with pytest.raises(UserError, match="unknown augmentation 'blur': use one of erase, cutout, simple, none"):
        run(ml_data, aug="blur")
    with pytest.raises(UserError, match="--png_compression=10: use a zlib level 0..9"):
        run(ml_data, png_compression=10)
    with pytest.raises(UserError, match="--shards=4: use 1..3"):
        run(ml_data, copies=3, shards=4)
    with pytest.raises(UserError, match="takes the first 120 for validation"):
        run(ml_data, dataset="toy.1@10-120")
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 10**5, 10**5))
    with pytest.raises(UserError, match=r"not enough free disk .*needs about 0\.\d\d GiB \(2000 records x "):
        run(ml_data, copies=20)
    assert not os.path.exists(names.extend_dir(DATASET, root, 20, "erase", 0) + "/plan.json")
    with pytest.raises(UserError, match=r"missing extension .*: create it with `python -m "
                                        r"data_prep.extend_unlabeled --dataset=toy.1@10-20 --copies=2"):
        extend.extended_unlabeled_files(DATASET, root, 2, "erase", 0)


def test_existing_output_needs_overwrite_and_stale_source_is_refused(ml_data, monkeypatch):
    write_split(ml_data)
    first = shard_bytes(run(ml_data, copies=2, aug="none", seed=0))
    with pytest.raises(UserError, match="already exists: pass --overwrite"):
        run(ml_data, copies=2, aug="none", seed=0)
    with monkeypatch.context() as m:   # a failed disk check must not delete the old extension
        m.setattr(storage.shutil, "disk_usage", lambda path: namedtuple("U", "total used free")(1, 1, 0))
        with pytest.raises(UserError, match="not enough free disk"):
            run(ml_data, copies=2, aug="none", seed=0, keep_original=True, overwrite=True)
    assert extend.extended_unlabeled_files(DATASET, str(ml_data), 2, "none", 0)
    assert shard_bytes(run(ml_data, copies=2, aug="none", seed=0, overwrite=True)) == first
    folder = names.extend_dir(DATASET, str(ml_data), 3, "erase", 0)
    os.makedirs(folder)
    with open(os.path.join(folder, "plan.json"), "w") as f:
        json.dump({"copies": 3, "other": "settings"}, f)
    with pytest.raises(UserError, match="unfinished extension with other settings"):
        run(ml_data, copies=3)
    write_split(ml_data, n=130)            # the split was re-created: the extension is stale
    with pytest.raises(UserError, match="was made from another .*--overwrite"):
        extend.extended_unlabeled_files(DATASET, str(ml_data), 2, "none", 0)


# ------------------------------------------------------------------------------------------
# Command line and training stream

def test_cli_in_process_and_exit_code(ml_data, capsys):
    write_split(ml_data, n=40)
    argv = ["extend_unlabeled", f"--data_dir={ml_data}", "--dataset=toy.1@10-20", "--copies=2",
            "--aug=simple", "--seed=3", "--noprogress"]
    assert extend_unlabeled.main(argv) == 0
    assert "2 shards" in capsys.readouterr().out
    assert len(extend.extended_unlabeled_files("toy.1@10-20", str(ml_data), 2, "simple", 3)) == 2
    with pytest.raises(UserError, match="already exists"):
        extend_unlabeled.main(argv)
    result = subprocess.run([sys.executable, "-m", "data_prep.extend_unlabeled", f"--data_dir={ml_data}",
                             "--dataset=toy.1@10-20", "--copies=0"],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "error: --copies=0: use at least 1 copy (50 in the paper, 25 in Table 5)"


def test_training_stream_reads_the_extension(ml_data):
    from libml.data import pipeline as data
    write_split(ml_data, n=60)
    d = names.parse_dataset_name(DATASET)
    labeled = never_grey(10, 16, seed=9)
    records.write_records(d.label_path(str(ml_data)), zip(records.encode_png_images(labeled), range(10)))
    records.write_records(d.test_path(str(ml_data)), zip(records.encode_png_images(labeled), range(10)))
    files = run(ml_data, copies=2, aug="erase", seed=0)
    ssl = data.load_ssl(DATASET, str(ml_data), seed=0, unlabeled_files=files, cache=False,
                         options=test_options())
    batch = next(iter(ssl.train_unlabeled(8)))
    assert batch["image"].shape == (8, 2, 16, 16, 3)
    assert set(batch["label"].numpy()) <= set(range(20, 60))
