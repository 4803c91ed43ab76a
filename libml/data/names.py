"""Every file under $ML_DATA, and the command that creates it (libml compatible layout).

Dataset names: full form ``{name}.{seed}@{nlabeled}-{nvalid}`` (``cifar10.3@250-5000``);
short form ``{name}.{nlabeled}`` (``cifar10.250``) means seed 1 and one validation image, as
in the paper tables.

Layout::

    {name}-train.tfrecord, {name}-test.tfrecord, {name}-meta.json    data_prep.create_datasets
    SSL/{name}.{seed}@{nlabeled}-label.tfrecord, -unlabel, -map.json  data_prep.create_split
    cifar6_mismatch{x}-*, SSL/cifar6_mismatch{x}.{seed}@{n}-*          data_prep.create_mismatch
    SSL/extend/{dataset}/{aug}{copies}-seed{s}/shard-*-of-*.tfrecord   data_prep.extend_unlabeled
"""
import dataclasses
import os
import re
from typing import Optional

from libml.base.errors import UserError

_FULL = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_]*)\.(?P<seed>\d+)@(?P<nlabeled>\d+)-(?P<nvalid>\d+)$")
_SHORT = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_]*)\.(?P<nlabeled>\d+)$")
NAME_HELP = ("expected {name}.{seed}@{nlabeled}-{nvalid} (e.g. cifar10.3@250-5000) "
             "or {name}.{nlabeled} (e.g. cifar10.250)")
MISMATCH = re.compile(r"^cifar6_mismatch(?P<percent>\d+)$")
# Datasets that `data_prep.create_datasets NAME` makes (svhn also writes svhn_noextra-test).
BUILTIN_DATASETS = ("cifar10", "cifar100", "svhn", "mnist5k", "imagenet32", "stl10")
_MADE_BY = {"svhn_noextra": "svhn"}


def data_dir(flag_value: str = "") -> str:
    """--data_dir if given, else $ML_DATA; a clear error when neither is set."""
    path = flag_value or os.environ.get("ML_DATA", "")
    if not path:
        raise UserError("no data folder: set $ML_DATA (export ML_DATA=/path/to/data) or pass --data_dir")
    return path


@dataclasses.dataclass(frozen=True)
class DatasetName:
    name: str
    seed: int
    nlabeled: int
    nvalid: int

    def __str__(self):
        return f"{self.name}.{self.seed}@{self.nlabeled}-{self.nvalid}"

    @property
    def split(self) -> str:
        """The split name without validation size, as the files are named: cifar10.3@250."""
        return f"{self.name}.{self.seed}@{self.nlabeled}"

    def split_root(self, root: str) -> str:
        return ssl_prefix(root, self.split)

    def label_path(self, root: str) -> str:
        return self.split_root(root) + "-label.tfrecord"

    def unlabel_path(self, root: str) -> str:
        return self.split_root(root) + "-unlabel.tfrecord"

    def map_path(self, root: str) -> str:
        return self.split_root(root) + "-map.json"

    def test_path(self, root: str) -> str:
        return test_path(root, self.name)

    def train_path(self, root: str) -> str:
        return train_path(root, self.name)


def subset_path(root: str, name: str, subset: str) -> str:
    """{root}/{name}-{subset}.tfrecord (subset: train, test, extra, unlabeled)."""
    return os.path.join(root, f"{name}-{subset}.tfrecord")


def train_path(root: str, name: str) -> str:
    return subset_path(root, name, "train")


def test_path(root: str, name: str) -> str:
    return subset_path(root, name, "test")


def meta_path(root: str, name: str) -> str:
    return os.path.join(root, f"{name}-meta.json")


def ssl_prefix(root: str, name: str) -> str:
    """{root}/SSL/{name}: the prefix create_split is given (it appends .{seed}@{size}-...)."""
    return os.path.join(root, "SSL", name)


# -map.json key written by create_split when records with unknown labels follow the labeled ones:
# how many leading -unlabel records have labels (the largest validation size it allows).
LABELED_FIRST = "unlabel_labeled_first"


def split_paths(prefix: str, seed: int, size: int) -> dict:
    """The files create_split writes for {prefix}.{seed}@{size}: label, unlabel, map."""
    target = "%s.%d@%d" % (prefix, seed, size)
    return {"label": target + "-label.tfrecord", "unlabel": target + "-unlabel.tfrecord",
            "map": target + "-map.json"}


def as_dataset_name(dataset) -> "DatasetName":
    return dataset if isinstance(dataset, DatasetName) else parse_dataset_name(dataset)


def extend_dir(dataset, root: str, copies: int, aug: str, seed: int) -> str:
    """Folder of one extension: $ML_DATA/SSL/extend/{dataset}/{aug}{copies}-seed{seed}."""
    return os.path.join(root, "SSL", "extend", str(as_dataset_name(dataset)), f"{aug}{copies}-seed{seed}")


def shard_file(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.tfrecord"


# ---------------------------------------------------------------------------------------------
# The commands that create the files (named by every "missing file" error).

def create_dataset_command(name: str, root: str, seed: int = 1, nlabeled: int = 2400) -> str:
    data_flag = "" if os.environ.get("ML_DATA") == root else f" --data_dir={root}"
    mismatch = MISMATCH.match(name)
    if mismatch:    # 6 labeled classes, 400 labels each by default
        per_class = "" if nlabeled == 2400 else f" --labels_per_class={max(nlabeled // 6, 1)}"
        return (f"python -m data_prep.create_mismatch --source=cifar10 "
                f"--mismatch={int(mismatch['percent'])} --seed={seed}{per_class}{data_flag}")
    if name in BUILTIN_DATASETS or name in _MADE_BY:
        return f"python -m data_prep.create_datasets {_MADE_BY.get(name, name)}{data_flag}"
    return (f"python -m data_prep.create_datasets custom --name={name} --labeled_dir=DIR "
            f"--unlabeled_dir=DIR --test_dir=DIR --size=32{data_flag}")


def create_split_command(dataset, root: str) -> str:
    d = as_dataset_name(dataset)
    if MISMATCH.match(d.name):
        return create_dataset_command(d.name, root, seed=d.seed, nlabeled=d.nlabeled)
    inputs = [d.train_path(root)]
    unlabeled = subset_path(root, d.name, "unlabeled")    # custom and stl10 sets
    if os.path.exists(unlabeled):
        inputs.append(unlabeled)
    return (f"python -m data_prep.create_split --seed={d.seed} --size={d.nlabeled} "
            f"{ssl_prefix(root, d.name)} {' '.join(inputs)}")


def extend_command(dataset, copies="K", aug="AUG", seed="S", keep_original: bool = False,
                   shards: Optional[int] = None, extra: str = "") -> str:
    """The command line that creates (or finishes) an extension."""
    parts = ["python -m data_prep.extend_unlabeled", f"--dataset={as_dataset_name(dataset)}",
             f"--copies={copies}", f"--aug={aug}", f"--seed={seed}"]
    if keep_original:
        parts.append("--keep_original")
    if shards:
        parts.append(f"--shards={shards}")
    if extra:
        parts.append(extra)
    return " ".join(parts)


def parse_dataset_name(text: str) -> DatasetName:
    """Parses a dataset name; raises UserError naming the expected forms."""
    text = (text or "").strip()
    m = _FULL.match(text)
    if m:
        d = DatasetName(m["name"], int(m["seed"]), int(m["nlabeled"]), int(m["nvalid"]))
    else:
        m = _SHORT.match(text)
        if not m:
            raise UserError(f"malformed dataset name {text!r}: {NAME_HELP}")
        d = DatasetName(m["name"], 1, int(m["nlabeled"]), 1)
    if d.nlabeled < 1:
        raise UserError(f"dataset name {text!r} asks for {d.nlabeled} labels: use at least 1")
    return d
