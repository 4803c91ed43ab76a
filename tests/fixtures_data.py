"""Small prepared datasets for tests: real record files in the $ML_DATA layout.

    from tests.fixtures_data import make_ssl_dataset
    toy = make_ssl_dataset(tmp_path)             # writes toy-test, SSL/toy.1@30-label/-unlabel
    data = load_ssl(toy.name, toy.root, options=test_options())

Images are class-dependent (a per-class colour plus noise), so a model can learn them.
"""
import dataclasses
import json
import os
from typing import Tuple

import numpy as np

from libml.data import records

@dataclasses.dataclass
class ToyDataset:
    root: str
    name: str                     # full dataset name, e.g. "toy.1@30-10"
    labeled: Tuple[np.ndarray, np.ndarray]     # (uint8 [N,H,W,C], int64 [N]) as written
    unlabeled: Tuple[np.ndarray, np.ndarray]   # the whole -unlabel file (validation first)
    test: Tuple[np.ndarray, np.ndarray]
    label_path: str
    unlabel_path: str
    test_path: str
    meta_path: str


def toy_images(count: int, nclass: int, size: int = 8, channels: int = 3, seed: int = 0,
               labels=None):
    """(uint8 [count,size,size,channels], int64 labels) with a per-class colour plus noise."""
    rng = np.random.RandomState(seed)
    if labels is None:
        labels = np.arange(count) % nclass
    labels = np.asarray(labels, np.int64)
    palette = np.random.RandomState(1234).randint(0, 256, size=[max(nclass, 1), channels])
    base = palette[np.maximum(labels, 0) % max(nclass, 1)][:, None, None, :]
    noise = rng.randint(-40, 41, size=[count, size, size, channels])
    images = np.clip(base + noise, 0, 255).astype(np.uint8)
    return images, labels


def write_set(path: str, images: np.ndarray, labels: np.ndarray, overwrite: bool = False) -> str:
    pngs = records.encode_png_images(images)
    records.write_records(path, zip(pngs, labels.tolist()), overwrite=overwrite)
    return path


def make_ssl_dataset(root, name: str = "toy", nclass: int = 3, nlabeled: int = 30,
                     nunlabeled: int = 120, nvalid: int = 10, ntest: int = 30, size: int = 8,
                     channels: int = 3, seed: int = 1, flip: bool = True, write_meta: bool = True,
                     unlabeled_labels=None) -> ToyDataset:
    """Writes {root}/{name}-test.tfrecord, {root}/SSL/{name}.{seed}@{nlabeled}-label/-unlabel
    (.tfrecord) and, if write_meta, {root}/{name}-meta.json. Returns paths and the arrays written.
    `unlabeled_labels` overrides the unlabeled labels (e.g. -1 for unknown)."""
    root = str(root)
    os.makedirs(os.path.join(root, "SSL"), exist_ok=True)
    split = os.path.join(root, "SSL", f"{name}.{seed}@{nlabeled}")
    labeled = toy_images(nlabeled, nclass, size, channels, seed=seed * 3 + 0)
    unlabeled = toy_images(nunlabeled, nclass, size, channels, seed=seed * 3 + 1, labels=unlabeled_labels)
    test = toy_images(ntest, nclass, size, channels, seed=seed * 3 + 2)
    paths = dict(label_path=split + "-label.tfrecord", unlabel_path=split + "-unlabel.tfrecord",
                 test_path=os.path.join(root, f"{name}-test.tfrecord"))
    write_set(paths["label_path"], *labeled)
    write_set(paths["unlabel_path"], *unlabeled)
    write_set(paths["test_path"], *test)
    meta = os.path.join(root, f"{name}-meta.json")
    if write_meta:
        with open(meta, "w") as f:
            json.dump({"name": name, "nclass": nclass, "height": size, "width": size,
                       "channels": channels, "flip": flip,
                       "class_names": [f"class{i}" for i in range(nclass)]}, f)
    return ToyDataset(root=root, name=f"{name}.{seed}@{nlabeled}-{nvalid}", labeled=labeled,
                      unlabeled=unlabeled, test=test, meta_path=meta, **paths)


def test_options():
    """tf.data options for tests: autotune off (many small pipelines on a shared CPU)."""
    import tensorflow as tf
    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = True
    return options


test_options.__test__ = False    # not a pytest test when imported into a test module
