"""Synthetic inputs of the benchmarks under runs/ (the tests reuse the archive writer).

- ``synthetic_images``: CIFAR-like 32x32 images (smooth colour fields plus noise) whose PNGs
  average ~2.4 KB, about CIFAR-10's size: PNG costs depend on that, not on the content.
- ``make_ssl_dataset``: a prepared split in the $ML_DATA layout (label, unlabel, test, meta and
  optionally shard files of the unlabeled set), written once and reused.
- ``write_cifar_archive``: ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` in the real
  pickle layout (or the ``-binary`` layout), returning the images it holds in order.
"""
import dataclasses
import io
import os
import pickle
import tarfile
from typing import Dict, List, Tuple

import numpy as np

from libml.data import datasets

from libml.data import names

from libml.data import records

Arrays = Tuple[np.ndarray, np.ndarray]


def synthetic_images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """Smooth 6x6 colour fields upsampled to size x size (bicubic) plus mild noise, uint8."""
    import tensorflow as tf
    rng = np.random.RandomState(seed)
    out = np.empty([n, size, size, 3], np.uint8)
    for start in range(0, n, 4096):
        m = min(4096, n - start)
        base = rng.randint(0, 256, (m, 6, 6, 3)).astype(np.float32)
        smooth = tf.image.resize(base, (size, size), "bicubic").numpy()
        out[start:start + m] = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    return out


@dataclasses.dataclass
class BenchDataset:
    root: str
    name: str                 # full dataset name, e.g. "synth.1@250-5000"
    shards: List[str]         # the unlabeled set split into shard files (Extend-like input)


def make_ssl_dataset(root: str, name: str = "synth", nclass: int = 10, nlabeled: int = 250,
                     nunlabeled: int = 10000, nvalid: int = 1, ntest: int = 1000, size: int = 32,
                     shards: int = 0, seed: int = 1) -> BenchDataset:
    """Writes {name}-test, SSL/{name}.{seed}@{nlabeled}-label/-unlabel, {name}-meta.json and
    `shards` files {name}-shard{i} (every shards-th unlabeled image), unless already there."""
    root = str(root)
    d = names.parse_dataset_name(f"{name}.{seed}@{nlabeled}-{nvalid}")
    shard_paths = [names.subset_path(root, name, f"shard{i}") for i in range(shards)]
    if all(os.path.exists(p) for p in [d.unlabel_path(root), *shard_paths]):
        return BenchDataset(root, str(d), shard_paths)
    images = synthetic_images(nlabeled + nunlabeled + ntest, seed, size)
    labels = np.arange(len(images), dtype=np.int64) % nclass
    parts = {d.label_path(root): slice(0, nlabeled),
             d.unlabel_path(root): slice(nlabeled, nlabeled + nunlabeled),
             d.test_path(root): slice(nlabeled + nunlabeled, None)}
    parts.update({p: slice(nlabeled + i, nlabeled + nunlabeled, shards) for i, p in enumerate(shard_paths)})
    for path, rows in parts.items():
        records.write_images(path, images[rows], labels[rows], overwrite=True,
                             progress=f"writing {os.path.basename(path)}")
    datasets.write_meta(root, datasets.make_meta(name, nclass, (size, size, 3), True, []), overwrite=True)
    return BenchDataset(root, str(d), shard_paths)


# ---------------------------------------------------------------------------------------------
# CIFAR archives in the original formats

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
