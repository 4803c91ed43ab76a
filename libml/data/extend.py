"""Extend (paper §3.1, Algorithm 1 line 1; spec §3.4, §4.1): K augmented copies of the unlabeled set.

The copies are written once, offline, as sharded TFRecords in the usual record format
(PNG ``image``, int64 ``label``) and read at training time instead of ``-unlabel.tfrecord``.

Layout (``{dataset}`` is the full name, validation size included, because the validation
images, the first ``nvalid`` records of ``-unlabel.tfrecord``, are never extended)::

    $ML_DATA/SSL/extend/{name}.{seed}@{nlabeled}-{nvalid}/{aug}{copies}-seed{s}/
        plan.json                       settings, written first
        shard-00000-of-00050.tfrecord   each written under a temporary name, renamed when complete
        ...
        manifest.json                   written last: the extension is complete

Copies are numbered 1..K; copy 0 is the un-augmented original, present only with
``keep_original``. Shard j holds the copies at positions p ≡ j (mod shards) of that list,
one after the other, each in its own seeded permutation of the training images. The
augmentation of an image depends only on (seed, copy, its position in that copy's
permutation), so shard contents do not depend on scheduling, on the number of parallel
workers or on which shards were written before an interruption.
"""
import dataclasses
import json
import os
from typing import List, Optional, Tuple

import numpy as np
import tensorflow as tf

from libml.data import augment

from libml.data import datasets

from libml.base import files
from libml.data import names

from libml.data import records
from libml.base.errors import UserError

BATCH = 256                 # images augmented together; part of the determinism contract
FORMAT = "realmix_tf-extend-1"
_SEED_SALT = 0x45787464     # "Extd": keeps extension seeds apart from other uses of the same --seed
PLAN, MANIFEST = "plan.json", "manifest.json"
# PNG zlib level of the copies. 0 (stored, no deflate) decodes twice as fast as compressed
# PNGs, which is what the training stream pays for every image it reads; for CIFAR-like
# photos it costs ~35 % more disk than level 1, which is as compact as the default level 6
# and encodes 3x faster (docs/benchmarks.md).
PNG_COMPRESSION = 0
REDO = "delete its folder and re-create the extension"


# ------------------------------------------------------------------------------------------
# Seeds: the augmentation of an image depends only on (seed, copy, position).

def batch_seed(seed, copy, batch):
    """Stateless seed ([2] int64) of batch `batch` of copy `copy` for run seed `seed`."""
    base = tf.stack([tf.cast(seed, tf.int64), tf.constant(_SEED_SALT, tf.int64)])
    copy_seed = tf.random.experimental.stateless_fold_in(base, tf.cast(copy, tf.int64))
    return tf.random.experimental.stateless_fold_in(copy_seed, tf.cast(batch, tf.int64))


def copy_permutation(seed: int, copy: int, n: int) -> np.ndarray:
    """The order in which copy `copy` lists the n training images (a pure function of its args)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, copy, _SEED_SALT])))
    return rng.permutation(n)


# ------------------------------------------------------------------------------------------
# Plan and manifest.

@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything that determines the bytes of an extension."""
    dataset: str
    aug: str
    copies: int
    seed: int
    keep_original: bool
    shards: int
    flip: bool
    source_records: int
    source_bytes: int
    nvalid: int
    png_compression: int = PNG_COMPRESSION
    image_shape: Tuple[int, int, int] = (0, 0, 0)
    batch: int = BATCH
    format: str = FORMAT

    @property
    def copy_ids(self) -> List[int]:
        return ([0] if self.keep_original else []) + list(range(1, self.copies + 1))

    def shard_copies(self, shard: int) -> List[int]:
        return self.copy_ids[shard::self.shards]

    @property
    def train_images(self) -> int:
        return self.source_records - self.nvalid

    def shard_records(self, shard: int) -> int:
        return len(self.shard_copies(shard)) * self.train_images

    def shard_path(self, folder: str, shard: int) -> str:
        return os.path.join(folder, names.shard_file(shard, self.shards))

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))   # tuples as lists, as read back


def extended_unlabeled_files(dataset, root: str, copies: int, aug: str, seed: int,
                             keep_original: Optional[bool] = None) -> List[str]:
    """Shard paths of a complete extension, for ``libml.data.pipeline.load_ssl(unlabeled_files=...)``.

    Raises a UserError naming the creating command when the extension is missing, incomplete,
    stale (the source split changed) or made with another ``keep_original`` than asked. The
    settings are the trainer's --extend* flags, checked where they are defined (libml/train/config.py).
    """
    d = names.as_dataset_name(dataset)
    folder = names.extend_dir(d, root, copies, aug, seed)
    create = names.extend_command(d, copies, aug, seed, bool(keep_original))
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.exists(manifest_path):
        if os.path.exists(os.path.join(folder, PLAN)):
            raise UserError(f"incomplete extension {folder}: finish it with `{create}`")
        raise UserError(f"missing extension {folder}: create it with `{create}`")
    manifest = files.read_json(manifest_path, REDO)
    if manifest.get("format") != FORMAT:
        raise UserError(f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}: "
                        f"re-create it with `{create} --overwrite`")
    if keep_original is not None and bool(manifest["keep_original"]) != bool(keep_original):
        have = "includes" if manifest["keep_original"] else "excludes"
        raise UserError(f"extension {folder} {have} the original images: re-create it with `{create} --overwrite`")
    source = d.unlabel_path(root)
    if not os.path.exists(source) or os.path.getsize(source) != manifest["source_bytes"]:
        raise UserError(f"extension {folder} was made from another {source}: "
                        f"re-create it with `{create} --overwrite`")
    shards = []
    for shard in manifest["shard_files"]:
        path = os.path.join(folder, shard["file"])
        if not os.path.exists(path) or os.path.getsize(path) != shard["bytes"]:
            raise UserError(f"shard {path} is missing or changed: re-create it with `{create}`")
        shards.append(path)
    return shards


# ------------------------------------------------------------------------------------------
# Writing.


def make_plan(dataset, root: str, copies: int = 50, aug: str = "erase", seed: int = 0,
              keep_original: bool = False, shards: Optional[int] = None,
              flip: Optional[bool] = None, png_compression: int = PNG_COMPRESSION) -> Plan:
    """Checks the inputs and returns the Plan of an extension (nothing is written)."""
    d = names.as_dataset_name(dataset)
    augment.check_name(aug)
    if int(copies) < 1:
        raise UserError(f"--copies={copies}: use at least 1 copy (50 in the paper, 25 in Table 5)")
    copies = int(copies)
    if int(seed) < 0:
        raise UserError(f"--seed={seed}: use a seed >= 0")
    if not 0 <= int(png_compression) <= 9:
        raise UserError(f"--png_compression={png_compression}: use a zlib level 0..9 (0: stored, fastest to read)")
    total_copies = copies + int(bool(keep_original))
    shards = total_copies if shards is None or int(shards) == 0 else int(shards)
    if not 1 <= shards <= total_copies:
        raise UserError(f"--shards={shards}: use 1..{total_copies} (one shard holds whole copies; "
                        f"default: one shard per copy)")
    create_split = names.create_split_command(d, root)
    source = records.require_file(d.unlabel_path(root), create_split)
    source_records = records.count_at_most(source, how_to_create=create_split)
    if d.nvalid >= source_records:
        raise UserError(f"{source} has {source_records} records and {d} takes the first {d.nvalid} "
                        f"for validation, leaving none to extend: use a smaller validation size")
    if flip is None:
        flip = datasets.dataset_info(d.name, root).flip if aug == "simple" else True
    return Plan(dataset=str(d), aug=aug, copies=copies, seed=int(seed),
                keep_original=bool(keep_original), shards=shards, flip=bool(flip),
                source_records=source_records, source_bytes=os.path.getsize(source),
                png_compression=int(png_compression), image_shape=records.first_image_shape(source, create_split),
                nvalid=d.nvalid)


