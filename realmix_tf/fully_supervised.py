"""Fully supervised baseline: the supervised step (realmix_tf.supervised) on every labeled
training image, the upper reference of the paper (4.48 % error on all of CIFAR-10, 2.72 % on
SVHN; Tables 2-3).

Dataset names are those of the MixMatch repository's fully supervised runs
(M:fully_supervised/lib/data.py): `{name}-{nvalid}`, e.g. `cifar10-1` or `cifar10-5000`.
The data are `$ML_DATA/{name}-train.tfrecord` as written by `data_prep.create_datasets`:
its first `nvalid` records are the validation set, all the others are the labeled training
set; the test set is `{name}-test.tfrecord`. A bare `{name}` means `{name}-1`. No split or
unlabeled file is needed.
"""
import dataclasses
import re
from typing import Optional, Union

import tensorflow as tf

from libml import data as ssl_data
from libml import datasets, records, train
from libml.config import TrainConfig, option
from libml.errors import UserError
from libml.names import data_dir, test_path, train_path
from libml.train import placeholder_unlabeled
from realmix_tf import supervised
from realmix_tf.supervised import Supervised

_NAME = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_]*)(?:-(?P<nvalid>\d+))?$")
NAME_HELP = "expected {name}-{nvalid} (e.g. cifar10-1 or cifar10-5000) or {name}"


@dataclasses.dataclass(frozen=True)
class FullySupervisedName:
    """A fully supervised dataset: all of {name}-train.tfrecord but its first nvalid records."""
    name: str
    nvalid: int = 1

    def __str__(self):
        return f"{self.name}-{self.nvalid}"


def parse_fully_supervised_name(text: str) -> FullySupervisedName:
    text = (text or "").strip()
    m = _NAME.match(text)
    if not m:
        hint = " (an SSL split name: train the semi-supervised algorithms on it)" if "@" in text else ""
        raise UserError(f"malformed fully supervised dataset name {text!r}{hint}: {NAME_HELP}")
    nvalid = int(m["nvalid"]) if m["nvalid"] is not None else 1
    if nvalid < 1:
        raise UserError(f"dataset name {text!r} asks for no validation image: use at least 1 "
                        f"({m['name']}-1)")
    return FullySupervisedName(m["name"], nvalid)


class FullySupervisedData(ssl_data.SSLData):
    """The SSLData streams of a fully supervised dataset. There is no unlabeled set:
    `train_unlabeled` is a constant batch of zero images with label -1, so a trainer that
    feeds every step a (labeled, unlabeled) pair can run the supervised step unchanged."""

    def train_unlabeled(self, batch: int) -> tf.data.Dataset:
        ssl_data._check_batch(batch)
        return self._finish(placeholder_unlabeled(batch, self.info.shape))


def load_fully_supervised(dataset: Union[str, FullySupervisedName], root: str, seed: int = 0,
                          cache: Optional[bool] = None, parallel: Optional[int] = None,
                          shuffle_buffer: int = 0,
                          options: Optional[tf.data.Options] = None) -> FullySupervisedData:
    """Checks `{root}/{name}-train.tfrecord` and `-test.tfrecord` and returns the streams:
    labeled = train records nvalid..end, valid = the first nvalid, test = the test file.
    Other arguments as libml.data.load_ssl."""
    name = dataset if isinstance(dataset, FullySupervisedName) else parse_fully_supervised_name(dataset)
    how_to_create = f"python -m data_prep.create_datasets {name.name}"
    train_file = records.require_file(train_path(root, name.name), how_to_create)
    test_file = records.require_file(test_path(root, name.name), how_to_create)
    info = datasets.dataset_info(name.name, root)
    for path in (train_file, test_file):
        datasets.require_shape(info, root, path, how_to_create)
    count = records.count_at_most(train_file, name.nvalid + 1, how_to_create)
    if count <= name.nvalid:
        raise UserError(f"{name} asks for {name.nvalid} validation images but {train_file} holds "
                        f"only {count} records and none would be left to train on: use a "
                        f"smaller validation size ({name.name}-1)")
    labeled = ssl_data._Source((train_file,), skip=name.nvalid, how_to_create=how_to_create)
    sources = {
        "labeled": labeled,
        "unlabeled": labeled,     # never read: train_unlabeled is a constant stream
        "valid": ssl_data._Source((train_file,), take=name.nvalid, how_to_create=how_to_create),
        "test": ssl_data._Source((test_file,), how_to_create=how_to_create),
    }
    return FullySupervisedData(info, name, root, seed, sources, cache, parallel, shuffle_buffer,
                               options)


class FullySupervised(Supervised):
    """The supervised step; only the data (all labels) and the run name differ."""

    def __init__(self, nclass, input_shape, name="fully_supervised", **kwargs):
        super().__init__(nclass, input_shape, name=name, **kwargs)


# ---------------------------------------------------------------------------------------------
# Command line: the shared main is realmix_tf.registry, with this module's Config (fully
# supervised dataset names, for validation and the run folder) and Trainer (its data).
#   python -m realmix_tf.fully_supervised --dataset=cifar10-1

@dataclasses.dataclass
class Config(TrainConfig):
    dataset: str = option("cifar10-1", "Dataset name {name}-{nvalid} (e.g. cifar10-1 or "
                          "cifar10-5000) or {name}: all of {name}-train.tfrecord but its first "
                          "nvalid records.")

    def dataset_name(self) -> FullySupervisedName:
        return parse_fully_supervised_name(self.dataset)


class Trainer(train.Trainer):
    def _load_data(self, options):
        c = self.config
        return load_fully_supervised(c.dataset, data_dir(c.data_dir), seed=c.seed,
                                     shuffle_buffer=c.shuffle_buffer, options=options)


# The supervised command's flags: --smoothing (libml's fully supervised runs: 0.001 CIFAR,
# 0.01 SVHN), --extend refused; --dataset comes from Config.
REFUSED_FLAGS, define_flags, hparams_from_flags = (supervised.REFUSED_FLAGS, supervised.define_flags,
                                                   supervised.hparams_from_flags)


if __name__ == "__main__":
    from realmix_tf import registry
    registry.cli("fully_supervised")
