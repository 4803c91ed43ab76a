"""Class-distribution mismatch datasets (paper §4.2.2, spec §3.5).

    python -m data_prep.create_mismatch --source=cifar10 --mismatch=75 --seed=1

writes, for each mismatch level x, the dataset ``cifar6_mismatch{x}.{seed}@{6*lpc}``:
  labeled    the 6 animal classes (bird cat deer dog frog horse), --labels_per_class each,
             drawn with the create_split algorithm from {source}-train.tfrecord;
  unlabeled  4 classes, x % of them transport classes (table below), the same number of
             images from each class: the training images of those classes not labeled
             (--unlabeled_per_class, default the most every level can give: 4,600 for
             CIFAR-10 at 400 labels, so every level has 18,400 images);
  test       the test images of the 6 animal classes (6,000 for CIFAR-10).
Labels are remapped to 0..5 (6-way classifier, as the paper describes); unlabeled images of
the other classes get label -1, so validation accuracy counts in-distribution images only.
--keep_original_ids keeps every CIFAR-10 label as it is (the released behaviour: 10-way head).

The unlabeled file is written in create_split's round-robin class order, so the first
records (the validation set) mix the 4 classes evenly.
"""
import dataclasses
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
from absl import flags

from data_prep import create_split
from libml.base import cli
from libml.data import datasets
from libml.base import files
from libml.data import names
from libml.data import records
from libml.base.errors import UserError

FLAGS = flags.FlagValues()
flags.DEFINE_string("source", "cifar10", "Source dataset: cifar10 or mnist5k (miniature).", flag_values=FLAGS)
flags.DEFINE_list("mismatch", ["0", "25", "50", "75", "100"], "Mismatch levels in percent "
                  "(0, 25, 50, 75, 100; comma-separated).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 1, "Seed of the labeled draw (0 = the first images of each class).",
                     flag_values=FLAGS)
flags.DEFINE_integer("labels_per_class", 400, "Labeled images per labeled class.", flag_values=FLAGS)
flags.DEFINE_integer("unlabeled_per_class", 0, "Unlabeled images per unlabeled class (0 = as many as "
                     "every level can give, so all levels have the same size).", flag_values=FLAGS)
flags.DEFINE_bool("keep_original_ids", False, "Keep the source label ids (released RealMix: labels "
                  "2..7, a 10-way classifier, unlabeled images keep their class).", flag_values=FLAGS)
flags.DEFINE_string("data_dir", "", "Data folder (default: $ML_DATA).", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace existing output files.", flag_values=FLAGS)

LEVELS = (0, 25, 50, 75, 100)


@dataclasses.dataclass(frozen=True)
class MismatchClasses:
    prefix: str                     # output names are {prefix}_mismatch{x}
    labeled: Tuple[int, ...]        # source ids of the labeled (in-distribution) classes
    unlabeled: Dict[int, Tuple[int, ...]]   # level -> the 4 source ids of the unlabeled classes
    class_names: Tuple[str, ...]    # names of all source classes


MISMATCH_CLASSES = {
    # README §2.3 of the released code: animals 2..7 labeled; transport 0, 1, 8, 9 replace
    # animals 4, 5, 6, 8 one by one.
    "cifar10": MismatchClasses(
        prefix="cifar6", labeled=(2, 3, 4, 5, 6, 7),
        unlabeled={0: (4, 5, 6, 7), 25: (0, 5, 6, 7), 50: (0, 1, 6, 7), 75: (0, 1, 8, 7), 100: (0, 1, 8, 9)},
        class_names=datasets.CIFAR10_CLASSES),
    # The MNIST miniature: digits 0..5 labeled; digits 6..9 replace 2..5 one by one.
    "mnist5k": MismatchClasses(
        prefix="mnist6", labeled=(0, 1, 2, 3, 4, 5),
        unlabeled={0: (2, 3, 4, 5), 25: (6, 3, 4, 5), 50: (6, 7, 4, 5), 75: (6, 7, 8, 5), 100: (6, 7, 8, 9)},
        class_names=datasets.DIGITS),
}


def dataset_name(source: str, level: int) -> str:
    return f"{MISMATCH_CLASSES[source].prefix}_mismatch{level}"


def new_labels(source: str, level: int, keep_original_ids: bool) -> np.ndarray:
    """Lookup table: source label -> written label (0..5 for labeled classes, -1 for the others)."""
    classes = MISMATCH_CLASSES[source]
    table = np.full(len(classes.class_names), -1, np.int64)
    if keep_original_ids:
        return np.arange(len(classes.class_names), dtype=np.int64)
    for new, old in enumerate(classes.labeled):
        table[old] = new
    return table


@dataclasses.dataclass
class MismatchSplit:
    labeled: np.ndarray        # positions in the train file, drawing order
    unlabeled: List[int]       # positions in the train file, write order
    test: np.ndarray           # positions in the test file, file order


def mismatch_split(train_labels: np.ndarray, test_labels: np.ndarray, source: str, level: int,
                   labels_per_class: int, seed: int, unlabeled_per_class: int = 0) -> MismatchSplit:
    """Chooses the labeled, unlabeled and test records of one mismatch level (pure)."""
    classes = MISMATCH_CLASSES[source]
    if level not in classes.unlabeled:
        raise UserError(f"--mismatch={level} is not a level: use one of {', '.join(map(str, LEVELS))}")
    train_labels = np.asarray(train_labels, np.int64)
    for c in set(classes.labeled) | set(classes.unlabeled[level]):
        if not (train_labels == c).any():
            raise UserError(f"{source}-train has no image of class {c}: re-create it with "
                            f"`python -m data_prep.create_datasets {source} --overwrite`")
    in_labeled_classes = np.full(len(train_labels), -1, np.int64)   # -1: never labeled
    for new, old in enumerate(classes.labeled):
        in_labeled_classes[train_labels == old] = new
    for new, old in enumerate(classes.labeled):
        available = int((train_labels == old).sum())
        if labels_per_class > available:
            raise UserError(f"{labels_per_class} labels per class requested but class {old} of {source} "
                            f"has only {available} training images: use --labels_per_class={available} or less")
    size = labels_per_class * len(classes.labeled)
    labeled = create_split.choose_labeled(in_labeled_classes, size, seed)

    is_labeled = np.zeros(len(train_labels), bool)
    is_labeled[labeled] = True
    # The default size is what every level can give, so that the levels differ only in
    # their class composition (and the labeled draw is the same at every level).
    all_levels = sorted({c for cs in classes.unlabeled.values() for c in cs})
    left = {c: np.flatnonzero((train_labels == c) & ~is_labeled) for c in all_levels}
    candidates = {c: left[c] for c in classes.unlabeled[level]}
    most = min(len(v) for v in (left if not unlabeled_per_class else candidates).values())
    per_class = unlabeled_per_class or most
    if per_class > most:
        raise UserError(f"--unlabeled_per_class={per_class} but an unlabeled class has only {most} "
                        f"images left after the labeled draw: use --unlabeled_per_class={most} or less")
    if per_class < 1:
        raise UserError(f"no unlabeled images left for level {level}: lower --labels_per_class")
    chosen = np.sort(np.concatenate([v[:per_class] for v in candidates.values()]))
    order = create_split.unlabeled_order(train_labels[chosen], labeled=())
    test = np.flatnonzero(np.isin(np.asarray(test_labels, np.int64), classes.labeled))
    return MismatchSplit(labeled, [int(chosen[i]) for i in order], test)


def unlabeled_truth(origin: np.ndarray, classes: MismatchClasses) -> dict:
    """The ground truth kept in the split's -map.json, one entry per unlabeled record in file
    order (validation records first): its source class and whether that class is labeled."""
    origin = np.asarray(origin, np.int64)
    return {"unlabel_class": origin.tolist(),
            "unlabel_in_distribution": np.isin(origin, classes.labeled).tolist(),
            "class_names": list(classes.class_names)}


def source_paths(root: str, source: str) -> Tuple[str, str]:
    how = f"python -m data_prep.create_datasets {source}"
    return (records.require_file(names.train_path(root, source), how),
            records.require_file(names.test_path(root, source), how))


def source_meta(root: str, source: str) -> dict:
    meta = datasets.read_meta(root, source)
    if meta:
        return meta
    shape = (32, 32, 3) if source == "cifar10" else (32, 32, 1)
    return datasets.make_meta(source, 10, shape, source == "cifar10", MISMATCH_CLASSES[source].class_names)


def output_paths(root: str, name: str, seed: int, size: int) -> dict:
    paths = names.split_paths(names.ssl_prefix(root, name), seed, size)
    paths.update(test=names.test_path(root, name), meta=names.meta_path(root, name))
    return paths


def _shared_files_match(paths: dict, new_meta: dict) -> bool:
    """True when the seed-independent test file and metadata exist with these settings; a
    UserError when they exist with other settings (e.g. another --keep_original_ids)."""
    present = [k for k in ("test", "meta") if os.path.exists(paths[k])]
    if not present:
        return False
    if len(present) == 2:
        if files.read_json(paths["meta"], "pass --overwrite to rewrite it") == new_meta:
            return True
    raise UserError(f"{paths[present[0]]} exists but was written with other settings (or is "
                    f"incomplete): pass --overwrite to rewrite it")


def create_mismatch(root: str, source: str, level: int, seed: int = 1, labels_per_class: int = 400,
                    unlabeled_per_class: int = 0, keep_original_ids: bool = False,
                    overwrite: bool = False) -> dict:
    """Writes one mismatch dataset; returns its file paths."""
    if source not in MISMATCH_CLASSES:
        raise UserError(f"--source={source} has no mismatch classes: use {' or '.join(MISMATCH_CLASSES)}")
    classes = MISMATCH_CLASSES[source]
    name = dataset_name(source, level)
    paths = output_paths(root, name, seed, labels_per_class * len(classes.labeled))
    split_files = {k: paths[k] for k in ("label", "unlabel", "map")}
    files.require_free(split_files.values(), overwrite)
    meta = source_meta(root, source)
    class_names = (list(meta["class_names"]) if keep_original_ids
                   else [meta["class_names"][c] for c in classes.labeled])
    new_meta = datasets.make_meta(name, len(class_names), (meta["height"], meta["width"], meta["channels"]),
                                meta["flip"], class_names)
    # The test file and the metadata do not depend on the seed: other seeds of the same level
    # reuse them when they were written with the same settings.
    write_shared = overwrite or not _shared_files_match(paths, new_meta)
    train_path, test_path = source_paths(root, source)
    train_labels, test_labels = records.load_labels(train_path), records.load_labels(test_path)
    split = mismatch_split(train_labels, test_labels, source, level, labels_per_class, seed, unlabeled_per_class)
    table = new_labels(source, level, keep_original_ids)

    def relabel(pos, record):
        return records.relabel(record, table[train_labels[pos]])

    create_split.write_split(records.iterate_serialized(train_path), split.labeled, split.unlabeled,
                             split_files, overwrite, total=len(train_labels), relabel=relabel,
                             map_extra=unlabeled_truth(train_labels[split.unlabeled], classes))
    keep = frozenset(split.test.tolist())
    if write_shared:
        test_records = (records.relabel(r, table[test_labels[i]])
                        for i, r in enumerate(records.iterate_serialized(test_path)) if i in keep)
        records.write_serialized(paths["test"], test_records, overwrite, progress=f"writing {name}-test",
                                 total=len(keep))
        files.write_json(paths["meta"], new_meta, overwrite)
    n_ood = int(np.isin(train_labels[split.unlabeled], classes.labeled, invert=True).sum())
    print(f"{name}.{seed}@{len(split.labeled)}: {len(split.labeled)} labeled, {len(split.unlabeled)} unlabeled "
          f"({n_ood} out of distribution), {len(keep)} test")
    return paths


def parse_levels(values: Sequence[str]) -> List[int]:
    levels = []
    for v in values:
        try:
            level = int(v)
        except ValueError:
            level = -1
        if level not in LEVELS:
            raise UserError(f"--mismatch={v} is not a level: use one or more of {','.join(map(str, LEVELS))}")
        levels.append(level)
    return levels


def main(argv=None):
    cli.parse(FLAGS, argv)
    levels = parse_levels(FLAGS.mismatch)
    if FLAGS.labels_per_class < 1:
        raise UserError(f"--labels_per_class={FLAGS.labels_per_class}: use at least 1")
    if FLAGS.unlabeled_per_class < 0 or FLAGS.seed < 0:
        raise UserError("--unlabeled_per_class and --seed must be >= 0: fix the flag")
    root = names.data_dir(FLAGS.data_dir)
    for level in levels:
        create_mismatch(root, FLAGS.source, level, FLAGS.seed, FLAGS.labels_per_class,
                        FLAGS.unlabeled_per_class, FLAGS.keep_original_ids, FLAGS.overwrite)


if __name__ == "__main__":
    cli.run(main, FLAGS)
