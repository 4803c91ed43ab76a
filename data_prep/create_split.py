"""Labeled/unlabeled split of record files, with the MixMatch/RealMix algorithm (spec §3.3).

    python -m data_prep.create_split --seed=3 --size=250 $ML_DATA/SSL/cifar10 $ML_DATA/cifar10-train.tfrecord

writes ``{prefix}.{seed}@{size}-label.tfrecord``, ``-unlabel.tfrecord`` and ``-map.json``.
The labeled indices are the ones the original script picks for the same input and seed:
each class list is shuffled with numpy's legacy MT19937 (seeded like ``np.random.seed``),
then labels are drawn class by class in proportion to the class sizes. The unlabeled file is
written in the original near round-robin class order, so its first records (the validation
set) are class balanced. Records are copied byte for byte.

Extension: records with a negative label ("unknown", e.g. the unlabeled folder of a custom
dataset, STL-10's unlabeled set) are never labeled, and they come last in the unlabeled file,
in input order, after every labeled record not chosen for the labeled set. So the validation
set (the first nvalid records) is made of labeled images whenever nvalid is at most the number
of labeled images left over (written to -map.json as `unlabel_labeled_first` when unknown
labels follow them); the trainer refuses a larger nvalid in one line. Without unknown
labels the order is exactly the original one.
"""
import collections
import os
from typing import List, Sequence

import numpy as np
from absl import flags

from libml.base import cli

from libml.base import files
from libml.data import names

from libml.data import records
from libml.base.errors import UserError

FLAGS = flags.FlagValues()
flags.DEFINE_integer("seed", 0, "Shuffling seed; 0 = no shuffling (first images of each class).",
                     flag_values=FLAGS)
flags.DEFINE_integer("size", 0, "Number of labeled images (required).", flag_values=FLAGS)
flags.DEFINE_alias("label_split_size", "size", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace existing split files.", flag_values=FLAGS)


# ----------------------------------------------------------------------------------------
# The algorithm (pure functions on the label array)

def class_fractions(counts: np.ndarray) -> np.ndarray:
    """Each class size over the largest one (all 1.0 for a balanced set)."""
    counts = np.asarray(counts, np.float64)
    return counts / max(counts.max(), 1.0)


def _most_behind(fractions: np.ndarray, npos: np.ndarray) -> int:
    """The class whose drawn share lags its size the most; ties go to the lowest index.

    A class id with no image (a gap in the ids, e.g. the 4 CIFAR-10 classes of a mismatch
    set) is never chosen: the released code let it win the ties, which ended the
    interleaving of the unlabeled file and failed the labeled draw (docs/fidelity.md).
    """
    lag = fractions - npos / max(npos.max(), 1)
    return int(np.argmax(np.where(fractions > 0, lag, -np.inf)))


def choose_labeled(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Positions of the labeled records, in drawing order (spec §3.3)."""
    labels = np.asarray(labels, np.int64)
    known = labels[labels >= 0]
    if size < 1:
        raise UserError(f"--size={size}: ask for at least 1 labeled image")
    if not len(known):
        raise UserError("the input has no labeled images (every label is -1): pass a record file "
                        "with labels, e.g. {name}-train.tfrecord")
    if size > len(known):
        raise UserError(f"{size} labels requested but the input has only {len(known)} labeled images: "
                        f"use --size={len(known)} or less")
    nclass = int(known.max()) + 1
    counts = np.bincount(known, minlength=nclass)
    fractions = class_fractions(counts)
    class_ids = [np.flatnonzero(labels == c) for c in range(nclass)]
    if seed:
        rng = np.random.RandomState(seed)   # same stream as the original np.random.seed(seed)
        for ids in class_ids:
            rng.shuffle(ids)
    npos = np.zeros(nclass, np.int64)
    chosen = []
    for _ in range(size):
        c = _most_behind(fractions, npos)
        if npos[c] >= len(class_ids[c]):
            raise UserError(f"cannot draw {size} labels in proportion to the class sizes: class {c} has "
                            f"only {counts[c]} images: ask for fewer labels")
        chosen.append(int(class_ids[c][npos[c]]))
        npos[c] += 1
    return np.asarray(chosen, np.int64)


def unlabeled_order(labels: np.ndarray, labeled: Sequence[int]) -> List[int]:
    """Positions of the unlabeled records in the order they are written (spec §3.3).

    Labeled records are taken in input order and released class by class whenever their class
    is the most behind its share, which interleaves the classes near round-robin; records with
    an unknown (negative) label follow, in input order.
    """
    labels = np.asarray(labels, np.int64)
    labeled = frozenset(int(x) for x in labeled)
    known = labels[labels >= 0]
    nclass = int(known.max()) + 1 if len(known) else 0
    fractions = class_fractions(np.bincount(known, minlength=nclass))
    pending = [collections.deque() for _ in range(nclass)]
    npos = np.zeros(nclass, np.int64)
    order, unknown = [], []
    for pos, label in enumerate(labels.tolist()):
        if pos in labeled:
            continue
        if label < 0:
            unknown.append(pos)
            continue
        pending[label].append(pos)
        while True:
            c = _most_behind(fractions, npos)
            if not pending[c]:
                break
            order.append(pending[c].popleft())
            npos[c] += 1
    for queue in pending:
        order.extend(queue)
    return order + unknown


# ----------------------------------------------------------------------------------------
# Files

def write_split(serialized, labeled: Sequence[int], order: Sequence[int], paths: dict,
                overwrite: bool = False, total: int = None, relabel=None, map_extra: dict = None) -> None:
    """Streams the records once: labeled ones to -label, those in `order` to -unlabel in that order.

    Records in neither are skipped. `relabel(pos, record) -> record`, if given, rewrites a
    record before it is written; `map_extra` adds keys to the -map.json. Only the records
    waiting for their turn in `order` are held in memory.
    """
    import tensorflow as tf
    labeled = frozenset(int(x) for x in labeled)
    wanted = frozenset(int(x) for x in order)
    change = relabel or (lambda pos, record: record)
    files.require_free(paths.values(), overwrite)
    waiting, next_index = {}, 0
    with files.atomic_path(paths["label"], overwrite) as tmp_label, \
            files.atomic_path(paths["unlabel"], overwrite) as tmp_unlabel:
        with tf.io.TFRecordWriter(tmp_label) as w_label, tf.io.TFRecordWriter(tmp_unlabel) as w_unlabel:
            for pos, record in enumerate(files.progress(serialized, "writing split", total)):
                if pos in labeled:
                    w_label.write(change(pos, record))
                    continue
                if pos not in wanted:
                    continue
                waiting[pos] = record
                while next_index < len(order) and order[next_index] in waiting:
                    position = order[next_index]
                    w_unlabel.write(change(position, waiting.pop(position)))
                    next_index += 1
            if waiting or next_index != len(order):
                raise RuntimeError("the unlabeled positions are not all in the input records")
        files.write_json(paths["map"], {"label": sorted(labeled), "unlabel": [int(p) for p in order],
                                     **(map_extra or {})}, overwrite)


def create_split(prefix: str, inputs: Sequence[str], size: int, seed: int = 0,
                 overwrite: bool = False) -> dict:
    """Writes the split files of `inputs` and returns their paths."""
    for path in inputs:
        records.require_file(path, "python -m data_prep.create_datasets <name>")
    paths = names.split_paths(prefix, seed, size)
    files.require_free(paths.values(), overwrite)
    labels = records.load_labels(inputs)
    labeled = choose_labeled(labels, size, seed)
    order = unlabeled_order(labels, labeled)
    left = int((labels[order] >= 0).sum()) if order else 0
    # With unknown labels, the map says how many leading records are labeled: the trainer
    # refuses a validation size beyond it. Without, the map is the released one.
    extra = {names.LABELED_FIRST: left} if left < len(order) else None
    write_split(records.iterate_serialized(inputs), labeled, order, paths, overwrite,
                total=len(labels), map_extra=extra)
    per_class = np.bincount(labels[labeled])
    print(f"{len(labeled)} labeled ({' '.join(str(n) for n in per_class)} per class) -> {paths['label']}")
    print(f"{len(order)} unlabeled -> {paths['unlabel']}")
    if extra:
        print(f"validation: the first {left} unlabeled records are labeled images (then "
              f"{len(order) - left} without labels): use a validation size of at most {left}, "
              f"e.g. --dataset={os.path.basename(prefix)}.{seed}@{size}-{min(left, 500)}")
    return paths


def main(argv=None):
    args = cli.parse(FLAGS, argv)
    if len(args) < 2:
        raise UserError("expected a target prefix and at least one input file: "
                        "python -m data_prep.create_split --seed=3 --size=250 "
                        "$ML_DATA/SSL/cifar10 $ML_DATA/cifar10-train.tfrecord")
    if FLAGS.size < 1:
        raise UserError(f"--size={FLAGS.size}: pass the number of labeled images, e.g. --size=250")
    if FLAGS.seed < 0:
        raise UserError(f"--seed={FLAGS.seed}: use a seed >= 0")
    prefix, inputs = args[0], args[1:]
    if prefix.endswith(".tfrecord"):
        raise UserError(f"the first argument {prefix} must be the target prefix "
                        "(e.g. $ML_DATA/SSL/cifar10), then the input files")
    create_split(prefix, inputs, FLAGS.size, FLAGS.seed, FLAGS.overwrite)


if __name__ == "__main__":
    cli.run(main, FLAGS)
