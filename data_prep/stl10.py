"""STL-10 from its original binary files, streamed (the unlabeled set is 2.8 GB decoded).

    python -m data_prep.create_datasets stl10 [--archive_dir=DIR]
    python -m data_prep.create_split --seed=1 --size=1000 $ML_DATA/SSL/stl10 \\
        $ML_DATA/stl10-train.tfrecord $ML_DATA/stl10-unlabeled.tfrecord
    python -m realmix_tf.realmix --dataset=stl10.1@1000-500 ...

Source, first found wins: `stl10_binary.tar.gz` or its extracted `stl10_binary/` folder in the
archive folders (--archive_dir, $ML_DATA/downloads, ~/tensorflow_datasets/downloads/manual).
Written: stl10-train (5,000 labeled images), stl10-test (8,000), stl10-unlabeled (100,000, label
-1 = unknown, so create_split never labels them; libml wrote 0), stl10-meta.json (96x96x3, 10
classes, flip, shift 12: libml's augment_stl10) and stl10_fold_indices.txt (the ten official
1,000-image folds, kept as libml kept them; the splits draw from all 5,000 as libml did).

File format: `*_X.bin` holds uint8 images one after the other, each as 3 colour planes of 96x96
stored column by column (byte c*9216 + x*96 + y is row y, column x of channel c); `*_y.bin`
holds one uint8 label 1..10 per image (written here as 0..9).
"""
import contextlib
import os
import tarfile
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from libml.data import datasets

from libml.base import files as io

from libml.data import names

from libml.data import records
from libml.base.errors import UserError

ARCHIVE = "stl10_binary.tar.gz"
FOLDER = "stl10_binary"
URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
SIZE = 96
IMAGE_BYTES = 3 * SIZE * SIZE
SUBSETS = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
           "unlabeled": ("unlabeled_X.bin", None)}
FOLDS = "fold_indices.txt"
FOLDS_COPY = "stl10_fold_indices.txt"
UNKNOWN = -1
CHUNK = 2048                    # images decoded and encoded at a time


def find_source(dirs: Sequence[str]) -> str:
    """The first `stl10_binary.tar.gz` or `stl10_binary/` folder in `dirs`."""
    for d in dirs:
        for candidate in (os.path.join(d, ARCHIVE), os.path.join(d, FOLDER)):
            if os.path.exists(candidate):
                return candidate
    raise UserError(f"no stl10 data found: download {URL} (2.6 GB) into {dirs[0]} (or pass "
                    f"--archive_dir=DIR), then run the command again")


@contextlib.contextmanager
def open_member(source: str, name: str):
    """A binary file object for `name` inside the archive or folder `source`."""
    if os.path.isdir(source):
        path = os.path.join(source, name)
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing: download {ARCHIVE} again and extract it whole")
        with open(path, "rb") as f:
            yield f
        return
    try:
        with tarfile.open(source, "r:*") as tar:
            try:
                member = tar.getmember(f"{FOLDER}/{name}")
            except KeyError:
                raise UserError(f"{source} has no {FOLDER}/{name}: download {ARCHIVE} again") from None
            yield tar.extractfile(member)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"corrupt archive {source} ({type(e).__name__}: {str(e)[:100]}): delete it "
                        f"and download it again") from None


def planes_to_images(data: bytes) -> np.ndarray:
    """uint8 [N, 96, 96, 3] (row, column, channel) from N column-major 3x96x96 records."""
    return np.frombuffer(data, np.uint8).reshape(-1, 3, SIZE, SIZE).transpose(0, 3, 2, 1)


def read_labels(source: str, name: str) -> np.ndarray:
    with open_member(source, name) as f:
        labels = np.frombuffer(f.read(), np.uint8).astype(np.int64) - 1
    if labels.size and (labels.min() < 0 or labels.max() >= len(datasets.STL10_CLASSES)):
        raise UserError(f"{name} in {source} holds labels outside 1..10: download {ARCHIVE} again")
    return labels


def image_chunks(source: str, name: str, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """The images of `name` in order, `chunk` at a time (memory stays bounded)."""
    with open_member(source, name) as f:
        while True:
            data = f.read(chunk * IMAGE_BYTES)
            if not data:
                return
            if len(data) % IMAGE_BYTES:
                raise UserError(f"{name} in {source} ends inside an image (truncated file): "
                                f"download {ARCHIVE} again")
            yield planes_to_images(data)


def examples(source: str, subset: str, count: Optional[List[int]] = None) -> Iterator[Tuple[bytes, int]]:
    """(PNG bytes, label) of one subset in file order; `count` receives the number of images."""
    x_name, y_name = SUBSETS[subset]
    labels = read_labels(source, y_name) if y_name else None
    done = 0
    for images in image_chunks(source, x_name):
        for png in records.encode_png_images(np.ascontiguousarray(images)):
            if labels is not None and done >= len(labels):
                raise UserError(f"{x_name} has more images than {y_name} has labels: download "
                                f"{ARCHIVE} again")
            yield png, int(labels[done]) if labels is not None else UNKNOWN
            done += 1
    if labels is not None and done != len(labels):
        raise UserError(f"{x_name} has {done} images but {y_name} {len(labels)} labels: download "
                        f"{ARCHIVE} again")
    if count is not None:
        count.append(done)


def read_folds(source: str) -> bytes:
    with open_member(source, FOLDS) as f:
        return f.read()


def create_stl10(root: str, dirs: Sequence[str], overwrite: bool = False) -> List[str]:
    """Writes stl10-train/-test/-unlabeled, stl10-meta.json and stl10_fold_indices.txt."""
    info = datasets.REGISTRY["stl10"]
    folds_path = os.path.join(root, FOLDS_COPY)
    paths = {subset: names.subset_path(root, "stl10", subset) for subset in SUBSETS}
    io.require_free([*paths.values(), names.meta_path(root, "stl10"), folds_path], overwrite)
    source = find_source(dirs)
    print(f"stl10: reading {source}")
    written, counts = [], []
    for subset, path in paths.items():
        count = records.write_records(path, examples(source, subset), overwrite,
                                      progress=f"writing {os.path.basename(path)}")
        written.append(path)
        counts.append(f"{subset} {count}")
    with io.atomic_path(folds_path, overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(read_folds(source))
    meta = datasets.make_meta("stl10", info.nclass, info.shape, info.flip, info.class_names, info.shift)
    written += [folds_path, datasets.write_meta(root, meta, overwrite)]
    print(f"stl10: {', '.join(counts)} images -> {root}")
    return written
