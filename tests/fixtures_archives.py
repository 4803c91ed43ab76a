"""Tiny files in the real formats, for tests.

- ``write_cifar_archive``: ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` with the
  real pickle layout (or the ``-binary`` layout), returning the images it holds in order.
- ``write_svhn_mats``: ``train_32x32.mat`` etc. (X [32,32,3,N], y [N,1] in 1..10).
- ``write_image_folders``: class sub-folders of PNG/JPEG images.
- ``write_record_dataset``: ``{name}-train/test.tfrecord`` from arrays.
- ``mnist5k_data``: the real mnist5k records, written once per test session.
"""
import io
import os
import pickle
import tarfile
from typing import Dict, List, Optional, Tuple

import numpy as np

Arrays = Tuple[np.ndarray, np.ndarray]


def random_images(n: int, shape=(32, 32, 3), seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, size=(n,) + tuple(shape)).astype(np.uint8)


def _rows(images: np.ndarray) -> np.ndarray:
    """[N,32,32,3] -> CIFAR rows [N,3072] (red plane, green plane, blue plane)."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_cifar_archive(folder: str, dataset: str = "cifar10", per_batch: int = 6, n_test: int = 8,
                        seed: int = 0, layout: str = "python") -> Dict[str, Arrays]:
    """Writes a tiny CIFAR archive; returns {'train': (images, labels), 'test': ...} in order.

    cifar10: 5 train batches of `per_batch` images; cifar100: one 'train' member of
    5 * per_batch images, fine labels 0..99 and coarse labels.
    """
    rng = np.random.RandomState(seed)
    nclass = 10 if dataset == "cifar10" else 100
    n_train = 5 * per_batch
    images = random_images(n_train + n_test, seed=seed)
    labels = rng.randint(0, nclass, n_train + n_test).astype(np.int64)
    train, test = (images[:n_train], labels[:n_train]), (images[n_train:], labels[n_train:])
    if dataset == "cifar10":
        prefix = "cifar-10-batches-py" if layout == "python" else "cifar-10-batches-bin"
        members = [(f"data_batch_{i + 1}", slice(i * per_batch, (i + 1) * per_batch), "train") for i in range(5)]
        members.append(("test_batch", slice(0, n_test), "test"))
    else:
        prefix = "cifar-100-python" if layout == "python" else "cifar-100-binary"
        members = [("train", slice(0, n_train), "train"), ("test", slice(0, n_test), "test")]
    base = {"cifar10": "cifar-10", "cifar100": "cifar-100"}[dataset]
    path = os.path.join(folder, f"{base}-{layout}.tar.gz")
    os.makedirs(folder, exist_ok=True)
    splits = {"train": train, "test": test}
    with tarfile.open(path, "w:gz") as tar:
        for name, part, split in members:
            ims, labs = splits[split][0][part], splits[split][1][part]
            if layout == "python":
                batch = {b"batch_label": name.encode(), b"data": _rows(ims),
                         b"filenames": [f"{i}.png".encode() for i in range(len(ims))]}
                if dataset == "cifar10":
                    batch[b"labels"] = [int(x) for x in labs]
                else:
                    batch[b"fine_labels"] = [int(x) for x in labs]
                    batch[b"coarse_labels"] = [int(x) // 5 for x in labs]
                _add_member(tar, f"{prefix}/{name}", pickle.dumps(batch, protocol=2))
            else:
                lab = labs.astype(np.uint8)[:, None]
                if dataset == "cifar100":
                    lab = np.concatenate([lab // 5, lab], axis=1)
                _add_member(tar, f"{prefix}/{name}.bin", np.concatenate([lab, _rows(ims)], axis=1).tobytes())
        if layout == "python":
            if dataset == "cifar10":
                meta = {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog",
                                         b"frog", b"horse", b"ship", b"truck"]}
                _add_member(tar, f"{prefix}/batches.meta", pickle.dumps(meta, protocol=2))
            else:
                meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
                _add_member(tar, f"{prefix}/meta", pickle.dumps(meta, protocol=2))
    return splits


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
    from libml import records
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
