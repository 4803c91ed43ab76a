"""The SSL input streams (spec §3.1, §3.6).

``load_ssl("cifar10.3@250-5000", root)`` returns an ``SSLData`` whose methods build tf.data
pipelines:

- ``train_labeled(B)``:   infinite, shuffled, one augmented view   {'image': f32[B,H,W,C]}
- ``train_unlabeled(B, Unlabeled(views, ratio))``: infinite, shuffled, the views an algorithm
  declares (``SSLModel.unlabeled``): {'image': f32[B*ratio,V,H,W,C]}, each view augmented by
  its libml.data.augment name ("weak" = flip + translate, "strong" = + RandAugment + Cutout)
- ``eval_labeled(B)``, ``valid(B)``, ``test(B)``: finite, in file order, no augmentation.

Validation is the first ``nvalid`` records of ``-unlabel.tfrecord``; the unlabeled training
stream is the rest (or the extension shards given as ``unlabeled_files``).

Two ways to feed a stream:
- cached (small sets, the default under ~1 GB decoded): the set is decoded once into a uint8
  tensor; the stream shuffles *indices*, gathers a batch and augments it. The checkpointed
  iterator state is then a few indices, not image buffers.
- streamed (large sets, e.g. millions of extended records): the files are interleaved, the
  serialized records shuffled with a buffer of ``STREAM_SHUFFLE_BUFFER`` and batched; each
  batch is parsed in one call, its PNGs decoded, and augmented. Working per batch rather than
  per record keeps the extended stream within ~20 % of the cached one (docs/benchmarks.md).

All randomness is stateless and derived from the run seed and the stream's own batch counter,
so a stream is reproducible and a restored iterator continues exactly where it stopped.
"""
import dataclasses
import json
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from libml.data import augment

from libml.data import names

from libml.data import records
from libml.data.datasets import DatasetInfo, dataset_info, require_shape
from libml.base.errors import UserError
from libml.data.names import DatasetName

CACHE_MAX_DECODED_BYTES = 1 << 30      # auto-cache a set when its decoded size is under 1 GiB
PNG_EXPANSION_ESTIMATE = 4             # decoded bytes per PNG byte assumed for that estimate
STREAM_SHUFFLE_BUFFER = 8192           # records; as the released code (R:libml/data/pipeline.py:66-88)
SHARD_READ_BUFFER = 16 << 20           # bytes of read-ahead shared by the open shard files
UNROLL_MAX_BATCH = 256             # streamed batches up to this size decode in an unrolled graph


@dataclasses.dataclass(frozen=True)
class _Source:
    """Records of one set: `files`, minus the first `skip` records, at most `take` of them."""
    files: Tuple[str, ...]
    skip: int = 0
    take: int = -1
    how_to_create: str = ""

    def records(self) -> tf.data.Dataset:
        """Serialized records in file order (one pass)."""
        if len(self.files) == 1:
            ds = tf.data.TFRecordDataset(self.files[0])
        else:
            ds = tf.data.Dataset.from_tensor_slices(list(self.files)).flat_map(tf.data.TFRecordDataset)
        return ds.skip(self.skip).take(self.take)

    def decoded_bytes_estimate(self, info: DatasetInfo) -> int:
        if self.take >= 0:
            return self.take * info.height * info.width * info.channels
        return PNG_EXPANSION_ESTIMATE * sum(tf.io.gfile.stat(f).length for f in self.files)


def _decoder(info: DatasetInfo):
    def decode(serialized):
        example = records.parse_example(serialized)
        image = tf.io.decode_image(example["image"], channels=info.channels, expand_animations=False)
        return {"image": tf.ensure_shape(image, info.shape), "label": example["label"]}
    return decode


def _batch_decoder(info: DatasetInfo, batch: int):
    """Decodes a batch of `batch` serialized records (the streamed training path).

    One `parse_example` call per batch instead of one parse per record, and the PNG decodes of
    a batch unrolled into one graph: this removes most of the per-record tf.data overhead,
    which costs as much as the decode of a CIFAR-sized PNG itself (docs/benchmarks.md).
    """
    def decode_one(png):
        image = tf.io.decode_image(png, channels=info.channels, expand_animations=False)
        return tf.ensure_shape(image, info.shape)

    def decode(serialized):
        example = tf.io.parse_example(serialized, records.FEATURES)
        pngs = example["image"]
        if batch <= UNROLL_MAX_BATCH:
            images = tf.stack([decode_one(png) for png in tf.unstack(pngs, num=batch)])
        else:   # a while loop keeps the graph small for very large batches
            images = tf.map_fn(decode_one, pngs, parallel_iterations=UNROLL_MAX_BATCH,
                               fn_output_signature=tf.TensorSpec(info.shape, tf.uint8))
        return {"image": images, "label": example["label"]}
    return decode


# ---------------------------------------------------------------------------------------------
# Seeds: stateless, from (run seed, stream id) and then the stream's own counters.

def _stream_seed(run_seed: int, stream: int, purpose: int):
    base = tf.constant([run_seed, stream], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, purpose)


_SHUFFLE, _AUGMENT = 0, 1
_LABELED, _UNLABELED = 1, 2


@dataclasses.dataclass(frozen=True)
class Unlabeled:
    """What an algorithm reads of the unlabeled set (its `SSLModel.unlabeled`): `ratio`
    unlabeled images per labeled one (FixMatch's uratio), each given in the `views` named
    (libml.data.augment names, in order: axis 1 of the batch). MixMatch: two weak views, ratio 1."""
    views: Tuple[str, ...] = ("weak", "weak")
    ratio: int = 1

    def __post_init__(self):
        if not self.views or int(self.ratio) < 1:
            raise UserError(f"unlabeled stream {self}: declare at least one view and a ratio >= 1")
        for name in self.views:
            augment.check_view(name)

    def rows(self, batch: int) -> int:
        """Unlabeled images of a batch of `batch` labeled images."""
        return int(batch) * int(self.ratio)


class SSLData:
    """The SSL streams of one dataset. Build it with `load_ssl`."""

    def __init__(self, info: DatasetInfo, dataset: DatasetName, root: str, seed: int,
                 sources: dict, cache: Optional[bool], parallel: Optional[int],
                 shuffle_buffer: int, options: Optional[tf.data.Options],
                 shard: Tuple[int, int] = (0, 1)):
        self.info = info
        self.dataset = dataset
        self.root = root
        self.seed = int(seed)
        self._sources = sources
        self._cache_flag = cache
        self._parallel = parallel or tf.data.AUTOTUNE
        self._shuffle_buffer = int(shuffle_buffer)
        self._options = options
        self._shard_index, self._shard_count = int(shard[0]), int(shard[1])
        self._cached = {}

    # -- public streams -----------------------------------------------------------------------
    def train_labeled(self, batch: int) -> tf.data.Dataset:
        """Infinite {'image': f32[B,H,W,C] in [-1,1], 'label': i64[B]}, one weak view."""
        return self._train("labeled", batch, views=None, stream=_LABELED)

    def train_unlabeled(self, batch: int, spec: Unlabeled = Unlabeled()) -> tf.data.Dataset:
        """Infinite {'image': f32[B*ratio,V,H,W,C], 'label': i64[B*ratio]}: the declared
        views of B*ratio unlabeled images, each view an independent draw."""
        if self._sources["unlabeled"] is None:
            raise UserError(f"{self.dataset} has no unlabeled set (a fully supervised dataset): "
                            f"train a supervised algorithm on it, or use an SSL split name")
        return self._train("unlabeled", spec.rows(batch), views=tuple(spec.views),
                           stream=_UNLABELED)

    def eval_labeled(self, batch: int) -> tf.data.Dataset:
        return self._eval("labeled", batch)

    def bad_record_error(self, after: str = "") -> Optional[UserError]:
        """The one-line error naming the first damaged record of the run's files (labeled,
        unlabeled or Extend shards, validation, test: file, record index, cause), or None.
        Reads every file: call it only after a read error."""
        seen = set()
        for source in filter(None, self._sources.values()):
            files = [path for path in source.files if path not in seen]
            seen.update(files)
            bad = records.find_bad_record(files, self.info.shape)
            if bad is not None:
                return bad.error(source.how_to_create, after)
        return None

    def unlabeled_window(self, size: int, index: int) -> tf.data.Dataset:
        """One batch {'image': f32[n,H,W,C], 'label': i64[n]} of the training unlabeled images
        of the split file (never the Extend copies), un-augmented (--gamma=auto scores one
        window per report): every stride-th record, stride = ceil(records / size), from record
        `index` mod stride on. A window spreads over the whole file, whose records may be
        grouped by class, and `stride` consecutive windows read every record once."""
        _check_batch(size)
        source = dataclasses.replace(self._sources["valid"], skip=self.dataset.nvalid, take=-1)
        if getattr(self, "_window_count", None) is None:     # counted once per run
            self._window_count = int(source.records().reduce(tf.constant(0, tf.int64),
                                                             lambda n, _: n + 1))
        stride = max(1, -(-self._window_count // int(size)))
        ds = source.records().skip(int(index) % stride).shard(stride, 0).take(int(size))
        ds = ds.map(_decoder(self.info)).batch(int(size))
        return self._finish(ds.map(lambda e: {"image": augment.to_float(e["image"]), "label": e["label"]}))

    def valid(self, batch: int) -> tf.data.Dataset:
        return self._eval("valid", batch)

    def test(self, batch: int) -> tf.data.Dataset:
        return self._eval("test", batch)

    @property
    def nclass(self) -> int:
        return self.info.nclass

    def sizes(self) -> dict:
        """Image counts {labeled, unlabeled, valid, test} for the start banner; None for a set
        too large to cache (not counted: it may hold millions of records)."""
        result = {}
        for which, name in (("labeled", "labeled"), ("unlabeled", "unlabeled"), ("valid", "valid"),
                            ("test", "test")):
            source = self._sources[which]
            if source is None:      # a labeled-only dataset (load_supervised)
                result[name] = 0
            elif source.take >= 0:
                result[name] = source.take
            elif not self.is_cached(which):
                result[name] = None
            else:
                total = sum(records.count_at_most(f, -1, source.how_to_create) for f in source.files)
                result[name] = max(total - source.skip, 0)
        return result

    def is_cached(self, which: str) -> bool:
        """Whether set `which` (labeled, unlabeled, valid, test) is fed from a decoded cache."""
        if self._cache_flag is not None:
            return bool(self._cache_flag)
        return self._sources[which].decoded_bytes_estimate(self.info) <= CACHE_MAX_DECODED_BYTES

    # -- building blocks ----------------------------------------------------------------------
    def _finish(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        ds = ds.prefetch(tf.data.AUTOTUNE)
        return ds.with_options(self._options) if self._options is not None else ds

    def _train(self, which: str, batch: int, views: Optional[Tuple[str, ...]],
               stream: int) -> tf.data.Dataset:
        """views None: one weak view [B,H,W,C]; else the named views [B,V,H,W,C]."""
        _check_batch(batch)
        augment_seed = _stream_seed(self.seed, stream, _AUGMENT)
        if self._shard_count > 1:    # each worker augments its own rows with its own draws
            augment_seed = tf.random.experimental.stateless_fold_in(augment_seed, self._shard_index)
        flip, shift = self.info.flip, self.info.shift

        def augment_batch(step, example):
            seed = tf.random.experimental.stateless_fold_in(augment_seed, step)
            image = _augment_views(example["image"], views, seed, flip, shift)
            return {"image": augment.to_float(image), "label": example["label"]}

        if self.is_cached(which):
            images, labels = self._load(which)
            indices = self._sharded(self._index_stream(int(images.shape[0]), stream))
            gather = _gatherer(images, labels)
            ds = indices.batch(batch, drop_remainder=True).map(gather)
        else:   # batch the shuffled serialized records first, then parse and decode per batch
            ds = self._record_stream(which, stream).batch(batch, drop_remainder=True)
            ds = ds.map(_batch_decoder(self.info, batch), num_parallel_calls=self._parallel)
        ds = ds.enumerate().map(augment_batch, num_parallel_calls=self._parallel)
        return self._finish(ds)

    def _eval(self, which: str, batch: int) -> tf.data.Dataset:
        _check_batch(batch)

        def to_float(example):
            return {"image": augment.to_float(example["image"]), "label": example["label"]}

        if self.is_cached(which):
            images, labels = self._load(which)
            # Label -1 marks an unknown class (custom unlabeled data, mismatch OOD): not scored.
            keep = tf.boolean_mask(tf.range(tf.shape(labels, out_type=tf.int64)[0]), labels >= 0)
            ds = tf.data.Dataset.from_tensor_slices(keep).batch(batch).map(_gatherer(images, labels))
        else:
            ds = self._sources[which].records()
            ds = ds.map(_decoder(self.info), num_parallel_calls=self._parallel)
            ds = ds.filter(lambda example: example["label"] >= 0).batch(batch)
        return self._finish(ds.map(to_float, num_parallel_calls=self._parallel))

    def _sharded(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        """This worker's elements of a stream that every worker builds alike (same seed):
        worker w of W takes elements w, w + W, ... so no record is read twice per epoch."""
        if self._shard_count == 1:
            return ds
        return ds.shard(self._shard_count, self._shard_index)

    def _index_stream(self, size: int, stream: int) -> tf.data.Dataset:
        """Infinite shuffled indices into a cached set of `size` images."""
        if self._shuffle_buffer > 0:    # the released code: a shuffle buffer over a repeated range
            buffer = min(size, self._shuffle_buffer)
            return tf.data.Dataset.range(size).repeat().shuffle(
                buffer, seed=_python_seed(self.seed, stream))
        seed = _stream_seed(self.seed, stream, _SHUFFLE)
        # Default: a fresh uniform permutation each epoch (every image once per epoch).
        def epoch(e):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(size, dtype=tf.int64), tf.random.experimental.stateless_fold_in(seed, e))
            return tf.data.Dataset.from_tensor_slices(order)
        return tf.data.Dataset.counter().flat_map(epoch)

    def _record_stream(self, which: str, stream: int) -> tf.data.Dataset:
        """Infinite shuffled serialized records of a set too large to cache."""
        source = self._sources[which]
        shuffle_seed = _stream_seed(self.seed, stream, _SHUFFLE)
        if len(source.files) == 1:
            ds = self._sharded(source.records().repeat())
        else:
            files = tf.constant(list(source.files))

            def epoch(e):   # a new file order each pass over the shards
                order = tf.random.experimental.stateless_shuffle(
                    files, tf.random.experimental.stateless_fold_in(shuffle_seed, e))
                return tf.data.Dataset.from_tensor_slices(order)

            # Every shard is open at once and read in turn, one record each (Extend: one copy
            # per shard, so every copy is equally likely from the first batch). Local shards
            # are read by one sequential interleave: the reads are cheap, and a parallel
            # interleave costs more CPU per record than it saves (docs/benchmarks.md).
            # Remote shards (gs://...) are read in parallel to hide their latency.
            remote = any("://" in path for path in source.files)
            read_buffer = max(64 << 10, min(256 << 10, SHARD_READ_BUFFER // len(source.files)))
            ds = self._sharded(tf.data.Dataset.counter().flat_map(epoch)).interleave(
                lambda path: tf.data.TFRecordDataset(path, buffer_size=read_buffer),
                cycle_length=len(source.files), block_length=1,
                num_parallel_calls=self._parallel if remote else None,
                deterministic=True if remote else None)
        buffer = self._shuffle_buffer or STREAM_SHUFFLE_BUFFER
        return ds.shuffle(buffer, seed=_python_seed(self.seed, stream))

    def _load(self, which: str):
        """Decodes a set once into (uint8 [N,H,W,C], int64 [N]) host tensors."""
        if which not in self._cached:
            source = self._sources[which]
            images, labels = [], []
            for path in source.files:   # one file at a time, so an error names its file
                one = dataclasses.replace(source, files=(path,))
                x, y = _decode_all(one, self.info)
                images.append(x)
                labels.append(y)
            with tf.device("/CPU:0"):
                self._cached[which] = (tf.constant(np.concatenate(images)),
                                       tf.constant(np.concatenate(labels)))
        return self._cached[which]


def _augment_views(images, views, seed, flip, shift):
    """uint8 [B,...] -> the named views. One name for every view: the B*V copies are augmented
    in one call (image-major, each copy its own draw), so two weak views are the draws they
    always were; several names: view v from its own seed, fold_in(seed, v)."""
    if views is None:
        return augment.view("weak", images, seed, flip, shift)
    count, shape = len(views), images.shape[1:]
    if len(set(views)) == 1:    # [B,...] -> [B*V,...] -> [B,V,...]
        copies = augment.view(views[0], tf.repeat(images, count, axis=0), seed, flip, shift)
        return tf.reshape(copies, [-1, count, *shape])
    return tf.stack([augment.view(name, images, tf.random.experimental.stateless_fold_in(seed, v),
                                  flip, shift) for v, name in enumerate(views)], axis=1)


def _decode_all(source: _Source, info: DatasetInfo):
    ds = source.records().map(_decoder(info), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(4096)
    images, labels = [np.zeros([0, *info.shape], np.uint8)], [np.zeros([0], np.int64)]
    try:
        for example in ds.as_numpy_iterator():
            images.append(example["image"])
            labels.append(example["label"])
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        bad = records.find_bad_record(source.files, info.shape)
        if bad is None:
            raise records.corrupt_error(source.files[0], e, source.how_to_create) from None
        raise bad.error(source.how_to_create) from None
    return np.concatenate(images), np.concatenate(labels)


def _gatherer(images, labels):
    def gather(index):
        return {"image": tf.gather(images, index), "label": tf.gather(labels, index)}
    return gather


def _python_seed(run_seed: int, stream: int) -> int:
    """A tf.data op-level shuffle seed (Python int) for one stream of one run."""
    return (int(run_seed) * 1_000_003 + 7919 * int(stream) + 1) % (2 ** 31 - 1)


def _check_batch(batch: int) -> None:
    if int(batch) < 1:
        raise UserError(f"batch size {batch} is not positive: use a batch size of at least 1")


def _check_labeled_validation(name: DatasetName, root: str, unlabel_path: str) -> None:
    """A split whose -map.json says how many leading -unlabel records have labels (create_split
    with unknown labels: a custom unlabeled folder, STL-10) refuses a larger validation size.
    Other splits (mismatch sets validate on a mix that includes unknown labels) are unchecked."""
    path = name.map_path(root)
    if not tf.io.gfile.exists(path):
        return
    with tf.io.gfile.GFile(path) as f:
        try:
            labeled = json.load(f).get(names.LABELED_FIRST)
        except ValueError:
            return
    if labeled is not None and name.nvalid > labeled:
        use = f"use {name.split}-{labeled} or less, or " if labeled else ""
        raise UserError(f"{name} asks for {name.nvalid} validation images but only the first {labeled} "
                        f"records of {unlabel_path} have labels: {use}add labeled images")


def load_ssl(dataset: Union[str, DatasetName], root: str, seed: int = 0,
             unlabeled_files: Optional[Sequence[str]] = None, cache: Optional[bool] = None,
             parallel: Optional[int] = None, shuffle_buffer: int = 0,
             options: Optional[tf.data.Options] = None, shard: Tuple[int, int] = (0, 1)) -> SSLData:
    """Checks the prepared files of `dataset` under `root` and returns its streams.

    unlabeled_files: extension shards to read instead of `-unlabel.tfrecord` minus its first
        nvalid records (they already exclude the validation images).
    cache: True/False forces decoding sets into memory or streaming them from the records;
        None caches each set whose decoded size is under ~1 GB.
    parallel: parallel parse/decode/augment calls (None: tf.data autotune).
    shuffle_buffer: 0 draws a fresh uniform permutation per epoch for cached sets (and uses a
        buffer of 8192 records when streaming); N > 0 reproduces the released code's
        `range(n).repeat().shuffle(min(n, N))` (`--shuffle_buffer=8192`).
    options: tf.data.Options applied to every stream (e.g. autotune off).
    shard: (worker, workers): the training streams of worker `worker` of `workers` (its own
        part of every epoch, its own augmentation draws); evaluation sets are not sharded.
    """
    name = names.as_dataset_name(dataset)
    split_cmd = names.create_split_command(name, root)
    data_cmd = names.create_dataset_command(name.name, root, seed=name.seed, nlabeled=name.nlabeled)
    extend_cmd = names.extend_command(name)
    label_path = records.require_file(name.label_path(root), split_cmd)
    unlabel_path = records.require_file(name.unlabel_path(root), split_cmd)
    test_path = records.require_file(name.test_path(root), data_cmd)
    extension = tuple(unlabeled_files or ())
    for path in extension:
        records.require_file(path, extend_cmd)

    info = dataset_info(name, root)
    for path, how in [(label_path, split_cmd), (unlabel_path, split_cmd), (test_path, data_cmd),
                      *[(p, extend_cmd) for p in extension]]:
        require_shape(info, root, path, how)

    need = name.nvalid if extension else name.nvalid + 1
    count = records.count_at_most(unlabel_path, need, split_cmd)
    if count < need:
        raise UserError(f"{name} asks for {name.nvalid} validation images but {unlabel_path} holds "
                        f"only {count} records{' and none would be left to train on' if not extension else ''}: "
                        f"use a smaller validation size in the dataset name")
    _check_labeled_validation(name, root, unlabel_path)

    sources = {
        "labeled": _Source((label_path,), how_to_create=split_cmd),
        "unlabeled": (_Source(extension, how_to_create=extend_cmd)
                      if extension else _Source((unlabel_path,), skip=name.nvalid, how_to_create=split_cmd)),
        "valid": _Source((unlabel_path,), take=name.nvalid, how_to_create=split_cmd),
        "test": _Source((test_path,), how_to_create=data_cmd),
    }
    return SSLData(info, name, root, seed, sources, cache, parallel, shuffle_buffer, options,
                   shard)


def load_supervised(name: str, nvalid: int, root: str, seed: int = 0,
                    cache: Optional[bool] = None, parallel: Optional[int] = None,
                    shuffle_buffer: int = 0, options: Optional[tf.data.Options] = None,
                    shard: Tuple[int, int] = (0, 1), dataset=None) -> SSLData:
    """The streams of a labeled-only dataset (libml's fully supervised runs): labeled = all of
    `{root}/{name}-train.tfrecord` but its first `nvalid` records, valid = those, test =
    `{name}-test.tfrecord`; there is no unlabeled set (`train_unlabeled` refuses). `dataset`:
    the name shown in messages and banners (default `{name}-{nvalid}`). Other arguments as
    load_ssl."""
    how_to_create = f"python -m data_prep.create_datasets {name}"
    train_file = records.require_file(names.train_path(root, name), how_to_create)
    test_file = records.require_file(names.test_path(root, name), how_to_create)
    info = dataset_info(name, root)
    for path in (train_file, test_file):
        require_shape(info, root, path, how_to_create)
    count = records.count_at_most(train_file, nvalid + 1, how_to_create)
    shown = dataset if dataset is not None else f"{name}-{nvalid}"
    if count <= nvalid:
        raise UserError(f"{shown} asks for {nvalid} validation images but {train_file} holds "
                        f"only {count} records and none would be left to train on: use a "
                        f"smaller validation size ({name}-1)")
    sources = {
        "labeled": _Source((train_file,), skip=nvalid, how_to_create=how_to_create),
        "unlabeled": None,
        "valid": _Source((train_file,), take=nvalid, how_to_create=how_to_create),
        "test": _Source((test_file,), how_to_create=how_to_create),
    }
    return SSLData(info, shown, root, seed, sources, cache, parallel, shuffle_buffer, options,
                   shard)
