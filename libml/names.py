"""Dataset names and the file layout under $ML_DATA (libml compatible).

Full form ``{name}.{seed}@{nlabeled}-{nvalid}`` (``cifar10.3@250-5000``); short form
``{name}.{nlabeled}`` (``cifar10.250``) means seed 1 and one validation image, as in the
paper tables.
"""
import dataclasses
import os
import re

from libml.errors import UserError

_FULL = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_]*)\.(?P<seed>\d+)@(?P<nlabeled>\d+)-(?P<nvalid>\d+)$")
_SHORT = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_]*)\.(?P<nlabeled>\d+)$")
NAME_HELP = ("expected {name}.{seed}@{nlabeled}-{nvalid} (e.g. cifar10.3@250-5000) "
             "or {name}.{nlabeled} (e.g. cifar10.250)")


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
        return os.path.join(root, "SSL", self.split)

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


def train_path(root: str, name: str) -> str:
    return os.path.join(root, f"{name}-train.tfrecord")


def test_path(root: str, name: str) -> str:
    return os.path.join(root, f"{name}-test.tfrecord")


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
