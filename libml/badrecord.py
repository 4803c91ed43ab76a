"""The damaged record behind a read error, named the same way wherever it was met.

A record can fail its checksum (DataLossError) or hold bytes that do not parse or decode as
an image of the dataset's shape (InvalidArgumentError, raised from inside tf.data with a long
TensorFlow prefix and stack). The cached path (small sets decoded once) and the streamed path
(large sets and Extend shards, decoded per batch while training) meet these at different
places; both call `locate(files, shape)` after the error, which rereads the files (in batches,
then record by record inside the failing batch) and returns where and why, and `message()`
makes the one line: `corrupt TFRecord {file} (record {i}: {cause}): delete it and re-create it
with `{command}``.

`tf_cause(error)` is the readable cause of a TensorFlow error: without the
`{{function_node ...}}` prefix, the `[Op:...]` suffix, "Graph execution error ... Detected at
node ... File ..." stacks and tf.data's "Error in user-defined function passed to ...:" prefix.
"""
import dataclasses
import re
from typing import Optional, Sequence

import tensorflow as tf

READ_ERRORS = (tf.errors.DataLossError, tf.errors.InvalidArgumentError)
SCAN_BATCH = 1024
_NOISE = [
    re.compile(r"\{\{function_node [^}]*\}\}\s*"),
    re.compile(r"\s*\[Op:[^\]]*\](\s*name:\s*\S*)?"),
    re.compile(r"Error in user-defined function passed to \S+ transformation with iterator: "
               r"[\w:]+: "),
    re.compile(r"\[\[\{\{node [^}]*\}\}\]\]"),
]


def tf_cause(error: BaseException, limit: int = 200) -> str:
    """One readable line: the cause of a TensorFlow error without TF's internals."""
    text = getattr(error, "message", None) or str(error)
    lines = []
    skipping_stack = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("Graph execution error", "Detected at node")):
            skipping_stack = True
            continue
        if skipping_stack and (not stripped or stripped.startswith("File ")):
            continue
        skipping_stack = False
        for pattern in _NOISE:
            stripped = pattern.sub("", stripped)
        stripped = stripped.strip(" ;:\t")
        if stripped:
            lines.append(stripped)
    cause = lines[0] if lines else type(error).__name__
    return cause[:limit]


@dataclasses.dataclass(frozen=True)
class BadRecord:
    path: str
    index: int          # 0-based position of the record in its file
    cause: str


def message(bad: BadRecord, how_to_create: str = "", after: str = "") -> str:
    fix = f"delete it and re-create it with `{how_to_create}`" if how_to_create else \
        "delete it and re-create it with the data_prep command that wrote it"
    return (f"corrupt TFRecord {bad.path} (record {bad.index}: {bad.cause}): {fix}"
            + (f"; {after}" if after else ""))


def _checker(shape: Optional[Sequence[int]]):
    from libml.records import FEATURES
    channels = int(shape[-1]) if shape else 0
    expected = tf.constant(list(shape), tf.int32) if shape else None

    def check(serialized):
        example = tf.io.parse_single_example(serialized, FEATURES)
        image = tf.io.decode_image(example["image"], channels=channels, expand_animations=False)
        if expected is not None:
            tf.debugging.assert_equal(tf.shape(image), expected,
                                      message=f"image shape differs from the dataset's {list(shape)}")
        return tf.constant(0, tf.int8)

    return check


def locate(files: Sequence[str], shape: Optional[Sequence[int]] = None,
           batch: int = SCAN_BATCH) -> Optional[BadRecord]:
    """The first record of `files` (in order) that fails its checksum, does not parse or does
    not decode to an image of `shape` (HxWxC; None: any); None if all read back."""
    check = _checker(shape)
    for path in files:
        done = 0
        ds = tf.data.TFRecordDataset(path).map(check, num_parallel_calls=tf.data.AUTOTUNE,
                                                deterministic=True).batch(batch)
        try:
            for flags in ds:
                done += int(flags.shape[0])
        except READ_ERRORS as e:
            return _within(path, done, batch, check) or BadRecord(path, done, tf_cause(e))
    return None


def _within(path: str, start: int, count: int, check) -> Optional[BadRecord]:
    """Record by record from `start`: the first that fails."""
    check_one = tf.function(check, autograph=False)
    iterator = iter(tf.data.TFRecordDataset(path).skip(start).take(count))
    index = start
    while True:
        try:
            record = next(iterator)
        except StopIteration:
            return None
        except READ_ERRORS as e:
            return BadRecord(path, index, tf_cause(e))
        try:
            check_one(record)
        except READ_ERRORS as e:
            return BadRecord(path, index, tf_cause(e))
        index += 1
