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

from libml.data import pipeline as data
from libml.train.config import TrainConfig, option
from libml.base.errors import UserError
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


class FullySupervised(Supervised):
    """The supervised step; only the data (all labels) and the run name differ."""

    def __init__(self, nclass, input_shape, name="fully_supervised", **kwargs):
        super().__init__(nclass, input_shape, name=name, **kwargs)


# ---------------------------------------------------------------------------------------------
# Command line: the shared main is realmix_tf.registry, with this module's Config (fully
# supervised dataset names, for validation, the run folder and the data).
#   python -m realmix_tf.fully_supervised --dataset=cifar10-1

@dataclasses.dataclass
class Config(TrainConfig):
    dataset: str = option("cifar10-1", "Dataset name {name}-{nvalid} (e.g. cifar10-1 or "
                          "cifar10-5000) or {name}: all of {name}-train.tfrecord but its first "
                          "nvalid records.")

    def dataset_name(self) -> FullySupervisedName:
        return parse_fully_supervised_name(self.dataset)

    def load_data(self, options=None, shard=(0, 1)) -> data.SSLData:
        """libml.data.pipeline.load_supervised: no unlabeled set."""
        name = self.dataset_name()
        return data.load_supervised(name.name, name.nvalid, self.data_root(), seed=self.seed,
                                    shuffle_buffer=self.shuffle_buffer, options=options,
                                    shard=shard, dataset=name)


if __name__ == "__main__":
    from realmix_tf import registry
    registry.cli("fully_supervised")
