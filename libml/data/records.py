"""TFRecord I/O in the MixMatch/FixMatch/RealMix format.

Each record is a ``tf.train.Example`` with ``image`` (one PNG-encoded uint8 HxWxC image,
bytes) and ``label`` (one int64). Records written from a user's image files (``create_datasets
custom``) also carry ``source`` (the file's absolute path, UTF-8 bytes): readers parse the
features they name and ignore the others (tf.io.parse_example, the original libml readers),
so files with or without it read alike; `load_sources` reads it ("" where absent). Writers never touch an existing file unless asked to, and
write to a temporary name that is renamed only when the file is complete (libml.base.files). A read
error names the damaged file and, where known, the command that re-creates it.
"""
import dataclasses
from typing import Iterable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from libml.base import files as io
from libml.base.errors import UserError, first_line

FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}
_READ_ERRORS = (tf.errors.DataLossError, tf.errors.InvalidArgumentError)
Paths = Union[str, Sequence[str]]

# ---------------------------------------------------------------------------------------------
# Encoding

SOURCE = "source"       # optional feature: the image file a record was made from


def serialize_example(png: bytes, label: int, source: Optional[str] = None) -> bytes:
    """A serialized tf.train.Example {image: png, label: label} (+ {source: path} if given).

    Deterministic serialisation (keys in sorted order): Extend promises byte-identical shards
    for one seed, and protobuf's default does not promise a map order.
    """
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }
    if source:
        feature[SOURCE] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[source.encode("utf-8")]))
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def relabel(serialized: bytes, label: int) -> bytes:
    """The same record with another label; the PNG bytes (and the source path) are kept."""
    features = tf.train.Example.FromString(serialized).features.feature
    source = features[SOURCE].bytes_list.value[0].decode("utf-8") if SOURCE in features else None
    return serialize_example(features["image"].bytes_list.value[0], label, source)


def parse_example(serialized):
    """tf.data-friendly parse: returns {'image': PNG bytes, 'label': int64}."""
    return tf.io.parse_single_example(serialized, FEATURES)


def decode_image(png, channels: int = 0):
    """PNG (or JPEG) bytes to a uint8 HxWxC tensor."""
    return tf.io.decode_image(png, channels=channels, expand_animations=False)


def encode_png_images(images: np.ndarray, parallel: Optional[int] = None,
                      chunk: int = 8192) -> Iterator[bytes]:
    """Encodes uint8 [N,H,W,C] images to PNG bytes, in order, in parallel tf.data workers
    (`chunk` images at a time, so that each tf.data input stays small)."""
    for start in range(0, len(images), chunk):
        ds = tf.data.Dataset.from_tensor_slices(images[start:start + chunk]).map(
            tf.io.encode_png, num_parallel_calls=parallel or tf.data.AUTOTUNE, deterministic=True)
        yield from ds.as_numpy_iterator()


# ---------------------------------------------------------------------------------------------
# Writing

def write_records(path: str, examples: Iterable[Tuple], overwrite: bool = False,
                  progress: Optional[str] = None, total: Optional[int] = None) -> int:
    """Writes (png_bytes, label) or (png_bytes, label, source path) tuples to `path`
    atomically; returns the record count."""
    return write_serialized(path, (serialize_example(*example) for example in examples),
                            overwrite, progress, total)


def write_images(path: str, images: np.ndarray, labels, overwrite: bool = False,
                 progress: Optional[str] = None, sources: Optional[Sequence[str]] = None) -> int:
    """Writes uint8 [N,H,W,C] images with their labels (and source paths) as PNG records."""
    labels = np.asarray(labels, np.int64).tolist()
    columns = [encode_png_images(images), labels] + ([list(sources)] if sources is not None else [])
    if sources is not None and len(columns[2]) != len(labels):
        raise ValueError(f"{len(columns[2])} source paths for {len(labels)} images")
    return write_records(path, zip(*columns), overwrite, progress, len(labels))


def write_serialized(path: str, records: Iterable[bytes], overwrite: bool = False,
                     progress: Optional[str] = None, total: Optional[int] = None) -> int:
    """Writes already-serialized records (e.g. copied from another file) atomically. On a full
    disk the space needed is extrapolated from what was written (when `total` is known)."""
    count = written = 0

    def need() -> int:
        return written * total // count if total and count else written

    with io.atomic_path(path, overwrite, need_bytes=need) as tmp:
        with tf.io.TFRecordWriter(tmp) as writer:
            for record in io.progress(records, progress, total):
                writer.write(record)
                count += 1
                written += len(record) + 16      # TFRecord framing: length, 2 CRCs
    return count


# ---------------------------------------------------------------------------------------------
# Reading

def require_file(path: str, how_to_create: str) -> str:
    """Raises a UserError naming the missing file and the command that creates it."""
    if not tf.io.gfile.exists(path):
        raise UserError(f"missing {path}: create it with `{how_to_create}`")
    return path


def corrupt_error(path: str, error: Union[Exception, str], how_to_create: str = "",
                  index: Optional[int] = None) -> UserError:
    """The one-line error of a damaged record file (with the record's index when known)."""
    how = f" with `{how_to_create}`" if how_to_create else ""
    cause = error if isinstance(error, str) else first_line(error)
    where = f"record {index}: " if index is not None else ""
    return UserError(f"corrupt TFRecord {path} ({where}{cause}): delete it and re-create it{how}")


@dataclasses.dataclass(frozen=True)
class BadRecord:
    path: str
    index: int          # 0-based position of the record in its file
    cause: str

    def error(self, how_to_create: str = "", after: str = "") -> UserError:
        e = corrupt_error(self.path, self.cause, how_to_create, self.index)
        return UserError(f"{e}; {after}") if after else e


def _record_checker(shape: Optional[Sequence[int]]):
    """A graph function that fails on a record that does not parse, or whose image does not
    decode to `shape` (HxWxC; None: any image)."""
    channels = int(shape[-1]) if shape else 0

    def check(serialized):
        image = decode_image(parse_example(serialized)["image"], channels)
        if shape:
            tf.debugging.assert_equal(tf.shape(image), tf.constant(list(shape), tf.int32),
                                      message=f"image shape differs from the dataset's {list(shape)}")
        return tf.constant(0, tf.int8)

    return check


def find_bad_record(paths: Paths, shape: Optional[Sequence[int]] = None,
                    batch: int = 1024) -> Optional[BadRecord]:
    """The first record of the files (in order) that fails its checksum, does not parse or does
    not decode to an image of `shape`; None if all read back. Reads in batches, then record by
    record inside the failing batch: call it after a read error, to name the culprit."""
    check = _record_checker(shape)
    for path in [paths] if isinstance(paths, str) else paths:
        done = 0
        ds = tf.data.TFRecordDataset(path).map(check, num_parallel_calls=tf.data.AUTOTUNE,
                                                deterministic=True).batch(batch)
        try:
            for flags in ds:
                done += int(flags.shape[0])
        except _READ_ERRORS as e:
            return _first_bad(path, done, batch, check) or BadRecord(path, done, first_line(e))
    return None


def _first_bad(path: str, start: int, count: int, check) -> Optional[BadRecord]:
    check_one = tf.function(check, autograph=False)
    iterator = iter(tf.data.TFRecordDataset(path).skip(start).take(count))
    for index in range(start, start + count):
        try:
            check_one(next(iterator))
        except StopIteration:
            return None
        except _READ_ERRORS as e:
            return BadRecord(path, index, first_line(e))
    return None


def iterate_serialized(paths: Paths, progress: Optional[str] = None,
                       total: Optional[int] = None) -> Iterator[bytes]:
    """Serialized records of one file or several, in order; a corrupt file is a UserError."""
    def stream():
        for path in [paths] if isinstance(paths, str) else paths:
            try:
                yield from tf.data.TFRecordDataset(path).as_numpy_iterator()
            except _READ_ERRORS as e:
                raise corrupt_error(path, e) from None
    return io.progress(stream(), progress, total)


def count_at_most(path: str, limit: int = -1, how_to_create: str = "") -> int:
    """Number of records of `path`, counting no further than `limit` (-1: all)."""
    ds = tf.data.TFRecordDataset(path).take(limit)
    try:
        return int(ds.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))
    except _READ_ERRORS as e:
        raise corrupt_error(path, e, how_to_create) from None


def first_image_shape(path: str, how_to_create: str = "") -> Tuple[int, int, int]:
    """Shape of the first image of `path` (a UserError if it holds none)."""
    try:
        first = list(tf.data.TFRecordDataset(path).take(1))
        if not first:
            raise UserError(f"{path} holds no records: re-create it with `{how_to_create}`")
        image = decode_image(parse_example(first[0])["image"])
    except _READ_ERRORS as e:
        raise corrupt_error(path, e, how_to_create) from None
    return tuple(int(s) for s in image.shape)


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
    except _READ_ERRORS as e:
        raise corrupt_error(path, e) from None
    if not images:
        return np.zeros([0, 0, 0, 0], np.uint8), np.zeros([0], np.int64)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise UserError(f"{path} mixes image shapes {sorted(shapes)}: re-create it with one --size")
    return np.stack(images), np.asarray(labels, np.int64)


def load_sources(paths: Paths) -> list:
    """The source path of every record of one file or several, in order: what `create_datasets
    custom` recorded, "" for records without one (other datasets, files written before)."""
    spec = {SOURCE: tf.io.FixedLenFeature([], tf.string, default_value="")}
    result = []
    for path in [paths] if isinstance(paths, str) else paths:
        ds = tf.data.TFRecordDataset(path).map(lambda r: tf.io.parse_single_example(r, spec)[SOURCE],
                                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        try:
            result += [s.decode("utf-8", errors="replace") for s in ds.as_numpy_iterator()]
        except _READ_ERRORS as e:
            raise corrupt_error(path, e) from None
    return result


def load_labels(paths: Paths) -> np.ndarray:
    """Labels of all records of one file or several, in order (fast: no image decoding)."""
    parts = [np.zeros([0], np.int64)]
    for path in [paths] if isinstance(paths, str) else paths:
        ds = tf.data.TFRecordDataset(path).map(lambda r: parse_example(r)["label"],
                                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        try:
            parts.append(np.fromiter(ds.as_numpy_iterator(), np.int64))
        except _READ_ERRORS as e:
            raise corrupt_error(path, e) from None
    return np.concatenate(parts)
