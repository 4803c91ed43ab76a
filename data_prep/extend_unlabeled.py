"""Extend: writes K augmented copies of a split's unlabeled training images (paper §3.1).

    python -m data_prep.extend_unlabeled --dataset=cifar10.3@250-5000 --copies=50 --aug=erase --seed=0

Output: $ML_DATA/SSL/extend/{dataset}/{aug}{copies}-seed{seed}/shard-*.tfrecord + manifest.json,
used in training by `python -m realmix_tf.realmix ... --extend=50 --extend_aug=erase --extend_seed=0`.
Re-running after an interruption finishes the missing shards. See docs/usage_extend.md.

The flags live in a private FlagValues (not absl's global FLAGS), so this module can be
imported next to other command-line modules that define flags of the same names.
"""
import glob
import os
import shutil
from typing import List, Optional, Sequence

import numpy as np
import tensorflow as tf
from absl import flags

from libml.data import augment

from libml.base import cli

from libml.data import extend

from libml.base import files as io

from libml.data import names

from libml.data import records

from libml.base import storage
from libml.base.errors import UserError
from libml.data.extend import (MANIFEST, PLAN, PNG_COMPRESSION, REDO, Plan, batch_seed,
                          copy_permutation, make_plan)

FLAGS = flags.FlagValues()
flags.DEFINE_string("dataset", "", "Split to extend, {name}.{seed}@{nlabeled}-{nvalid}, e.g. "
                    "cifar10.3@250-5000. The first nvalid unlabeled records (validation) are "
                    "never extended.", flag_values=FLAGS)
flags.DEFINE_integer("copies", 50, "Number of augmented copies (paper: 50; Table 5: 25).", flag_values=FLAGS)
flags.DEFINE_string("aug", "erase", "Augmentation of the copies, one of "
                    + ", ".join(augment.AUGMENTATIONS) + " (libml/data/augment.py; erase = random "
                    "erasing, the paper's 'CutOut' as the released code meant it; none = plain "
                    "duplicates, the released code's effective behaviour).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the augmentations and shard order; the same seed "
                     "gives byte-identical shards.", flag_values=FLAGS)
flags.DEFINE_bool("keep_original", False, "Also store the un-augmented images once (as copy 0).",
                  flag_values=FLAGS)
flags.DEFINE_integer("shards", 0, "Number of shard files (0: one per copy). Each shard holds "
                     "whole copies.", flag_values=FLAGS)
flags.DEFINE_integer("png_compression", extend.PNG_COMPRESSION, "zlib level of the PNGs (0-9). "
                     "0 stores them uncompressed: ~35 % more disk than 1-9 for photos, but "
                     "twice as fast to decode in the training stream.", flag_values=FLAGS)
flags.DEFINE_integer("parallel", 0, "Parallel augment/encode workers (0: number of CPUs).",
                     flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Re-create a complete extension.", flag_values=FLAGS)
flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", "", "Data folder (default: $ML_DATA).", flag_values=FLAGS)


# Margin on the estimated output size: erased / cut-out copies of compressed PNGs come out
# ~4 % smaller than the source, translated ones within 1 % (docs/benchmarks.md).
SIZE_FACTOR = 1.05
_RECORD_OVERHEAD = 160      # PNG chunks + zlib framing + Example + TFRecord framing, bytes


# -- the writer -----------------------------------------------------------------------------

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
        elif os.path.exists(plan_path) and io.read_json(plan_path, REDO) != plan.to_json():
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
    # Disk faults met while writing (the shards are written outside libml.base.files) are one line; the
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


# -- the command line ----------------------------------------------------------------------

def main(argv=None):
    rest = cli.parse(FLAGS, argv)
    if rest:
        raise UserError(f"unexpected arguments {rest}: pass everything as --flag=value")
    if not FLAGS.dataset:
        raise UserError("missing --dataset: pass the split to extend, e.g. --dataset=cifar10.3@250-5000")
    root = names.data_dir(FLAGS.data_dir)
    files = extend_unlabeled(FLAGS.dataset, root, copies=FLAGS.copies, aug=FLAGS.aug, seed=FLAGS.seed,
                                    keep_original=FLAGS.keep_original, shards=FLAGS.shards or None,
                                    overwrite=FLAGS.overwrite, parallel=FLAGS.parallel or None,
                                    progress=FLAGS.progress, png_compression=FLAGS.png_compression)
    print(f"extension complete: {len(files)} shards in {files[0].rsplit('/', 1)[0]}")
    return 0


if __name__ == "__main__":
    cli.run(main, FLAGS)
