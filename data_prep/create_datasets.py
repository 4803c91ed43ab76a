"""Writes the train/test record files of the datasets (spec §3.2).

    python -m data_prep.create_datasets cifar10 [cifar100 svhn mnist5k] [--data_dir=...] [--archive_dir=DIR]
    python -m data_prep.create_datasets custom --name=NAME --labeled_dir=D [--unlabeled_dir=D] --test_dir=D --size=32
    python -m data_prep.create_datasets imagenet32 [--archive_dir=DIR]   # Table 4 pretraining
    python -m data_prep.create_datasets stl10 [--archive_dir=DIR]        # with its unlabeled set

Outputs under $ML_DATA (or --data_dir): ``{name}-train.tfrecord``, ``{name}-test.tfrecord``
(svhn also ``-extra`` and a copy ``svhn_noextra-test``; custom also ``-unlabeled``) and
``{name}-meta.json``. Records: one PNG image and one int64 label each, in the original order;
custom's also the absolute path of the image file they were read from (feature ``source``,
which create_split copies into the split files and outliers / check_split report).

CIFAR / SVHN / MNIST sources: data_prep/archives.py; STL-10: data_prep/stl10.py; custom
image folders: data_prep/image_folders.py.
ImageNet 32x32 (imagenet32, 1.28 M train / 50,000 validation images written as -test) comes
from tensorflow-datasets' ``imagenet_resized/32x32``, prepared from the two manually downloaded
zip files of image-net.org (login required); it is streamed, so memory stays bounded.
"""
import os
import re
import shutil
from typing import Iterator, List, Optional, Sequence, Tuple

from absl import flags

from data_prep.archives import Prepared, archive_dirs, load_cifar, load_mnist5k, load_svhn
from data_prep import stl10
from data_prep.image_folders import load_custom
from libml.base import cli
from libml.data import datasets
from libml.data import images
from libml.base import files
from libml.data import names
from libml.data import records
from libml.base.errors import UserError

FLAGS = flags.FlagValues()
flags.DEFINE_string("data_dir", "", "Output folder (default: $ML_DATA).", flag_values=FLAGS)
flags.DEFINE_string("archive_dir", "", "Folder holding the original archives (searched before "
                    "$ML_DATA/downloads and ~/tensorflow_datasets/downloads/manual).", flag_values=FLAGS)
flags.DEFINE_bool("download", True, "Let tensorflow-datasets download CIFAR/SVHN when no archive is "
                  "found and the network is reachable.", flag_values=FLAGS)
flags.DEFINE_string("tfds_data_dir", "", "tensorflow-datasets data folder (default: its own, "
                    "~/tensorflow_datasets or $TFDS_DATA_DIR).", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace existing output files.", flag_values=FLAGS)
flags.DEFINE_string("name", "", "custom: dataset name, e.g. flowers.", flag_values=FLAGS)
flags.DEFINE_string("labeled_dir", "", "custom: folder with one sub-folder of images per class.",
                    flag_values=FLAGS)
flags.DEFINE_string("unlabeled_dir", "", "custom: folder of unlabeled images (optional).",
                    flag_values=FLAGS)
flags.DEFINE_string("test_dir", "", "custom: folder with one sub-folder of images per class.",
                    flag_values=FLAGS)
flags.DEFINE_integer("size", 32, "custom: image size; the shorter side is resized to it, then the "
                     "centre is cropped to size x size.", flag_values=FLAGS)
flags.DEFINE_bool("flip", True, "custom: whether training may flip the images left-right "
                  "(recorded in {name}-meta.json).", flag_values=FLAGS)
flags.DEFINE_integer("workers", 0, "custom: image decoding threads (0 = number of CPUs).",
                     flag_values=FLAGS)
flags.DEFINE_float("max_megapixels", images.MAX_MEGAPIXELS, "custom: largest image read, in "
                   "megapixels (checked before decoding); larger ones are unreadable files.",
                   flag_values=FLAGS)
flags.DEFINE_bool("record_sources", True, "custom: store each image file's absolute path in its "
                  "record (feature source), so that outliers and check_split name the files; "
                  "--norecord_sources leaves the paths out (e.g. records to share).",
                  flag_values=FLAGS)
flags.DEFINE_bool("skip_bad_images", False, "custom: leave unreadable images out (listed on the "
                  "console) instead of stopping.", flag_values=FLAGS)


MIN_SIZE, MAX_SIZE = 8, 1024   # custom --size; 1024 px: 3 MB per image in memory

# ----------------------------------------------------------------------------------------
# ImageNet 32x32 (Table 4 pretraining): tensorflow-datasets imagenet_resized/32x32, streamed

IMAGENET32_TFDS = "imagenet_resized/32x32"
IMAGENET32_FILES = ("Imagenet32_train_npz.zip", "Imagenet32_val_npz.zip")
IMAGENET32_SPLITS = {"train": "train", "test": "validation"}     # our subset -> tfds split
IMAGENET32_PAGE = "https://image-net.org/download-images.php"


def imagenet32_manual_dir(dirs: Sequence[str]) -> Optional[str]:
    """The first folder holding both ImageNet32 zip files, or None."""
    for d in dirs:
        if all(os.path.isfile(os.path.join(d, f)) for f in IMAGENET32_FILES):
            return d
    return None


def imagenet32_builder(dirs: Sequence[str], tfds_data_dir: str = ""):
    """The prepared tfds builder; prepares it once from the manual zip files (never downloads:
    image-net.org needs a login)."""
    import zipfile
    import tensorflow_datasets as tfds
    builder = tfds.builder(IMAGENET32_TFDS, data_dir=tfds_data_dir or None)
    if builder.is_prepared():
        return builder
    manual = imagenet32_manual_dir(dirs)
    if manual is None:
        raise UserError(f"no imagenet32 data found: download {' and '.join(IMAGENET32_FILES)} "
                        f"(ImageNet 'Downsampled Images 32x32', {IMAGENET32_PAGE}, login required) "
                        f"into {dirs[0]} (or pass --archive_dir=DIR), then run the command again")
    print(f"imagenet32: preparing tensorflow-datasets {IMAGENET32_TFDS} from {manual} "
          f"(once; about 4 GB under its data folder)")
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    except (tfds.download.NonMatchingChecksumError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"cannot prepare imagenet32 from {manual} ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}): "
                        f"delete the zip files and download them again") from None
    return builder


def imagenet32_examples(builder, split: str) -> Iterator[Tuple[bytes, int]]:
    """(PNG bytes, label) of one tfds split in its stored order, encoded in parallel tf.data
    workers; only a few batches are in memory at any time."""
    import tensorflow as tf
    ds = builder.as_dataset(split=split, shuffle_files=False)
    ds = ds.map(lambda ex: (tf.io.encode_png(ex["image"]), ex["label"]),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(256)
    for png, label in ds.as_numpy_iterator():
        yield png, int(label)


def create_imagenet32(root: str, dirs: Sequence[str], overwrite: bool = False,
                      tfds_data_dir: str = "") -> List[str]:
    """Writes imagenet32-train (1,281,167) and imagenet32-test (the 50,000 validation images)
    and imagenet32-meta.json (1000 classes, WordNet ids as class names, flip)."""
    files.require_free(output_paths(root, "imagenet32", list(IMAGENET32_SPLITS)), overwrite)
    builder = imagenet32_builder(dirs, tfds_data_dir)
    written, counts = [], []
    for subset, split in IMAGENET32_SPLITS.items():
        path = names.subset_path(root, "imagenet32", subset)
        try:
            total = builder.info.splits[split].num_examples
        except KeyError:
            total = None
        count = records.write_records(path, imagenet32_examples(builder, split), overwrite,
                                      progress=f"writing {os.path.basename(path)}", total=total)
        written.append(path)
        counts.append(f"{subset} {count}")
    class_names = list(builder.info.features["label"].names)
    path = datasets.write_meta(root, datasets.make_meta("imagenet32", len(class_names), (32, 32, 3),
                                                        True, class_names), overwrite)
    print(f"imagenet32: {', '.join(counts)} images -> {root}")
    return written + [path]


# ----------------------------------------------------------------------------------------
# Writing

def output_paths(root: str, name: str, subsets: Sequence[str], copies: Sequence[str] = ()) -> List[str]:
    return ([names.subset_path(root, name, s) for s in subsets]
            + [os.path.join(root, f"{c}.tfrecord") for c in copies] + [names.meta_path(root, name)])


def write_prepared(root: str, prepared: Prepared, overwrite: bool = False) -> List[str]:
    """Writes every subset as PNG records, the copies, then the metadata; returns the paths."""
    written = []
    files.require_free(output_paths(root, prepared.name, prepared.subsets, prepared.copies), overwrite)
    for subset, (images, labels) in prepared.subsets.items():
        path = names.subset_path(root, prepared.name, subset)
        records.write_images(path, images, labels, overwrite, progress=f"writing {os.path.basename(path)}",
                             sources=prepared.sources.get(subset))
        written.append(path)
    for copy, subset in prepared.copies.items():
        source = names.subset_path(root, prepared.name, subset)
        path = os.path.join(root, f"{copy}.tfrecord")
        with files.atomic_path(path, overwrite) as tmp:
            shutil.copyfile(source, tmp)
        written.append(path)
    written.append(datasets.write_meta(root, prepared.meta, overwrite))
    return written


def expected_subsets(dataset: str) -> List[str]:
    return {"cifar10": ["train", "test"], "cifar100": ["train", "test"],
            "svhn": ["train", "test", "extra"], "mnist5k": ["train", "test"]}[dataset]


def create(dataset: str, root: str, overwrite: bool = False, archive_dir: str = "",
           download: bool = True, tfds_data_dir: str = "", **custom) -> List[str]:
    """Loads and writes one dataset; refuses existing outputs before any loading."""
    if dataset == "custom":
        name = custom.get("name", "")
        if not re.match(r"^[A-Za-z][A-Za-z0-9_]*$", name or ""):
            raise UserError(f"custom needs --name made of letters, digits and _ starting with a letter "
                            f"(got {name!r}): e.g. --name=flowers")
        if name in names.BUILTIN_DATASETS:
            raise UserError(f"--name={name} is a built-in dataset: choose another name")
        subsets = ["train", "test"] + (["unlabeled"] if custom.get("unlabeled_dir") else [])
        files.require_free(output_paths(root, name, subsets), overwrite)
        prepared = load_custom(name, custom.get("labeled_dir", ""), custom.get("unlabeled_dir", ""),
                               custom.get("test_dir", ""), custom.get("size", 32),
                               custom.get("flip", True), custom.get("workers", 0),
                               custom.get("skip_bad", False),
                               custom.get("max_megapixels", images.MAX_MEGAPIXELS))
        if not custom.get("record_sources", True):
            prepared.sources.clear()
    else:
        if dataset == "imagenet32":
            return create_imagenet32(root, archive_dirs(archive_dir, root), overwrite, tfds_data_dir)
        if dataset == "stl10":
            return stl10.create_stl10(root, archive_dirs(archive_dir, root), overwrite)
        copies = ["svhn_noextra-test"] if dataset == "svhn" else []
        files.require_free(output_paths(root, dataset, expected_subsets(dataset), copies), overwrite)
        dirs = archive_dirs(archive_dir, root)
        if dataset == "mnist5k":
            prepared = load_mnist5k()
        elif dataset == "svhn":
            prepared = load_svhn(dirs, download, tfds_data_dir)
        else:
            prepared = load_cifar(dataset, dirs, download, tfds_data_dir)
    written = write_prepared(root, prepared, overwrite)
    counts = ", ".join(f"{s} {len(l)}" for s, (_, l) in prepared.subsets.items())
    print(f"{prepared.name}: {counts} images -> {root}")
    return written


def main(argv=None):
    wanted = cli.parse(FLAGS, argv)
    known = names.BUILTIN_DATASETS + ("custom",)
    if not wanted:
        raise UserError(f"name the datasets to create: python -m data_prep.create_datasets {' '.join(known)}")
    for dataset in wanted:
        if dataset not in known:
            raise UserError(f"unknown dataset {dataset!r}: choose from {', '.join(known)}")
    if not MIN_SIZE <= FLAGS.size <= MAX_SIZE:
        raise UserError(f"--size={FLAGS.size}: use an image size of {MIN_SIZE} to {MAX_SIZE} pixels "
                        f"(the set is held in memory: size x size x 3 bytes per image)")
    root = names.data_dir(FLAGS.data_dir)
    if os.path.isdir(root):
        files.remove_stale_temps(root, recursive=False)     # files of a killed earlier run
    for dataset in wanted:
        create(dataset, root, FLAGS.overwrite, FLAGS.archive_dir, FLAGS.download, FLAGS.tfds_data_dir,
               name=FLAGS.name, labeled_dir=FLAGS.labeled_dir, unlabeled_dir=FLAGS.unlabeled_dir,
               test_dir=FLAGS.test_dir, size=FLAGS.size, flip=FLAGS.flip, workers=FLAGS.workers,
               skip_bad=FLAGS.skip_bad_images, max_megapixels=FLAGS.max_megapixels,
               record_sources=FLAGS.record_sources)


if __name__ == "__main__":
    cli.run(main, FLAGS)
