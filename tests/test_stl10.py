"""data_prep/stl10.py: STL-10 read from small files in the original binary format."""
import io
import os
import tarfile

import numpy as np
import pytest

from data_prep import stl10
from libml.errors import UserError

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
    members["class_names.txt"] = "\n".join(stl10.CLASSES).encode()
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
