"""Tiny files in the real formats, for tests.

- ``write_cifar_archive`` (from runs.bench_fixtures): ``cifar-10-python.tar.gz`` /
  ``cifar-100-python.tar.gz`` in the real pickle (or ``-binary``) layout.
- ``write_svhn_mats``: ``train_32x32.mat`` etc. (X [32,32,3,N], y [N,1] in 1..10).
- ``write_image_folders``: class sub-folders of PNG/JPEG images.
- ``write_record_dataset``: ``{name}-train/test.tfrecord`` from arrays.
- ``mnist5k_data``: the real mnist5k records, written once per test session.
"""
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from runs.bench_fixtures import random_images, write_cifar_archive  # noqa: F401 (shared with the benchmarks)

Arrays = Tuple[np.ndarray, np.ndarray]


def write_svhn_mats(folder: str, sizes: Optional[Dict[str, int]] = None, seed: int = 0) -> Dict[str, Arrays]:
    """Writes {split}_32x32.mat files; returns {split: (images [N,32,32,3], raw labels 1..10)}."""
    import scipy.io
    sizes = sizes or {"train": 12, "test": 7, "extra": 5}
    os.makedirs(folder, exist_ok=True)
    result = {}
    for i, (split, n) in enumerate(sizes.items()):
        images = random_images(n, seed=seed + i)
        labels = np.random.RandomState(seed + 100 + i).randint(1, 11, n).astype(np.int64)
        labels[:2] = [10, 1]   # make sure digit 0 (stored as 10) and digit 1 appear
        scipy.io.savemat(os.path.join(folder, f"{split}_32x32.mat"),
                         {"X": images.transpose(1, 2, 3, 0), "y": labels[:, None].astype(np.uint8)})
        result[split] = (images, labels)
    return result


def write_image(path: str, image: np.ndarray) -> None:
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array = image[:, :, 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    fmt = "PNG" if path.lower().endswith(".png") else "JPEG"
    Image.fromarray(array).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def write_image_folders(root: str, counts: Dict[str, int], shape=(40, 48, 3), ext: str = ".png",
                        seed: int = 0) -> Dict[str, List[str]]:
    """root/{class}/{i}{ext} images of `shape` (H, W, C); returns {class: paths}."""
    result = {}
    for k, (name, n) in enumerate(counts.items()):
        images = random_images(n, shape, seed=seed + k)
        result[name] = []
        for i, image in enumerate(images):
            path = os.path.join(root, name, f"{i:03d}{ext}")
            write_image(path, image)
            result[name].append(path)
    return result


def write_record_dataset(root: str, name: str, subsets: Dict[str, Arrays]) -> Dict[str, str]:
    """Writes {root}/{name}-{subset}.tfrecord for each (images, labels); returns the paths."""
    from libml.data import records
    paths = {}
    for subset, (images, labels) in subsets.items():
        path = os.path.join(root, f"{name}-{subset}.tfrecord")
        records.write_records(path, zip(records.encode_png_images(images, parallel=1), labels.tolist()))
        paths[subset] = path
    return paths


def corrupt_file(path: str) -> None:
    """Flips bytes in the middle of a file (a TFRecord then fails its CRC check)."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        middle = len(data) // 2
        data[middle:middle + 16] = bytes(255 - b for b in data[middle:middle + 16])
        f.seek(0)
        f.write(data)


_MNIST5K_ROOT = None


def mnist5k_data(tmp_path_factory) -> str:
    """Folder holding mnist5k-train/test.tfrecord and -meta.json (written once per session).

    Tests must copy or read these files, never change them.
    """
    global _MNIST5K_ROOT
    if _MNIST5K_ROOT is None or not os.path.exists(os.path.join(_MNIST5K_ROOT, "mnist5k-train.tfrecord")):
        from data_prep import create_datasets
        root = str(tmp_path_factory.mktemp("mnist5k_data"))
        create_datasets.create("mnist5k", root)
        _MNIST5K_ROOT = root
    return _MNIST5K_ROOT
