"""TFRecord I/O in the MixMatch/FixMatch/RealMix format.

Each record is a ``tf.train.Example`` with ``image`` (one PNG-encoded uint8 HxWxC image,
bytes) and ``label`` (one int64). Writers never touch an existing file unless asked to, and
write to a temporary name that is renamed only when the file is complete.
"""
import os
from typing import Iterable, Iterator, Optional, Tuple

import numpy as np
import tensorflow as tf

from libml import io
from libml.errors import UserError, first_line

FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


def serialize_example(png: bytes, label: int) -> bytes:
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_example(serialized):
    """tf.data-friendly parse: returns {'image': PNG bytes, 'label': int64}."""
    return tf.io.parse_single_example(serialized, FEATURES)


def decode_image(png, channels: int = 0):
    """PNG (or JPEG) bytes to a uint8 HxWxC tensor."""
    return tf.io.decode_image(png, channels=channels, expand_animations=False)


def encode_png_images(images: np.ndarray, parallel: Optional[int] = None) -> Iterator[bytes]:
    """Encodes uint8 [N,H,W,C] images to PNG bytes, in order, in parallel tf.data workers."""
    ds = tf.data.Dataset.from_tensor_slices(images).map(
        tf.io.encode_png, num_parallel_calls=parallel or tf.data.AUTOTUNE, deterministic=True)
    for png in ds.as_numpy_iterator():
        yield png


# Deprecated aliases (libml.io is the one copy); removed once every caller has switched.
check_overwrite = io.check_overwrite
atomic_path = io.atomic_path


def write_records(path: str, examples: Iterable[Tuple[bytes, int]], overwrite: bool = False,
                  progress: Optional[str] = None, total: Optional[int] = None) -> int:
    """Writes (png_bytes, label) pairs to `path` atomically; returns the record count."""
    count = 0
    with atomic_path(path, overwrite) as tmp:
        with tf.io.TFRecordWriter(tmp) as writer:
            for png, label in io.progress(examples, progress, total):
                writer.write(serialize_example(png, label))
                count += 1
    return count


def write_serialized(path: str, records: Iterable[bytes], overwrite: bool = False,
                     progress: Optional[str] = None, total: Optional[int] = None) -> int:
    """Writes already-serialized records (e.g. copied from another file) atomically."""
    count = 0
    with atomic_path(path, overwrite) as tmp:
        with tf.io.TFRecordWriter(tmp) as writer:
            for record in io.progress(records, progress, total):
                writer.write(record)
                count += 1
    return count


def require_file(path: str, how_to_create: str) -> str:
    """Raises a UserError naming the missing file and the command that creates it."""
    if not tf.io.gfile.exists(path):
        raise UserError(f"missing {path}: create it with `{how_to_create}`")
    return path


def raw_records(path: str) -> tf.data.Dataset:
    return tf.data.TFRecordDataset(path)


def iterate_serialized(path: str) -> Iterator[bytes]:
    """Yields serialized records of `path`; a corrupt file becomes a UserError naming it."""
    try:
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            yield record
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        raise UserError(f"corrupt TFRecord {path} ({first_line(e)}): delete it and re-create it") from None


def load_numpy(path: str, progress: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Reads a whole record file into (uint8 images [N,H,W,C], int64 labels [N])."""
    ds = tf.data.TFRecordDataset(path).map(parse_example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda r: (decode_image(r["image"]), r["label"]),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    images, labels = [], []
    try:
        for image, label in io.progress(ds.as_numpy_iterator(), progress):
            images.append(image)
            labels.append(label)
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        raise UserError(f"corrupt TFRecord {path} ({first_line(e)}): delete it and re-create it") from None
    if not images:
        return np.zeros([0, 0, 0, 0], np.uint8), np.zeros([0], np.int64)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise UserError(f"{path} mixes image shapes {sorted(shapes)}: re-create it with one --size")
    return np.stack(images), np.asarray(labels, np.int64)


def load_labels(path: str) -> np.ndarray:
    """Reads only the labels of a record file (fast: no image decoding)."""
    ds = tf.data.TFRecordDataset(path).map(lambda r: parse_example(r)["label"],
                                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    try:
        return np.fromiter(ds.as_numpy_iterator(), np.int64)
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        raise UserError(f"corrupt TFRecord {path} ({first_line(e)}): delete it and re-create it") from None
