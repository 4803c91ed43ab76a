"""The trainer: builds data, strategy and model from a TrainConfig and runs the loop, the
reports, the checkpoints, evaluation-only and export (spec §7-§9).

The algorithm supplies only a model (a `libml.train.algorithm.SSLModel` with `train_step`, `classify`,
`hparams`); everything else lives here:

    config = TrainConfig(...).validate()          # libml/train/config.py; or from the flags
    Trainer(config, RealMix.from_config, "RealMix").run()

Progress is counted in images (`model.step`), as in libml: `kimg` = 1024 images. A run lives
in `{train_dir}/{dataset}/{Algorithm}_{hyper-parameters}/` (libml/run/naming.py) with
`args/args.json`, checkpoints and event files under `tf/`, `stats/accuracy.json` and `export/`.
Re-running the same command resumes from the newest complete checkpoint, including the input
iterators, so a run stopped at any point ends with the same weights as an uninterrupted one
(under TF op determinism).

Devices: `make_strategy(config)` is the one place where the tf.distribute strategy is chosen
(libml/train/devices.py: --distribute, TF_CONFIG), and `Trainer.distribute` the one place where
input is split over its replicas. With several workers, only the chief writes the run folder;
the others make their (required) saves in memory and keep only their own input positions
(libml/run/worker_folder.py).
"""
import contextlib
import dataclasses
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import tensorflow as tf

from libml.base import console
from libml.train import devices, run_modes
from libml.run.checkpoints import (READ_ERRORS, latest_checkpoint, make_checkpoint,
                                   model_variables, read_training_state)
from libml.train.config import KIMG, PRECISIONS, TrainConfig
from libml.base.errors import UserError, first_line
from libml.train.evaluate import SETS as EVAL_SETS, Evaluator
from libml.export.saving import export_model, export_note, join_export, transfer_weights
from libml.run.finite import FirstNonFinite, all_finite, loss_values
from libml.base.machine import cpu_info, isa_line, onednn_enabled
from libml.run.runfolder import RunFolder, recorded_precision
from libml.run import naming
from libml.run.naming import run_folder_name  # noqa: F401 (libml's naming, used by tests and runs/)
from libml.base.storage import disk_errors
from libml.run import run_error
from libml.run.worker_folder import WorkerFolder, follow_chief
from libml.train.reports import Reports
from libml.run.summaries import accuracy_stats, write_hparams


def make_strategy(config: TrainConfig) -> tf.distribute.Strategy:
    """The tf.distribute strategy of a run: --distribute, TF_CONFIG, the visible GPUs and
    --cpu_devices (libml/train/devices.py). Must come before any other TensorFlow work."""
    return devices.make_strategy(config.distribute,
                                 config.cpu_devices or devices.env_cpu_devices(),
                                 config.worker_timeout, config.collective)


def _data_options(config: TrainConfig) -> Optional[tf.data.Options]:
    """tf.data options of the run's streams: None (TF's defaults) unless --nodata_autotune."""
    if config.data_autotune:
        return None
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


class Trainer:
    """Builds data, strategy and model from a TrainConfig, and runs training, evaluation-only
    or export. `make_model(info, config)` creates the algorithm's SSLModel; it is called under
    the strategy scope with the dataset metadata (nclass, image shape)."""

    def __init__(self, config: TrainConfig, make_model: Callable, algorithm: str,
                 strategy: Optional[tf.distribute.Strategy] = None,
                 data_options: Optional[tf.data.Options] = None):
        self.config = config.validate()
        self.algorithm = algorithm
        self.strategy = strategy or make_strategy(config)
        self.role = devices.role_for(self.strategy)
        replicas = self.strategy.num_replicas_in_sync
        devices.check_train_batch(config.batch, replicas, on_cpu=not tf.config.list_logical_devices(
            "GPU"), onednn=onednn_enabled())
        if config.jit_compile and replicas > 1 and config.replica_mode == devices.GLOBAL:
            raise UserError(f"--jit_compile on {replicas} replicas: XLA cannot compile the "
                            f"cross-replica BatchNorm of --replica_mode=global; drop "
                            f"--jit_compile, or pass --replica_mode=per_replica")
        if config.deterministic:
            tf.config.experimental.enable_op_determinism()
        self.data = self._load_data(data_options if data_options is not None else
                                    _data_options(config))
        self.info = self.data.info
        self.model = self._build_model(make_model)
        self.hparams = self._run_hparams()
        self.run_dir = naming.run_dir(os.path.join(config.train_dir, str(config.dataset_name())),
                                      algorithm, self.hparams, self._hparam_defaults(),
                                      config.run_naming, type(self.model).hparam_table())
        recorded = recorded_precision(self.run_dir, PRECISIONS)
        if config.mixed_precision == "auto" and recorded:     # a resumed run keeps its precision
            self.config = dataclasses.replace(self.config, recorded_precision=recorded)
            if recorded != self.model.precision:
                self.model = self._build_model(make_model)
        self.tf_dir = os.path.join(self.run_dir, "tf")
        self.stats_dir = os.path.join(self.run_dir, "stats")
        self.export_dir = os.path.join(self.run_dir, "export")
        self.evaluator = Evaluator(self.strategy, self.model, self._eval_sets, self.info.nclass)
        self._train_fn = None
        self._nonfinite = FirstNonFinite()      # the step whose loss first went non-finite
        self.bar = console.RunProgress(0, 0, 1, enabled=False)   # the run's bar, set by train()
        self.reports = Reports(self)       # evaluations, summaries, the algorithm's hooks

    # -- construction -------------------------------------------------------------------------
    def _build_model(self, make_model: Callable):
        """The algorithm's model from the seed; the precision is resolved first, outside the
        strategy scope (--mixed_precision=auto may time a few steps on a CPU)."""
        import keras
        self.config.precision()
        keras.utils.set_random_seed(self.config.seed)
        with self.strategy.scope():
            model = make_model(self.info, self.config)
        self._variables = model_variables(model)      # what a checkpoint holds
        return model

    def _load_data(self, options):
        return self.config.load_data(options, shard=(self.role.worker_id, self.role.num_workers))

    def _run_hparams(self) -> dict:
        """The model's hyper-parameters plus the trainer settings that change the result."""
        c = self.config
        hp = dict(self.model.hparams())
        hp.setdefault("batch", c.batch)
        hp.setdefault("nclass", self.info.nclass)
        if c.extend:
            hp.update(extend=c.extend, extend_aug=c.extend_aug, extend_seed=c.extend_seed)
        if self.model.bn_momentum != 0.999:
            hp["bn_momentum"] = self.model.bn_momentum
        if c.shuffle_buffer:
            hp["shuffle_buffer"] = c.shuffle_buffer
        return hp

    def _hparam_defaults(self) -> dict:
        """The default of each run hyper-parameter that has one (the short run folder name
        shows the others): the trainer's flags' and the algorithm's. A trainer flag left at
        its default counts as default whatever it resolved to (--scales=0: from the image
        size; --ema under --short_run_scaling)."""
        c = self.config
        defaults = {f.name: self.hparams.get(f.name, f.default) if getattr(c, f.name) == f.default
                    else f.default for f in dataclasses.fields(c) if f.default is not dataclasses.MISSING}
        for key, hp in type(self.model).hparam_table().items():
            try:
                defaults[key] = hp.value(hp.default)
            except (TypeError, ValueError):     # a default the parser does not take: shown always
                defaults.pop(key, None)
        return defaults

    def distribute(self, batches):
        """THE place where input meets the strategy. Training: a batch of this worker's
        iterator (worker_batch rows, a plain tf.data iterator that checkpoints can hold) ->
        one part per local replica. Evaluation: a dataset of global batches -> a distributed
        dataset (each worker evaluates its share; the counts are summed)."""
        if isinstance(batches, tf.data.Dataset):
            return devices.distribute_eval(self.strategy, batches)   # small batches padded
        return devices.split_batch(self.strategy, batches)

    @property
    def worker_batch(self) -> int:
        """Rows of the global batch this worker reads (--batch / workers)."""
        return self.config.batch // self.role.num_workers

    def _make_iterators(self):
        """(labeled, unlabeled) iterators of this worker; unlabeled is None when the algorithm
        declares no unlabeled data (`model.unlabeled`)."""
        batch, spec = self.worker_batch, self.model.unlabeled
        labeled = iter(self.data.train_labeled(batch))
        return labeled, None if spec is None else iter(self.data.train_unlabeled(batch, spec))

    # -- entry point --------------------------------------------------------------------------
    def run(self) -> dict:
        if self.config.eval_ckpt:
            return run_modes.evaluate_checkpoint(self, self.config.eval_ckpt)
        if self.config.export_only:
            return run_modes.export_latest(self)
        return self.train()

    # -- training -----------------------------------------------------------------------------
    def train(self) -> dict:
        """Trains (or resumes) the run; see docs/usage_reliability.md for what a run survives:
        one trainer per run folder, changed flags compared with args.json, checkpoints found
        from their files, never a non-finite one, disk faults and damaged records in one line."""
        c = self.config
        # Every worker saves (saving reads replicated state with collectives); only the
        # chief's saves land in the run folder, the others keep their input positions there.
        folder = (RunFolder(self.run_dir, keep=c.keep_ckpt) if self.role.is_chief else
                  WorkerFolder(self.run_dir, c.keep_ckpt, self.role.worker_id)).open(self._args())
        try:
            self.iterators = self._make_iterators()
            ckpt = make_checkpoint(self.model, self.iterators)
            read = lambda p: read_training_state(self.model, self.iterators, p)  # noqa: E731
            if self.role.num_workers > 1:     # the chief's step, each worker's own input position
                with devices.lost_workers(self.role, lambda: latest_checkpoint(self.tf_dir)):
                    restored = follow_chief(self.strategy, self.role, folder, read, self.model,
                                            self.iterators, c.batch)
            else:
                restored = folder.restore(read, READ_ERRORS)
            start = "fresh start"
            if restored:
                start = f"resuming from {restored}"
            elif c.load_checkpoint:
                source = transfer_weights(self.model, c.load_checkpoint, self.info)
                start = f"initialised from {source} except the classifier head"
            folder.record_args()
        except BaseException:
            folder.close(failed=True)
            raise
        try:
            with disk_errors(self.run_dir, what="the run's files", fix="free space there (or move "
                             "the run to another disk) and re-run the same command: it resumes "
                             "from its newest checkpoint"), \
                    devices.lost_workers(self.role, lambda: latest_checkpoint(self.tf_dir)):
                return self._train_loop(folder, ckpt, start)
        finally:
            folder.close()

    def _train_loop(self, folder: RunFolder, ckpt, start: str) -> dict:
        c = self.config
        self.reports.load_history(int(self.model.step.numpy()))
        writer = (tf.summary.create_file_writer(self.tf_dir) if self.role.is_chief
                  else tf.summary.create_noop_writer())
        step = int(self.model.step.numpy())
        finished_before = step >= c.train_nimg
        if finished_before:
            print(f"{self.run_dir}: already trained to {step / KIMG:g} kimg", file=sys.stderr)
        else:
            self._print_banner(start, step)
            with writer.as_default(step=step):      # TensorBoard's HPARAMS tab: this run's row
                write_hparams(self._summary_hparams(), os.path.basename(self.run_dir))
        self.bar = console.RunProgress(step, c.train_nimg, c.report_nimg, c.progress, self.algorithm)
        with self.bar:
            while step < c.train_nimg:
                end = min((step // c.report_nimg + 1) * c.report_nimg, c.train_nimg)
                sums, step = self._train_period(step, end, folder, ckpt)
                folder.check_loss(self._nonfinite.value())     # no report of a diverged period
                folder.check_weights(step, self._variables)    # nor of non-finite weights
                with self._reading_data():
                    self.reports.report(writer, step, sums)
                if (step - c.batch) // c.save_nimg < step // c.save_nimg or step >= c.train_nimg:
                    self._save(folder, ckpt, step)
        writer.close()
        exported = None
        if c.export and not (finished_before and os.path.isdir(self.export_dir)):
            with self._reading_data():
                ood = run_modes.ood_reference_of(self)    # every worker: collectives
            if not self.role.is_chief:      # the reads (collectives) only, nothing written
                join_export(self.model, self.info)
            else:
                with disk_errors(self.export_dir, what="the export"):
                    exported = export_model(self.model, self.info, self.export_dir,
                                            run_modes.export_meta(self), ood)
        stats = accuracy_stats(self.history)
        if stats.get("reports"):
            tests, n = [h["test"] for h in self.history], c.median_last
            print(f"{self.run_dir}\n  {run_error.line(run_error.error_of(tests, n), n, len(tests))}",
                  file=sys.stderr)
        if exported:
            print(export_note(exported), file=sys.stderr)
        return stats

    def _print_banner(self, start: str, step: int) -> None:
        """Run folder, data sizes, model size, device/strategy, precision/oneDNN/CPU (start_line),
        start point."""
        c, net = self.config, self.model.net
        lines = console.banner(
            self.algorithm, self.run_dir, str(c.dataset_name()), self.data.sizes(), self.info.shape,
            self.info.nclass, f"Wide ResNet filters {net.filters} repeat {net.repeat} scales {net.scales}",
            console.count_parameters(net), console.describe_strategy(self.strategy),
            self.start_line(), start, step, c.train_nimg)
        short_run = c.short_run_line(type(self.model).hparam_defaults())   # --short_run_scaling
        print("\n".join(lines + ([f"  {short_run}"] if short_run else [])), file=sys.stderr)

    def start_line(self) -> str:
        """The run's first line: the precision chosen and why, oneDNN, the CPU."""
        _, reason = self.config.precision_choice()
        model, flags = cpu_info()
        return (f"precision {self.model.precision} ({reason}); oneDNN "
                f"{'on' if onednn_enabled() else 'off'}; {model}, {os.cpu_count()} cores, "
                f"{isa_line(flags)}")

    def _train_period(self, step: int, end: int, folder: RunFolder, ckpt):
        """Runs steps until `end` images; saves at each --save_kimg boundary crossed (except
        the one at `end`, saved after the report). Returns (summed step outputs, step)."""
        c = self.config
        fn = self._get_train_fn()
        sums: Dict[str, object] = {}
        count, start_step, start = 0, step, time.perf_counter()
        while step < end:
            with self._reading_data():
                outputs = fn()
            for key, value in outputs.items():
                sums[key] = value if key not in sums else sums[key] + value
            count += 1
            new_step = step + c.batch
            if new_step < end and new_step // c.save_nimg > step // c.save_nimg:
                self._save(folder, ckpt, new_step)
            step = new_step
            self.bar.update(c.batch)
        step = int(self.model.step.numpy())    # the model's own count (global batch per step)
        elapsed = time.perf_counter() - start
        means = {k: float(v.numpy()) / count for k, v in sums.items()}
        means["monitors/img_per_sec"] = (step - start_step) / max(elapsed, 1e-9)
        return means, step

    @contextlib.contextmanager
    def _reading_data(self):
        """A damaged record met while streaming the data (training or evaluation) becomes the
        one-line error of the cached path: the file, the record index and the cause."""
        try:
            yield
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            error = self.data.bad_record_error(after="the run resumes from its last checkpoint")
            if error is not None:
                raise error from None
            if isinstance(e, tf.errors.DataLossError):
                raise UserError(f"unreadable data of {self.config.dataset} ({first_line(e)}): "
                                f"re-create its files with the data_prep commands that wrote "
                                f"them; the run resumes from its last checkpoint") from None
            raise

    def _get_train_fn(self):
        if self._train_fn is None:
            labeled_it, unlabeled_it = self.iterators
            strategy, model = self.strategy, self.model

            nonfinite = self._nonfinite

            def train_fn():
                labeled = self.distribute(next(labeled_it))
                unlabeled = None if unlabeled_it is None else self.distribute(next(unlabeled_it))
                outputs = strategy.run(model.train_step, args=((labeled, unlabeled),))
                outputs = {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                           for k, v in outputs.items()}
                nonfinite.update(all_finite(loss_values(outputs)), model.step)
                return outputs

            self._train_fn = tf.function(train_fn)
        return self._train_fn

    def _save(self, folder: RunFolder, ckpt, step: int) -> None:
        """Checkpoint `step`, unless a loss or a weight went non-finite (the run stops then)."""
        folder.check_loss(self._nonfinite.value())
        folder.save(ckpt, step, self._variables)

    def _summary_hparams(self) -> dict:
        """The hyper-parameters of the HPARAMS tab: the run folder's, the dataset and algorithm
        (to filter by) and the run length."""
        return dict(self.hparams, dataset=self.config.dataset, algorithm=self.algorithm,
                    train_kimg=self.config.train_kimg)

    def _args(self) -> dict:
        """The settings args/args.json records (compared when the run resumes: libml/run/relaunch.py)."""
        c = self.config
        return dict(self.hparams, dataset=c.dataset, algorithm=self.algorithm,
                    train_kimg=c.train_kimg, report_kimg=c.report_kimg, save_kimg=c.save_kimg,
                    keep_ckpt=c.keep_ckpt, mixed_precision=c.mixed_precision,
                    precision=self.model.precision,
                    jit_compile=c.jit_compile, load_checkpoint=c.load_checkpoint,
                    image_shape=list(self.info.shape), class_names=list(self.info.class_names))

    # -- evaluation (the reports: libml/train/reports.py; --eval_ckpt, --export_only: libml/train/run_modes.py)
    def _eval_sets(self) -> dict:
        b, d = self.config.eval_batch, self.data
        return {"train_labeled": self.distribute(d.eval_labeled(b)),
                "valid": self.distribute(d.valid(b)), "test": self.distribute(d.test(b))}

    def evaluate(self, ema: bool = True, sets=EVAL_SETS, keep=("valid",)):
        """libml.train.evaluate.Evaluator.evaluate on this run's evaluation sets."""
        return self.evaluator.evaluate(ema, sets, keep)

    @property
    def history(self) -> List[dict]:
        """The run's reports so far (libml/train/reports.py)."""
        return self.reports.history
