"""Dataset metadata in one place: the built-in datasets, class names, and {name}-meta.json.

``dataset_info(name, root)`` answers "how many classes, which image shape, may it be
flipped" for any dataset the trainer may meet: the built-in REGISTRY first, else the
``{name}-meta.json`` that data_prep wrote (``write_meta``), else a guess from the records of
a file made by another tool (shape of the first image, classes from the largest label).
"""
import dataclasses
import json
import re
from typing import Optional, Sequence, Tuple, Union

import tensorflow as tf

from libml.base import files as io

from libml.data import names

from libml.data import records
from libml.base.errors import UserError
from libml.data.names import DatasetName

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
DIGITS = tuple(str(i) for i in range(10))
SVHN_CLASSES = tuple(str((i + 1) % 10) for i in range(10))   # the .mat files: label 0 is digit 1
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
SHIFT = 4          # training translation in pixels (spec §4); libml's augment_stl10 uses 12
_EXTENDED = re.compile(r"^(?P<base>.+)_aug\d+$")    # released make_aug_copy names: cifar10_aug50


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    nclass: int
    height: int
    width: int
    channels: int
    flip: bool
    class_names: Tuple[str, ...] = ()
    shift: int = SHIFT             # training translation range in pixels

    @property
    def shape(self) -> Tuple[int, int, int]:
        return (self.height, self.width, self.channels)


REGISTRY = {
    "cifar10": DatasetInfo("cifar10", 10, 32, 32, 3, True, CIFAR10_CLASSES),
    "cifar100": DatasetInfo("cifar100", 100, 32, 32, 3, True),
    "svhn": DatasetInfo("svhn", 10, 32, 32, 3, False, SVHN_CLASSES),
    "svhn_noextra": DatasetInfo("svhn_noextra", 10, 32, 32, 3, False, SVHN_CLASSES),
    "mnist5k": DatasetInfo("mnist5k", 10, 32, 32, 1, False, DIGITS),
    "stl10": DatasetInfo("stl10", 10, 96, 96, 3, True, STL10_CLASSES, shift=12),
}


# ---------------------------------------------------------------------------------------------
# {name}-meta.json

def make_meta(name: str, nclass: int, shape: Sequence[int], flip: bool,
              class_names: Sequence[str], shift: int = SHIFT) -> dict:
    """The meta.json dict; `shift` is written only when it differs from the default 4."""
    height, width, channels = (int(x) for x in shape)
    meta = {"name": name, "nclass": int(nclass), "height": height, "width": width,
            "channels": channels, "flip": bool(flip), "class_names": [str(c) for c in class_names]}
    if shift != SHIFT:
        meta["shift"] = int(shift)
    return meta


def write_meta(root: str, meta: dict, overwrite: bool = False) -> str:
    path = names.meta_path(root, meta["name"])
    io.write_json(path, meta, overwrite)
    return path


def read_meta(root: str, name: str) -> Optional[dict]:
    """The metadata dict of {root}/{name}-meta.json, or None when there is none."""
    path = names.meta_path(root, name)
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)
    except (OSError, ValueError, tf.errors.OpError) as e:
        raise UserError(f"unreadable {path} ({e}): delete it and re-create the dataset") from None


def info_from_meta(meta: dict, name: str, path: str) -> DatasetInfo:
    try:
        return DatasetInfo(name=name, nclass=int(meta["nclass"]), height=int(meta["height"]),
                           width=int(meta["width"]), channels=int(meta["channels"]),
                           flip=bool(meta.get("flip", True)),
                           class_names=tuple(meta.get("class_names", ())),
                           shift=int(meta.get("shift", SHIFT)))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"malformed dataset metadata {path} ({type(e).__name__}: {e}): fix it or "
                        f"delete it to infer the metadata from the records") from None


# ---------------------------------------------------------------------------------------------
# Lookup

def dataset_info(name: Union[str, DatasetName], root: str) -> DatasetInfo:
    """Metadata of a dataset: built-in registry, else {name}-meta.json, else inferred.

    `name` is a base name (cifar10) or a full dataset name (cifar10.3@250-5000). Mismatch sets
    (cifar6_mismatch*) keep CIFAR-10 labels, hence 10 classes, unless their meta file says
    otherwise; released `{base}_aug{K}` names inherit the base dataset's metadata.
    """
    base = _base_name(name)
    if base in REGISTRY:
        return REGISTRY[base]
    meta = read_meta(root, base)
    if meta is not None:
        return info_from_meta(meta, base, names.meta_path(root, base))
    if names.MISMATCH.match(base):
        return dataclasses.replace(REGISTRY["cifar10"], name=base)
    extended = _EXTENDED.match(base)
    if extended and (extended["base"] in REGISTRY
                     or tf.io.gfile.exists(names.meta_path(root, extended["base"]))):
        return dataclasses.replace(dataset_info(extended["base"], root), name=base)
    return _infer_info(base, root)


def require_shape(info: DatasetInfo, root: str, path: str, how_to_create: str) -> None:
    """A UserError when the images of `path` do not have the dataset's shape."""
    shape = records.first_image_shape(path, how_to_create)
    if shape != info.shape:
        raise UserError(f"{path} holds {'x'.join(map(str, shape))} images but {info.name} is "
                        f"{'x'.join(map(str, info.shape))}: re-create the file, or fix "
                        f"{names.meta_path(root, info.name)}")


def _base_name(name: Union[str, DatasetName]) -> str:
    if isinstance(name, DatasetName):
        return name.name
    return names.parse_dataset_name(name).name if "." in name else name


def _infer_info(name: str, root: str) -> DatasetInfo:
    """Shape from the first record, classes from the largest label (files of other tools)."""
    candidates = [names.test_path(root, name), names.train_path(root, name)]
    path = next((p for p in candidates if tf.io.gfile.exists(p)), None)
    how_to_create = names.create_dataset_command(name, root)
    if path is None:
        raise UserError(f"unknown dataset {name!r}: no {names.meta_path(root, name)} and no "
                        f"{candidates[0]} to infer it from; create it with `{how_to_create}`")
    shape = records.first_image_shape(path, how_to_create)
    nclass = int(records.load_labels(path).max(initial=-1)) + 1
    if nclass < 1:
        raise UserError(f"cannot infer the classes of {name!r}: {path} has no labeled record; "
                        f"write {names.meta_path(root, name)} with its nclass")
    return DatasetInfo(name, nclass, *shape, flip=True)
