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
import glob
import json
import os
import shutil
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from libml import augment, datasets, io, names, records, storage
from libml.errors import UserError

BATCH = 256                 # images augmented together; part of the determinism contract
FORMAT = "realmix_tf-extend-1"
_SEED_SALT = 0x45787464     # "Extd": keeps extension seeds apart from other uses of the same --seed
PLAN, MANIFEST = "plan.json", "manifest.json"
# PNG zlib level of the copies. 0 (stored, no deflate) decodes twice as fast as compressed
# PNGs, which is what the training stream pays for every image it reads; for CIFAR-like
# photos it costs ~35 % more disk than level 1, which is as compact as the default level 6
# and encodes 3x faster (docs/benchmarks.md).
PNG_COMPRESSION = 0
# Margin on the estimated output size: erased / cut-out copies of compressed PNGs come out
# ~4 % smaller than the source, translated ones within 1 % (docs/benchmarks.md).
SIZE_FACTOR = 1.05
_RECORD_OVERHEAD = 160      # PNG chunks + zlib framing + Example + TFRecord framing, bytes
_REDO = "delete its folder and re-create the extension"


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
    """Shard paths of a complete extension, for ``libml.data.load_ssl(unlabeled_files=...)``.

    Raises a UserError naming the creating command when the extension is missing, incomplete,
    stale (the source split changed) or made with another ``keep_original`` than asked. The
    settings are the trainer's --extend* flags, checked where they are defined (libml/config.py).
    """
    d = names.as_dataset_name(dataset)
    folder = names.extend_dir(d, root, copies, aug, seed)
    create = names.extend_command(d, copies, aug, seed, bool(keep_original))
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.exists(manifest_path):
        if os.path.exists(os.path.join(folder, PLAN)):
            raise UserError(f"incomplete extension {folder}: finish it with `{create}`")
        raise UserError(f"missing extension {folder}: create it with `{create}`")
    manifest = io.read_json(manifest_path, _REDO)
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
    files = []
    for shard in manifest["shard_files"]:
        path = os.path.join(folder, shard["file"])
        if not os.path.exists(path) or os.path.getsize(path) != shard["bytes"]:
            raise UserError(f"shard {path} is missing or changed: re-create it with `{create}`")
        files.append(path)
    return files


# ------------------------------------------------------------------------------------------
# Writing.

def _load_source(path: str, nvalid: int):
    images, labels = records.load_numpy(path)
    return images[nvalid:], labels[nvalid:]


def _batches(plan: Plan, shards: Sequence[int], images: np.ndarray, labels: np.ndarray):
    """Yields (images, labels, copy, batch, shard) for every batch of `shards`, in file order."""
    for shard in shards:
        for copy in plan.shard_copies(shard):
            order = copy_permutation(plan.seed, copy, plan.train_images)
            for batch, start in enumerate(range(0, len(order), plan.batch)):
                index = order[start:start + plan.batch]
                yield images[index], labels[index], np.int64(copy), np.int64(batch), np.int64(shard)


def _augmented_pngs(plan: Plan, shards: Sequence[int], images: np.ndarray, labels: np.ndarray,
                    parallel: int) -> tf.data.Dataset:
    """tf.data stream of (PNG bytes [b], labels [b], shard) batches of `shards`, in file order.

    One pipeline for all shards, so that augmentation and PNG encoding (the bottleneck) keep
    every core busy across shard boundaries.
    """
    height, width, channels = images.shape[1:]
    scalar = tf.TensorSpec([], tf.int64)
    signature = (tf.TensorSpec([None, height, width, channels], tf.uint8),
                 tf.TensorSpec([None], tf.int64), scalar, scalar, scalar)
    ds = tf.data.Dataset.from_generator(lambda: _batches(plan, shards, images, labels),
                                        output_signature=signature)

    def augment_and_encode(batch_images, batch_labels, copy, batch, shard):
        seed = batch_seed(plan.seed, copy, batch)
        augmented = tf.cond(copy > 0,   # copy 0 is the kept original
                            lambda: augment.augment_copy(batch_images, seed, plan.aug, plan.flip),
                            lambda: batch_images)
        pngs = tf.map_fn(lambda image: tf.io.encode_png(image, compression=plan.png_compression),
                         augmented, fn_output_signature=tf.string)
        return pngs, batch_labels, shard

    ds = ds.map(augment_and_encode, num_parallel_calls=parallel, deterministic=True)
    ds = ds.prefetch(parallel)
    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = True
    return ds.with_options(options)


def _finish_shard(tmp: str, path: str) -> None:
    os.replace(tmp, path)


def _write_shards(plan: Plan, folder: str, shards: Sequence[int], images, labels, parallel: int,
                  progress) -> None:
    """Writes `shards`, each under a temporary name renamed when the shard is complete."""
    writer, tmp, current = None, None, None
    try:
        for pngs, batch_labels, shard in _augmented_pngs(plan, shards, images, labels, parallel).as_numpy_iterator():
            if shard != current:
                if writer is not None:
                    writer.close()
                    _finish_shard(tmp, plan.shard_path(folder, current))
                current = shard
                tmp = f"{plan.shard_path(folder, shard)}.tmp-{os.getpid()}"
                writer = tf.io.TFRecordWriter(tmp)
            for png, label in zip(pngs, batch_labels):
                writer.write(records.serialize_example(png, label))
            if progress is not None:
                progress.update(len(pngs))
        if writer is not None:
            writer.close()
            _finish_shard(tmp, plan.shard_path(folder, current))
    finally:
        if writer is not None:
            writer.close()
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _record_bytes_estimate(plan: Plan) -> float:
    """Bytes per output record: like the source, or raw pixels when PNGs are stored uncompressed."""
    per_record = plan.source_bytes / max(plan.source_records, 1)
    if plan.png_compression == 0:
        height, width, channels = plan.image_shape
        per_record = max(per_record, height * (width * channels + 1) + _RECORD_OVERHEAD)
    return SIZE_FACTOR * per_record


def _estimate_bytes(plan: Plan, shards: Sequence[int]) -> int:
    return int(_record_bytes_estimate(plan) * sum(plan.shard_records(j) for j in shards))


def _check_disk(folder: str, needed: int, plan: Plan, missing: Sequence[int], reclaimable: int = 0) -> None:
    """`reclaimable`: bytes of an old extension that --overwrite deletes first."""
    free = storage.free_bytes(folder) + reclaimable
    if needed > free:
        nrec = sum(plan.shard_records(j) for j in missing)
        raise UserError(
            f"not enough free disk for {folder}: the extension needs about {needed / 2**30:.2f} GiB "
            f"({nrec} records x {_record_bytes_estimate(plan):.0f} bytes), "
            f"{free / 2**30:.2f} GiB free: free some space or use --data_dir on a larger disk")


def _remove_folder_contents(folder: str) -> None:
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


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


def extend_unlabeled(dataset, root: str, copies: int = 50, aug: str = "erase", seed: int = 0,
                     keep_original: bool = False, shards: Optional[int] = None,
                     overwrite: bool = False, parallel: Optional[int] = None,
                     progress: bool = True, flip: Optional[bool] = None,
                     png_compression: int = PNG_COMPRESSION) -> List[str]:
    """Writes (or finishes) an extension and returns its shard paths.

    Refuses a complete extension unless `overwrite`. An unfinished one with the same plan is
    resumed: complete shards are kept, the missing ones written.
    """
    d = names.as_dataset_name(dataset)
    if parallel is not None and int(parallel) < 0:
        raise UserError(f"--parallel={parallel} is negative: pass 0 (one worker per CPU) or more")
    plan = make_plan(d, root, copies, aug, seed, keep_original, shards, flip, png_compression)
    folder = names.extend_dir(d, root, plan.copies, aug, plan.seed)
    command = names.extend_command(d, plan.copies, aug, plan.seed, plan.keep_original, shards,
                             "" if plan.png_compression == PNG_COMPRESSION
                             else f"--png_compression={plan.png_compression}")
    plan_path, manifest_path = os.path.join(folder, PLAN), os.path.join(folder, MANIFEST)
    if os.path.exists(manifest_path) and not overwrite:
        raise UserError(f"extension {folder} already exists: pass --overwrite to re-create it")
    reclaimable = 0
    if os.path.isdir(folder):
        if overwrite:
            reclaimable = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                              if os.path.isfile(os.path.join(folder, f)))
        elif os.path.exists(plan_path) and io.read_json(plan_path, _REDO) != plan.to_json():
            raise UserError(f"{folder} holds an unfinished extension with other settings "
                            f"(see {plan_path}): pass --overwrite to discard it")
        else:
            for entry in os.listdir(folder):
                if ".tmp-" in entry:   # left by an interrupted run
                    os.remove(os.path.join(folder, entry))
    if overwrite or not os.path.isdir(folder):
        missing = list(range(plan.shards))
    else:
        missing = [j for j in range(plan.shards) if not _complete_shard(plan, folder, j)]
    # Checked before anything is deleted or written.
    _check_disk(folder, _estimate_bytes(plan, missing), plan, missing, reclaimable)
    # Disk faults met while writing (the shards are written outside libml.io) are one line; the
    # shard being written is removed, complete ones stay for the next run.
    with storage.disk_errors(folder, _estimate_bytes(plan, missing), what="the extension",
                             fix=f"free space there (or pass --data_dir on another disk) and "
                                 f"re-run `{command}`: complete shards are kept",
                             cleanup=[os.path.join(glob.escape(folder), "*.tmp-*")]):
        if overwrite and os.path.isdir(folder):
            _remove_folder_contents(folder)
        os.makedirs(folder, exist_ok=True)
        io.write_json(plan_path, plan.to_json(), overwrite=True)
        if missing:
            images, labels = _load_source(d.unlabel_path(root), plan.nvalid)
            bar = io.progress(desc=f"extend {aug}{plan.copies}" if progress else None, unit_scale=True,
                              total=sum(plan.shard_records(j) for j in missing))
            try:
                _write_shards(plan, folder, missing, images, labels, parallel or os.cpu_count() or 1, bar)
            finally:
                if bar is not None:
                    bar.close()
    manifest = dict(plan.to_json(), command=command, shard_files=[
        {"file": names.shard_file(j, plan.shards), "copies": plan.shard_copies(j),
         "records": plan.shard_records(j), "bytes": os.path.getsize(plan.shard_path(folder, j))}
        for j in range(plan.shards)])
    io.write_json(manifest_path, manifest, overwrite=True)
    return [plan.shard_path(folder, j) for j in range(plan.shards)]


def _complete_shard(plan: Plan, folder: str, shard: int) -> bool:
    """A shard file exists only once complete (atomic rename); its record count double-checks."""
    path = plan.shard_path(folder, shard)
    if not os.path.exists(path):
        return False
    try:
        return records.count_at_most(path) == plan.shard_records(shard)
    except UserError:
        return False
