"""Generic semi-supervised trainer: strategy, loop, evaluation, TensorBoard, checkpoints,
exact resume, transfer, evaluation-only and export (spec §7-§9).

The algorithm supplies only a model (a `libml.ssl.SSLModel` with `train_step`, `classify`,
`hparams`); everything else lives here:

    config = config_from_flags(FLAGS)            # or TrainConfig(...) in code and tests
    Trainer(config, make_model, "RealMix").run() # make_model(info, config) -> SSLModel

Progress is counted in images (`model.step`), as in libml: `kimg` = 1024 images. A run lives
in `{train_dir}/{dataset}/{Algorithm}_{sorted hyper-parameters}/` with `args/args.json`,
checkpoints and event files under `tf/`, `stats/accuracy.json` and `export/`. Re-running the
same command resumes from the newest complete checkpoint, including the input iterators, so a
run stopped at any point ends with the same weights as an uninterrupted one (under TF op
determinism).
"""
import dataclasses
import glob
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import tensorflow as tf
from absl import flags, logging

from libml.errors import UserError
from libml.names import data_dir, parse_dataset_name

KIMG = 1024
CHECKPOINT_NAME = "model.ckpt"
MEDIAN_WINDOWS = (1, 10, 20, 50)
PRECISION_CHOICES = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
EXTEND_AUGS = ("erase", "cutout", "simple", "none")
SHORT_RUN_HORIZON = 10      # --short_run_scaling: decays keep e^-10 of the start after a run
# What a damaged checkpoint raises when read (the reader raises IndexError on a short file).
_READ_ERRORS = (tf.errors.OpError, ValueError, AssertionError, IndexError, RuntimeError)
DEFAULT_DATA_OPTIONS: Optional[tf.data.Options] = None   # tests set libml.data.test_options()


# ---------------------------------------------------------------------------------------------
# Configuration

@dataclasses.dataclass
class TrainConfig:
    """Everything the trainer needs; `config_from_flags` builds it from the command line."""
    dataset: str = "cifar10.3@250-5000"
    data_dir: str = ""
    train_dir: str = "./experiments"
    batch: int = 64
    lr: float = 0.002
    wd: float = 0.02
    ema: float = 0.999
    bn_momentum: float = 0.999
    short_run_scaling: bool = False
    train_kimg: float = 65536
    report_kimg: float = 64
    save_kimg: float = 64
    keep_ckpt: int = 50
    filters: int = 32
    repeat: int = 4
    scales: int = 0
    seed: int = 0
    mixed_precision: str = "none"
    jit_compile: bool = False
    deterministic: bool = False
    load_checkpoint: str = ""
    eval_ckpt: str = ""
    extend: int = 0
    extend_aug: str = "erase"
    extend_seed: int = 0
    shuffle_buffer: int = 0
    eval_batch: int = 512
    export: bool = True
    export_only: bool = False
    progress: bool = True
    algorithm: dict = dataclasses.field(default_factory=dict)   # algorithm hyper-parameters

    def dataset_name(self):
        """The parsed --dataset; trainers with other naming schemes (fully supervised) override it."""
        return parse_dataset_name(self.dataset)

    def validate(self) -> "TrainConfig":
        """Checks values and combinations; raises UserError with one line naming the fix."""
        self.dataset_name()
        positive = dict(batch=self.batch, train_kimg=self.train_kimg, report_kimg=self.report_kimg,
                        save_kimg=self.save_kimg, keep_ckpt=self.keep_ckpt, filters=self.filters,
                        repeat=self.repeat, lr=self.lr, eval_batch=self.eval_batch)
        for name, value in positive.items():
            if not value > 0:
                raise UserError(f"--{name}={value} must be positive: pass a value > 0")
        if self.wd < 0:
            raise UserError(f"--wd={self.wd} is negative: pass a weight decay >= 0")
        for name, value in (("ema", self.ema), ("bn_momentum", self.bn_momentum)):
            if not 0 <= value < 1:
                raise UserError(f"--{name}={value} is out of range: use a decay in [0, 1)")
        if self.scales < 0:
            raise UserError(f"--scales={self.scales} is negative: use 0 (from the image size) or more")
        if self.report_kimg > self.train_kimg:
            raise UserError(f"--report_kimg={self.report_kimg} exceeds --train_kimg={self.train_kimg}: "
                            f"report at most once per run length")
        if int(self.batch * 1) != self.batch or self.batch > self.report_nimg:
            raise UserError(f"--batch={self.batch} is larger than one report period "
                            f"({self.report_nimg} images): raise --report_kimg or lower --batch")
        if self.mixed_precision not in (*PRECISION_CHOICES, "auto"):
            raise UserError(f"--mixed_precision={self.mixed_precision!r} is unknown: use one of "
                            f"none, auto, bf16, fp16")
        if self.extend < 0:
            raise UserError(f"--extend={self.extend} is negative: use 0 (off) or a number of copies")
        if self.extend and self.extend_aug not in EXTEND_AUGS:
            raise UserError(f"--extend_aug={self.extend_aug!r} is unknown: use one of {', '.join(EXTEND_AUGS)}")
        if self.shuffle_buffer < 0:
            raise UserError(f"--shuffle_buffer={self.shuffle_buffer} is negative: use 0 or more")
        if self.eval_ckpt and self.load_checkpoint:
            raise UserError("--eval_ckpt and --load_checkpoint both given: --eval_ckpt evaluates a "
                            "checkpoint as it is, drop --load_checkpoint")
        if self.eval_ckpt and self.export_only:
            raise UserError("--eval_ckpt and --export_only both given: run them one at a time")
        for flag, path in (("eval_ckpt", self.eval_ckpt), ("load_checkpoint", self.load_checkpoint)):
            if path and not _checkpoint_exists(path):
                raise UserError(f"--{flag}={path} not found: pass a run folder, its tf/ folder, a "
                                f"checkpoint prefix (tf/model.ckpt-N) or an exported .keras file")
        return self

    # Lengths in images; fractional kimg flags are rounded to whole images.
    @property
    def train_nimg(self) -> int:
        return int(round(self.train_kimg * KIMG))

    @property
    def report_nimg(self) -> int:
        return int(round(self.report_kimg * KIMG))

    @property
    def save_nimg(self) -> int:
        return int(round(self.save_kimg * KIMG))

    @property
    def total_steps(self) -> int:
        return -(-self.train_nimg // self.batch)

    def precision(self) -> str:
        if self.mixed_precision == "auto":
            from libml.ssl import default_precision
            return default_precision()
        return PRECISION_CHOICES[self.mixed_precision]

    def model_kwargs(self) -> dict:
        """Constructor arguments of every SSLModel, from the shared flags and the algorithm's."""
        ema, _ = self.effective_decays()
        return dict(filters=self.filters, repeat=self.repeat, scales=self.scales, lr=self.lr,
                    wd=self.wd, ema=ema, seed=self.seed, precision=self.precision(),
                    jit_compile=self.jit_compile, **self.algorithm)

    def effective_decays(self):
        """(EMA decay, BN momentum): the flags, or with --short_run_scaling at most
        1 - 10/steps, so that a run of `steps` steps forgets its start (0.999**1200 = 30 %)."""
        if not self.short_run_scaling:
            return self.ema, self.bn_momentum
        cap = max(0.0, 1.0 - SHORT_RUN_HORIZON / self.total_steps)
        return min(self.ema, cap), min(self.bn_momentum, cap)


def define_train_flags(flag_values=flags.FLAGS) -> None:
    """Defines the trainer's flags (idempotent). Defaults are the released code's (spec §2)."""
    if "train_dir" in flag_values:
        return
    d = TrainConfig()
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("dataset", d.dataset, "Dataset name {name}.{seed}@{nlabeled}-{nvalid} "
                        "(e.g. cifar10.3@250-5000) or {name}.{nlabeled}.", **fv)
    flags.DEFINE_string("data_dir", "", "Data folder; default $ML_DATA.", **fv)
    flags.DEFINE_string("train_dir", d.train_dir, "Root folder of the runs.", **fv)
    flags.DEFINE_integer("batch", d.batch, "Labeled batch size B (global over all devices); the "
                         "unlabeled batch is B images x 2 views.", **fv)
    flags.DEFINE_float("lr", d.lr, "Adam learning rate (constant).", **fv)
    flags.DEFINE_float("wd", d.wd, "Decoupled weight decay: kernels *= 1 - wd*lr after each step.", **fv)
    flags.DEFINE_float("ema", d.ema, "EMA decay of the weights used for evaluation.", **fv)
    flags.DEFINE_float("bn_momentum", d.bn_momentum, "BatchNorm moving-statistics momentum.", **fv)
    flags.DEFINE_bool("short_run_scaling", d.short_run_scaling,
                      "For short runs (tests, quick starts): lower --ema and --bn_momentum to at "
                      "most 1 - 10/steps, so the averages forget the random start. No effect on "
                      "runs of 10,000 steps or more at the defaults.", **fv)
    flags.DEFINE_float("train_kimg", d.train_kimg, "Run length in kibi-images (1 kimg = 1024 "
                       "labeled images); fractions allowed.", **fv)
    flags.DEFINE_float("report_kimg", d.report_kimg, "Evaluation and summary period in kimg.", **fv)
    flags.DEFINE_float("save_kimg", d.save_kimg, "Checkpoint period in kimg.", **fv)
    flags.DEFINE_integer("keep_ckpt", d.keep_ckpt, "Checkpoints kept (oldest deleted).", **fv)
    flags.DEFINE_integer("filters", d.filters, "Width of the first ResNet stage (32 = WRN-28-2).", **fv)
    flags.DEFINE_integer("repeat", d.repeat, "Residual blocks per stage (4 = 28 layers).", **fv)
    flags.DEFINE_integer("scales", d.scales, "Resolution stages; 0 = ceil(log2(width)) - 2.", **fv)
    flags.DEFINE_integer("seed", d.seed, "Run seed: initial weights, data order, augmentation "
                         "and per-step draws.", **fv)
    flags.DEFINE_string("mixed_precision", d.mixed_precision, "none (float32), bf16, fp16 or "
                        "auto (fp16 on a GPU, bf16 on a CPU).", **fv)
    flags.DEFINE_bool("jit_compile", d.jit_compile, "Compile the training step with XLA.", **fv)
    flags.DEFINE_bool("deterministic", d.deterministic, "Enable TF op determinism (bit-exact "
                      "reruns and resumes; slower on GPU).", **fv)
    flags.DEFINE_string("load_checkpoint", "", "Transfer learning: start from this run / "
                        "checkpoint / .keras export, except the classifier head; step reset.", **fv)
    flags.DEFINE_string("eval_ckpt", "", "Evaluate this run / checkpoint (raw and EMA weights on "
                        "valid and test), print and write JSON, then exit.", **fv)
    flags.DEFINE_integer("extend", d.extend, "Train on K augmented copies of the unlabeled set "
                         "(paper: 50), made by data_prep.extend_unlabeled; 0 = off.", **fv)
    flags.DEFINE_string("extend_aug", d.extend_aug, "Augmentation of the extension copies: "
                        + ", ".join(EXTEND_AUGS) + ".", **fv)
    flags.DEFINE_integer("extend_seed", d.extend_seed, "Seed the extension was made with.", **fv)
    flags.DEFINE_integer("shuffle_buffer", d.shuffle_buffer, "0: a fresh permutation per epoch; "
                         "N: the released code's shuffle buffer of N records (8192).", **fv)
    flags.DEFINE_integer("eval_batch", d.eval_batch, "Batch size of evaluation passes.", **fv)
    flags.DEFINE_bool("export", d.export, "Export the EMA model (.keras and SavedModel) to "
                      "{run}/export at the end of training.", **fv)
    flags.DEFINE_bool("export_only", d.export_only, "Export the newest checkpoint of the run "
                      "now, then exit.", **fv)
    flags.DEFINE_bool("progress", d.progress, "Show a progress bar per report period.", **fv)


def config_from_flags(flag_values=flags.FLAGS, **algorithm) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"algorithm"}
    values = {name: flag_values[name].value for name in fields if name in flag_values}
    return TrainConfig(**values, algorithm=dict(algorithm)).validate()


def flags_parser(argv):
    """absl `flags_parser` whose parse errors are one line and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {str(e).strip().splitlines()[0]}: see --helpfull for the flags", file=sys.stderr)
        sys.exit(2)


def cli_run(main):
    """Like `libml.errors.absl_run`, plus one-line flag-parse errors (exit code 2)."""
    from absl import app
    from libml.errors import EXIT_USER_ERROR

    def wrapped(argv):
        from absl import flags as absl_flags
        if not absl_flags.FLAGS["verbosity"].present:
            # TensorFlow logs every checkpoint and export at INFO: keep the console to our own
            # lines and warnings unless the user asks for more (--verbosity=0).
            logging.set_verbosity(logging.WARNING)
            tf.get_logger().setLevel("WARNING")
        try:
            result = main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        # app.run exits with main's return value: a stats dict must not become exit code 1.
        return result if isinstance(result, int) else 0

    app.run(wrapped, flags_parser=flags_parser)


# ---------------------------------------------------------------------------------------------
# Paths, names and statistics (pure)

def run_folder_name(algorithm: str, hparams: dict) -> str:
    """libml's `{Algorithm}_{key}{value}_...` with keys sorted (spec §9)."""
    return "_".join([algorithm] + [f"{k}{_fmt(v)}" for k, v in sorted(hparams.items())])


def _fmt(value) -> str:
    if isinstance(value, float):
        # Derived decays such as 1 - 10/steps print 17 digits; file names are limited to 255 bytes.
        value = float(f"{value:.6g}")
    return str(value).replace("/", "-").replace(" ", "")


def median_accuracies(test_accuracies: List[float]) -> dict:
    """Median test accuracy of the last 1/10/20/50 reports (the paper reports last20) and the
    matching error rates, as libml's extract_accuracy (spec §8.3)."""
    stats = {}
    for n in MEDIAN_WINDOWS:
        window = [a for a in test_accuracies[-n:] if a is not None and math.isfinite(a)]
        value = float(np.median(window)) if window else None
        stats[f"last{n:02d}"] = value
        stats[f"error_last{n:02d}"] = None if value is None else 100.0 - value
    stats["reports"] = len(test_accuracies)
    return stats


def write_json(path: str, value) -> None:
    """Writes JSON atomically (temporary name, then rename): readers never see half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _nan_to_none(x):
    return None if x is None or not math.isfinite(x) else float(x)


def _checkpoint_exists(path: str) -> bool:
    return bool(path) and (os.path.isdir(path) or os.path.isfile(path)
                           or bool(glob.glob(path + ".index")))


def resolve_checkpoint(path: str) -> str:
    """A checkpoint prefix from a run folder, its tf/ folder or a prefix; UserError if none."""
    if os.path.isdir(path):
        for folder in (os.path.join(path, "tf"), path):
            latest = tf.train.latest_checkpoint(folder) if os.path.isdir(folder) else None
            if latest:
                return latest
        raise UserError(f"{path} holds no complete checkpoint (no tf/checkpoint index): pass a run "
                        f"folder that has saved at least once, or a checkpoint prefix")
    if path.endswith(".index"):
        path = path[: -len(".index")]
    if not os.path.exists(path + ".index"):
        raise UserError(f"{path} is not a checkpoint (no {path}.index): pass a run folder or "
                        f"tf/model.ckpt-N")
    return path


def model_variables(model) -> Dict[str, tf.Variable]:
    """Every variable of an SSLModel keyed by its Keras path (net/..., ema_net/..., adam/...,
    step). Checkpoints store this dict rather than the object tree, so they do not depend on
    which Python containers Keras tracks, and transfer can match variables by path."""
    found: Dict[str, tf.Variable] = {}
    seen = set()

    def add(key, v):
        if id(v) in seen:
            return
        if key in found:
            raise ValueError(f"two model variables share the path {key}")
        seen.add(id(v))
        found[key] = v

    for v in list(model.net.weights) + list(model.ema_net.weights) + [model.step]:
        add(v.path, v)
    # Optimizer variables by position: their paths start with an auto-generated, per-process
    # optimizer name (adam, adam_1, ...).
    for i, v in enumerate(model.optimizer.variables):
        add(f"optimizer/{i:04d}_{v.name}", v)
    for v in model.variables:
        add(v.path, v)
    return found


def checkpoint_key(path: str) -> str:
    """The key under which `model_variables` stores the variable at `path`."""
    return "variables/" + path.replace(".", "..").replace("/", ".S") + "/.ATTRIBUTES/VARIABLE_VALUE"


# ---------------------------------------------------------------------------------------------
# TensorBoard summaries, written with the raw summary op and TensorBoard's plugin metadata, so
# that the `tensorboard` package is needed only to view them, not to train.

def _plugin_metadata(plugin: str):
    from tensorflow.core.framework import summary_pb2
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = plugin
    return metadata


def write_scalar(tag: str, value) -> None:
    """A TensorBoard scalar at the default writer's step."""
    tf.summary.write(tag, tf.constant(value, tf.float32), metadata=_plugin_metadata("scalars"))


def write_histogram(tag: str, values, buckets: int = 30) -> None:
    """A TensorBoard histogram ([buckets, 3] = left edge, right edge, count) of `values`."""
    values = np.asarray(values, np.float64).ravel()
    counts, edges = np.histogram(values, bins=buckets)
    tensor = np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)
    tf.summary.write(tag, tf.constant(tensor, tf.float64), metadata=_plugin_metadata("histograms"))


def read_events(folder: str) -> Dict[str, List[tuple]]:
    """{tag: [(step, value), ...]} of the event files in `folder`, in file order."""
    from tensorflow.core.util import event_pb2
    result: Dict[str, List[tuple]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                result.setdefault(value.tag, []).append((event.step, tf.make_ndarray(value.tensor)))
    return result


# ---------------------------------------------------------------------------------------------
# The trainer

def _placeholder_unlabeled(batch: int, shape) -> tf.data.Dataset:
    """Endless all-zero unlabeled batches (label -1) for algorithms that use no unlabeled data."""
    element = {"image": tf.zeros([batch, 2, *shape], tf.float32),
               "label": tf.fill([batch], tf.constant(-1, tf.int64))}
    return tf.data.Dataset.from_tensors(element).repeat()


class Trainer:
    """Builds data, strategy and model from a TrainConfig, and runs training, evaluation-only
    or export. `make_model(info, config)` creates the algorithm's SSLModel; it is called under
    the strategy scope with the dataset metadata (nclass, image shape)."""

    def __init__(self, config: TrainConfig, make_model: Callable, algorithm: str,
                 strategy: Optional[tf.distribute.Strategy] = None,
                 data_options: Optional[tf.data.Options] = None):
        self.config = config.validate()
        self.algorithm = algorithm
        self.strategy = strategy or tf.distribute.get_strategy()
        replicas = self.strategy.num_replicas_in_sync
        if config.batch % replicas:
            raise UserError(f"--batch={config.batch} does not split over {replicas} devices: use a "
                            f"multiple of {replicas}")
        if config.deterministic:
            tf.config.experimental.enable_op_determinism()
        self.data = self._load_data(data_options if data_options is not None else DEFAULT_DATA_OPTIONS)
        self.info = self.data.info
        import keras
        keras.utils.set_random_seed(config.seed)
        with self.strategy.scope():
            self.model = make_model(self.info, config)
            self._set_bn_momentum(config.effective_decays()[1])
        self.hparams = self._run_hparams()
        self.run_dir = os.path.join(config.train_dir, str(config.dataset_name()),
                                    run_folder_name(algorithm, self.hparams))
        self.tf_dir = os.path.join(self.run_dir, "tf")
        self.stats_dir = os.path.join(self.run_dir, "stats")
        self.export_dir = os.path.join(self.run_dir, "export")
        self._eval_fns = {}
        self._train_fn = None
        self.history: List[dict] = []

    # -- construction -------------------------------------------------------------------------
    def _load_data(self, options):
        from libml.data import load_ssl
        c = self.config
        root = data_dir(c.data_dir)
        unlabeled_files = None
        if c.extend:
            from libml.extend import extended_unlabeled_files
            unlabeled_files = extended_unlabeled_files(c.dataset, root, c.extend, c.extend_aug,
                                                       c.extend_seed)
        return load_ssl(c.dataset, root, seed=c.seed, unlabeled_files=unlabeled_files,
                        shuffle_buffer=c.shuffle_buffer, options=options)

    def _set_bn_momentum(self, momentum: float) -> None:
        for net in (self.model.net, self.model.ema_net):
            for layer in net.bn_layers():
                layer.momentum = momentum

    def _run_hparams(self) -> dict:
        """The model's hyper-parameters plus the trainer settings that change the result."""
        c = self.config
        hp = dict(self.model.hparams())
        hp.setdefault("batch", c.batch)
        hp.setdefault("nclass", self.info.nclass)
        if c.extend:
            hp.update(extend=c.extend, extend_aug=c.extend_aug, extend_seed=c.extend_seed)
        if c.effective_decays()[1] != 0.999:
            hp["bn_momentum"] = c.effective_decays()[1]
        if c.shuffle_buffer:
            hp["shuffle_buffer"] = c.shuffle_buffer
        return hp

    def _make_iterators(self):
        c, s = self.config, self.strategy
        labeled = s.experimental_distribute_dataset(self.data.train_labeled(c.batch))
        if getattr(self.model, "uses_unlabeled", True):
            unlabeled = self.data.train_unlabeled(c.batch)
        else:  # the step ignores it: a constant batch instead of decoding and augmenting images
            unlabeled = _placeholder_unlabeled(c.batch, self.info.shape)
        return iter(labeled), iter(s.experimental_distribute_dataset(unlabeled))

    def _checkpoint(self, iterators=None) -> tf.train.Checkpoint:
        parts = dict(variables=model_variables(self.model))
        if iterators is not None:
            parts.update(labeled_iterator=iterators[0], unlabeled_iterator=iterators[1])
        return tf.train.Checkpoint(**parts)

    # -- entry point --------------------------------------------------------------------------
    def run(self) -> dict:
        if self.config.eval_ckpt:
            return self.evaluate_checkpoint(self.config.eval_ckpt)
        if self.config.export_only:
            return self.export_latest()
        return self.train()

    # -- training -----------------------------------------------------------------------------
    def train(self) -> dict:
        c = self.config
        os.makedirs(self.tf_dir, exist_ok=True)
        self._write_args()
        self.iterators = self._make_iterators()
        ckpt = self._checkpoint(self.iterators)
        manager = tf.train.CheckpointManager(ckpt, self.tf_dir, max_to_keep=c.keep_ckpt,
                                             checkpoint_name=CHECKPOINT_NAME)
        restored = self._restore_latest(ckpt, manager)
        if not restored and c.load_checkpoint:
            from libml.export import transfer_weights
            source = transfer_weights(self.model, c.load_checkpoint, self.info)
            print(f"initialised from {source} except the classifier head", file=sys.stderr)
        self._load_history(int(self.model.step.numpy()))
        writer = tf.summary.create_file_writer(self.tf_dir)
        step = int(self.model.step.numpy())
        finished_before = step >= c.train_nimg
        if finished_before:
            print(f"{self.run_dir}: already trained to {step / KIMG:g} kimg", file=sys.stderr)
        while step < c.train_nimg:
            end = min((step // c.report_nimg + 1) * c.report_nimg, c.train_nimg)
            sums, step = self._train_period(step, end, manager)
            self._report(writer, step, sums)
            if (step - c.batch) // c.save_nimg < step // c.save_nimg or step >= c.train_nimg:
                self._save(manager, step)
        writer.close()
        if c.export and not (finished_before and os.path.isdir(self.export_dir)):
            from libml.export import export_model
            export_model(self.model, self.info, self.export_dir, self._export_meta())
        stats = self._accuracy_stats()
        if stats.get("reports"):
            window = min(20, stats["reports"])
            print(f"{self.run_dir}\n  test error {stats['error_last20']:.2f} % (median of the last "
                  f"{window} reports; stats/accuracy.json)", file=sys.stderr)
        return stats

    def _train_period(self, step: int, end: int, manager):
        """Runs steps until `end` images; saves at each --save_kimg boundary crossed (except
        the one at `end`, saved after the report). Returns (summed step outputs, step)."""
        c = self.config
        fn = self._get_train_fn()
        sums: Dict[str, object] = {}
        count, start_step, start = 0, step, time.perf_counter()
        bar = self._progress_bar(step, end)
        while step < end:
            try:
                outputs = fn()
            except tf.errors.DataLossError as e:
                raise UserError(self._corrupt_data_message(e)) from None
            for key, value in outputs.items():
                sums[key] = value if key not in sums else sums[key] + value
            count += 1
            new_step = step + c.batch
            if new_step < end and new_step // c.save_nimg > step // c.save_nimg:
                self._save(manager, new_step)
            step = new_step
            if bar is not None:
                bar.update(c.batch)
        step = int(self.model.step.numpy())    # the model's own count (global batch per step)
        elapsed = time.perf_counter() - start
        if bar is not None:
            bar.set_postfix_str(f"{(step - start_step) / max(elapsed, 1e-9):.0f} img/s")
            bar.close()
        means = {k: float(v.numpy()) / count for k, v in sums.items()}
        means["monitors/img_per_sec"] = (step - start_step) / max(elapsed, 1e-9)
        return means, step

    def _corrupt_data_message(self, error) -> str:
        """Names the damaged file of a read error met while streaming the training data."""
        path = self.data.find_corrupt_training_file()
        where = f"corrupt TFRecord {path}" if path else f"unreadable training data of {self.config.dataset}"
        return (f"{where} ({_first_line(error)}): delete it and re-create it with the data_prep "
                f"command that wrote it; the run resumes from its last checkpoint")

    def _progress_bar(self, step, end):
        if not self.config.progress:
            return None
        from tqdm import tqdm
        period = self.config.report_nimg
        return tqdm(total=end - step, initial=0, unit="img", unit_scale=True, leave=False,
                    desc=f"kimg {step / KIMG:g}-{end / KIMG:g}", dynamic_ncols=True,
                    mininterval=1.0, disable=period <= self.config.batch)

    def _get_train_fn(self):
        if self._train_fn is None:
            labeled_it, unlabeled_it = self.iterators
            strategy, model = self.strategy, self.model

            def train_fn():
                labeled, unlabeled = next(labeled_it), next(unlabeled_it)
                outputs = strategy.run(model.train_step, args=((labeled, unlabeled),))
                return {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                        for k, v in outputs.items()}

            self._train_fn = tf.function(train_fn)
        return self._train_fn

    def _save(self, manager, step: int) -> None:
        manager.save(checkpoint_number=step)

    def _restore_latest(self, ckpt, manager) -> bool:
        """Restores the newest checkpoint that reads back. A damaged newest one (the index file
        `checkpoint` is written last, so only disk damage can cause that) is skipped. If only
        the input-iterator state does not fit (the input pipeline changed, e.g. another TF
        version), the model is restored and the data order restarts, with a warning."""
        for path in reversed(manager.checkpoints):
            try:
                ckpt.read(path).expect_partial().assert_existing_objects_matched()
            except _READ_ERRORS as e:
                try:
                    self._checkpoint().read(path).expect_partial().assert_existing_objects_matched()
                except _READ_ERRORS as e2:
                    logging.warning("skipping unreadable checkpoint %s: %s", path, _first_line(e2))
                    continue
                logging.warning("restored the model from %s but not the input position (%s): "
                                "the data order will differ from an uninterrupted run",
                                path, _first_line(e))
            print(f"resuming from {path} ({int(self.model.step.numpy()) / KIMG:g} kimg)",
                  file=sys.stderr)
            return True
        if manager.checkpoints:
            raise UserError(f"no readable checkpoint in {self.tf_dir}: delete the folder to start "
                            f"over, or pass a different --train_dir")
        return False

    def _write_args(self) -> None:
        path = os.path.join(self.run_dir, "args", "args.json")
        if not os.path.exists(path):
            c = self.config
            write_json(path, dict(self.hparams, dataset=c.dataset, algorithm=self.algorithm,
                                  train_kimg=c.train_kimg, report_kimg=c.report_kimg,
                                  save_kimg=c.save_kimg, keep_ckpt=c.keep_ckpt,
                                  mixed_precision=c.mixed_precision, jit_compile=c.jit_compile,
                                  load_checkpoint=c.load_checkpoint, image_shape=list(self.info.shape),
                                  class_names=list(self.info.class_names)))

    # -- evaluation and reporting -------------------------------------------------------------
    def _eval_fn(self, ema: bool):
        if ema not in self._eval_fns:
            strategy, model = self.strategy, self.model

            def replica(batch):
                probs = model.classify(batch["image"], ema=ema)
                labels = tf.cast(batch["label"], tf.int64)
                known = labels >= 0
                hit = tf.logical_and(known, tf.argmax(probs, axis=-1) == labels)
                return (tf.reduce_sum(tf.cast(hit, tf.int64)), tf.reduce_sum(tf.cast(known, tf.int64)),
                        tf.reduce_max(probs, axis=-1))

            def evaluate(batch):
                hits, known, confidence = strategy.run(replica, args=(batch,))
                total = tf.distribute.ReduceOp.SUM
                return (strategy.reduce(total, hits, axis=None), strategy.reduce(total, known, axis=None),
                        strategy.gather(confidence, axis=0))

            self._eval_fns[ema] = tf.function(evaluate)
        return self._eval_fns[ema]

    def _eval_sets(self):
        if not hasattr(self, "_eval_datasets"):
            b, s, d = self.config.eval_batch, self.strategy, self.data
            self._eval_datasets = {
                "train_labeled": s.experimental_distribute_dataset(d.eval_labeled(b)),
                "valid": s.experimental_distribute_dataset(d.valid(b)),
                "test": s.experimental_distribute_dataset(d.test(b)),
            }
        return self._eval_datasets

    def evaluate(self, ema: bool = True, sets=("train_labeled", "valid", "test")):
        """{set: accuracy %} over records with a known label (label >= 0), plus the
        confidences (max probability) of the validation images."""
        fn = self._eval_fn(ema)
        result, confidences = {}, None
        for name in sets:
            hits = known = 0
            conf = []
            for batch in self._eval_sets()[name]:
                h, k, c = fn(batch)
                hits, known = hits + int(h), known + int(k)
                if name == "valid":
                    conf.append(c.numpy())
            result[name] = 100.0 * hits / known if known else float("nan")
            if name == "valid":
                confidences = np.concatenate(conf) if conf else np.zeros([0], np.float32)
        return result, confidences

    def _report(self, writer, step: int, means: dict) -> None:
        accuracy, confidence = self.evaluate(ema=True)
        kimg = step / KIMG
        with writer.as_default(step=step):
            write_scalar("accuracy/train_labeled", accuracy["train_labeled"])
            write_scalar("accuracy/valid", accuracy["valid"])
            write_scalar("accuracy", accuracy["test"])
            for key, value in means.items():
                write_scalar(key, value)
            write_scalar("monitors/lr", self.config.lr)
            write_scalar("monitors/kimg", kimg)
            if confidence is not None and confidence.size:
                write_histogram("monitors/unlabeled_confidence", confidence)
        writer.flush()
        self.history = [h for h in self.history if h["step"] < step]
        self.history.append(dict(step=step, kimg=kimg, **{k: _nan_to_none(v) for k, v in accuracy.items()}))
        write_json(os.path.join(self.stats_dir, "accuracy_history.json"), self.history)
        write_json(os.path.join(self.stats_dir, "accuracy.json"), self._accuracy_stats())
        print(f"kimg {kimg:<8g} accuracy train/valid/test  {accuracy['train_labeled']:.2f}  "
              f"{accuracy['valid']:.2f}  {accuracy['test']:.2f}   "
              f"{means.get('monitors/img_per_sec', 0):.0f} img/s", file=sys.stderr)

    def _accuracy_stats(self) -> dict:
        stats = median_accuracies([h["test"] for h in self.history])
        if self.history:
            stats["kimg"] = self.history[-1]["kimg"]
            stats["last"] = {k: self.history[-1][k] for k in ("train_labeled", "valid", "test")}
        return stats

    def _load_history(self, step: int) -> None:
        """Report history up to the restored step (reports after it will be redone)."""
        path = os.path.join(self.stats_dir, "accuracy_history.json")
        history = []
        if os.path.exists(path):
            with open(path) as f:
                history = json.load(f)
        self.history = [h for h in history if h["step"] <= step]

    # -- evaluation only / export -------------------------------------------------------------
    def evaluate_checkpoint(self, path: str) -> dict:
        """--eval_ckpt: raw and EMA accuracy on valid and test, printed and written to JSON
        (`{run}/stats/eval-{checkpoint}.json` beside the checkpoint's run)."""
        prefix = resolve_checkpoint(path)
        self._read_model(prefix)
        result = dict(checkpoint=prefix, step=int(self.model.step.numpy()),
                      kimg=int(self.model.step.numpy()) / KIMG)
        for ema, label in ((False, "raw"), (True, "ema")):
            accuracy, _ = self.evaluate(ema=ema, sets=("valid", "test"))
            result[label] = {k: _nan_to_none(v) for k, v in accuracy.items()}
        print(f"{'':8s} {'valid':>8s} {'test':>8s}")
        for label in ("raw", "ema"):
            r = result[label]
            print(f"{label:8s} {_pct(r['valid']):>8s} {_pct(r['test']):>8s}")
        run_dir = os.path.dirname(os.path.dirname(prefix))
        out = os.path.join(run_dir, "stats", f"eval-{os.path.basename(prefix)}.json")
        write_json(out, result)
        print(f"wrote {out}")
        result["output"] = out
        return result

    def _read_model(self, prefix: str) -> None:
        """Restores the model variables (not the iterators) of a checkpoint; UserError if the
        checkpoint is of another architecture or damaged."""
        try:
            self._checkpoint().read(prefix).expect_partial().assert_existing_objects_matched()
        except _READ_ERRORS as e:
            raise UserError(f"{prefix} does not match this model ({_first_line(e)}): pass the "
                            f"flags the run was trained with (--filters/--repeat/--scales/--dataset)") from None

    def export_latest(self) -> dict:
        """--export_only: exports the newest checkpoint of this run."""
        prefix = tf.train.latest_checkpoint(self.tf_dir) if os.path.isdir(self.tf_dir) else None
        if not prefix:
            raise UserError(f"{self.run_dir} has no complete checkpoint to export: train first "
                            f"(the same command without --export_only)")
        self._read_model(prefix)
        from libml.export import export_model
        paths = export_model(self.model, self.info, self.export_dir, self._export_meta())
        print(f"exported {prefix} to {self.export_dir}")
        return paths

    def _export_meta(self) -> dict:
        return dict(dataset=self.config.dataset, algorithm=self.algorithm,
                    step=int(self.model.step.numpy()), hparams=self.hparams)


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
