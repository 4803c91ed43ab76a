"""data_prep/stl10.py: STL-10 read from small files in the original binary format."""
import io
import json
import os
import tarfile

import numpy as np
import pytest

from data_prep import stl10
from libml.data import datasets
from libml.base.errors import UserError

COUNTS = {"train": 3, "test": 2, "unlabeled": 5}


def raw_images(n, seed):
    return np.random.RandomState(seed).randint(0, 256, n * stl10.IMAGE_BYTES).astype(np.uint8)


def write_stl10(folder, as_archive=True, truncate=False):
    """A tiny stl10_binary.tar.gz (or extracted folder) and the images expected from it."""
    members, expected = {}, {}
    for seed, (subset, (x_name, y_name)) in enumerate(stl10.SUBSETS.items()):
        n = COUNTS[subset]
        raw = raw_images(n, seed)
        data = raw.tobytes()[:-5] if truncate and subset == "test" else raw.tobytes()
        members[x_name] = data
        # Independent of planes_to_images: pixel (row y, column x, channel c) of image i is
        # byte i*27648 + c*9216 + x*96 + y.
        images = np.zeros((n, 96, 96, 3), np.uint8)
        i, y, x, c = np.meshgrid(np.arange(n), np.arange(96), np.arange(96), np.arange(3), indexing="ij")
        images[i, y, x, c] = raw[i * stl10.IMAGE_BYTES + c * 9216 + x * 96 + y]
        labels = (np.arange(n) * 3) % 10
        if y_name:
            members[y_name] = (labels + 1).astype(np.uint8).tobytes()
        expected[subset] = (images, labels if y_name else np.full(n, -1))
    members[stl10.FOLDS] = b"0 1 2\n"
    members["class_names.txt"] = "\n".join(datasets.STL10_CLASSES).encode()
    os.makedirs(folder, exist_ok=True)
    if as_archive:
        with tarfile.open(os.path.join(folder, stl10.ARCHIVE), "w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(f"{stl10.FOLDER}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        os.makedirs(os.path.join(folder, stl10.FOLDER))
        for name, data in members.items():
            with open(os.path.join(folder, stl10.FOLDER, name), "wb") as f:
                f.write(data)
    return expected


def decode(pngs):
    import tensorflow as tf
    return np.stack([tf.io.decode_png(p).numpy() for p in pngs])


@pytest.mark.parametrize("as_archive", [True, False])
def test_subsets_in_file_order_with_labels(tmp_path, as_archive):
    expected = write_stl10(str(tmp_path / "dl"), as_archive)
    source = stl10.find_source(["/nonexistent", str(tmp_path / "dl")])
    assert source.endswith(stl10.ARCHIVE if as_archive else stl10.FOLDER)
    for subset in ("train", "test", "unlabeled"):
        count = []
        pairs = list(stl10.examples(source, subset, count))
        np.testing.assert_array_equal(decode([p for p, _ in pairs]), expected[subset][0])
        np.testing.assert_array_equal([label for _, label in pairs], expected[subset][1])
        assert count == [COUNTS[subset]]
    assert stl10.read_folds(source) == b"0 1 2\n"


def test_chunks_bound_memory(tmp_path):
    expected = write_stl10(str(tmp_path / "dl"))
    source = stl10.find_source([str(tmp_path / "dl")])
    chunks = list(stl10.image_chunks(source, "unlabeled_X.bin", chunk=2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), expected["unlabeled"][0])


def test_errors(tmp_path):
    with pytest.raises(UserError, match=r"no stl10 data found: download http://ai.stanford.edu/"
                                        r"~acoates/stl10/stl10_binary.tar.gz \(2.6 GB\) into"):
        stl10.find_source([str(tmp_path)])
    write_stl10(str(tmp_path / "bad"), truncate=True)
    source = stl10.find_source([str(tmp_path / "bad")])
    with pytest.raises(UserError, match="test_X.bin .* ends inside an image"):
        list(stl10.examples(source, "test"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / stl10.ARCHIVE).write_bytes(b"not a tar")
    with pytest.raises(UserError, match="corrupt archive"):
        list(stl10.examples(str(tmp_path / "junk" / stl10.ARCHIVE), "train"))


def test_create_datasets_split_and_training_stream(tmp_path, monkeypatch):
    """create_datasets stl10 -> create_split over train + unlabeled -> the training streams,
    augmented with libml's STL-10 settings (flip, translation 12)."""
    from data_prep import create_datasets, create_split
    from libml.data import augment
    from libml.data import records
    from libml.data.pipeline import load_ssl
    from tests.fixtures_data import test_options
    expected = write_stl10(str(tmp_path / "dl"))
    root = tmp_path / "data"
    create_datasets.main(["create_datasets", "stl10", f"--archive_dir={tmp_path / 'dl'}", f"--data_dir={root}"])
    for subset in ("train", "test", "unlabeled"):
        images, labels = records.load_numpy(str(root / f"stl10-{subset}.tfrecord"))
        np.testing.assert_array_equal(images, expected[subset][0])
        np.testing.assert_array_equal(labels, expected[subset][1])
    with open(root / "stl10-meta.json") as f:
        meta = json.load(f)
    assert meta["shift"] == 12 and meta["height"] == 96 and meta["class_names"][7] == "monkey"
    assert (root / "stl10_fold_indices.txt").read_bytes() == b"0 1 2\n"
    info = datasets.dataset_info("stl10", str(root))
    assert (info.shift, info.flip, info.shape) == (12, True, (96, 96, 3))

    create_split.main(["create_split", "--seed=1", "--size=2", str(root / "SSL" / "stl10"),
                       str(root / "stl10-train.tfrecord"), str(root / "stl10-unlabeled.tfrecord")])
    shifts = []
    original = augment.augment
    monkeypatch.setattr(augment, "augment", lambda *a, **k: (shifts.append(k.get("shift")), original(*a, **k))[1])
    data = load_ssl("stl10.1@2-1", str(root), options=test_options())
    batch = next(iter(data.train_labeled(2)))
    assert batch["image"].shape == (2, 96, 96, 3) and shifts == [12]
    _, unlabel = records.load_numpy(str(root / "SSL" / "stl10.1@2-unlabel.tfrecord"))
    assert unlabel[0] >= 0 and unlabel[1:].tolist() == [-1] * 5     # the leftover labeled image first
    assert np.concatenate([b["label"] for b in data.valid(4)]).tolist() == [unlabel[0]]
    with pytest.raises(UserError, match=r"stl10.1@2-2 asks for 2 validation images but only the first 1 "
                                        r"records .* have labels: use stl10.1@2-1 or less"):
        load_ssl("stl10.1@2-2", str(root), options=test_options())
