"""Helpers shared by the data-preparation scripts.

Flags: every script defines its flags on its own ``absl.flags.FlagValues`` (not the global
``flags.FLAGS``), so that several scripts can be imported in one process (tests, notebooks)
without "flag defined twice" errors, and ``--size`` can mean the number of labels in
create_split and the image size in create_datasets. ``parse_flags`` turns bad flags into a
one-line ``UserError``; scripts end with ``run_cli(main)`` (exit code 2 on a UserError).
"""
import hashlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # keep TensorFlow's start-up logs off the console
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np

from libml import cli, io, records
from libml.errors import UserError

META_KEYS = ("name", "nclass", "height", "width", "channels", "flip", "class_names")


# ----------------------------------------------------------------------------------------
# Flags

parse_flags = cli.parse   # deprecated alias


# ----------------------------------------------------------------------------------------
# Outputs

require_free = io.require_free   # deprecated alias


def write_json(path: str, obj, overwrite: bool = False) -> None:
    io.write_json(path, obj, overwrite)


def meta_path(root: str, name: str) -> str:
    return os.path.join(root, f"{name}-meta.json")


def make_meta(name: str, nclass: int, shape: Sequence[int], flip: bool,
              class_names: Sequence[str]) -> dict:
    height, width, channels = (int(x) for x in shape)
    return {"name": name, "nclass": int(nclass), "height": height, "width": width,
            "channels": channels, "flip": bool(flip), "class_names": [str(c) for c in class_names]}


def read_meta(root: str, name: str) -> Optional[dict]:
    path = meta_path(root, name)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"unreadable {path} ({e}): delete it and re-create the dataset") from None


# ----------------------------------------------------------------------------------------
# Records

def read_serialized(paths: Sequence[str], progress: Optional[str] = None,
                    total: Optional[int] = None) -> Iterator[bytes]:
    """Serialized records of several files in order; corrupt files become a UserError."""
    stream = (r for p in paths for r in records.iterate_serialized(p))
    return show_progress(stream, progress, total)


def read_labels(paths: Sequence[str]) -> np.ndarray:
    """Labels of all records of several files, in order (no image decoding)."""
    parts = [records.load_labels(p) for p in paths]
    return np.concatenate(parts) if parts else np.zeros([0], np.int64)


def relabel(serialized: bytes, label: int) -> bytes:
    """The same record with another label; the PNG bytes are kept as they are."""
    import tensorflow as tf
    example = tf.train.Example.FromString(serialized)
    values = example.features.feature["label"].int64_list.value
    del values[:]
    values.append(int(label))
    return example.SerializeToString()


def image_digest(image: np.ndarray) -> bytes:
    """SHA-512 of the decoded pixels and shape (so re-encoded PNGs still match)."""
    h = hashlib.sha512(str(tuple(image.shape)).encode())
    h.update(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
    return h.digest()


show_progress = io.progress   # deprecated alias
