"""The trainer: builds data, strategy and model from a TrainConfig and runs the loop, the
reports, the checkpoints, evaluation-only and export (spec §7-§9).

The algorithm supplies only a model (a `libml.ssl.SSLModel` with `train_step`, `classify`,
`hparams`); everything else lives here:

    config = TrainConfig(...).validate()          # libml/config.py; or from the flags
    Trainer(config, RealMix.from_config, "RealMix").run()

Progress is counted in images (`model.step`), as in libml: `kimg` = 1024 images. A run lives
in `{train_dir}/{dataset}/{Algorithm}_{sorted hyper-parameters}/` with `args/args.json`,
checkpoints and event files under `tf/`, `stats/accuracy.json` and `export/`. Re-running the
same command resumes from the newest complete checkpoint, including the input iterators, so a
run stopped at any point ends with the same weights as an uninterrupted one (under TF op
determinism).

Devices: `make_strategy(config)` is the one place where the tf.distribute strategy is chosen
(libml/distribute.py: --distribute, TF_CONFIG), and `Trainer.distribute` the one place where
input is split over its replicas. With several workers, only the chief writes the run folder;
the others make their (required) saves in memory and keep only their own input positions
(libml/worker_folder.py).
"""
import contextlib
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import tensorflow as tf

from libml import console
from libml import distribute as devices
from libml.checkpoint import (READ_ERRORS, make_checkpoint, model_variables, read_model,
                              read_training_state, resolve_checkpoint)
from libml.checkpoint_files import latest_checkpoint
from libml.config import KIMG, TrainConfig
from libml.errors import UserError, first_line
from libml.evaluate import SETS as EVAL_SETS, Evaluator
from libml.export import export_model, join_export, transfer_weights
from libml.finite import FirstNonFinite, all_finite, loss_values
from libml.io import write_json
from libml.names import data_dir
from libml.platform import cpu_info, isa_line, onednn_enabled
from libml.runfolder import RunFolder
from libml.runlock import RunLock
from libml.storage import disk_errors
from libml.summaries import (HISTORY_FILE, STATS_FILE, accuracy_stats, finite_or_none,
                             read_history, write_histogram, write_scalar)
from libml.worker_folder import WorkerFolder, follow_chief


def make_strategy(config: TrainConfig) -> tf.distribute.Strategy:
    """The tf.distribute strategy of a run: --distribute, TF_CONFIG, the visible GPUs and
    --cpu_devices (libml/distribute.py). Must come before any other TensorFlow work."""
    return devices.make_strategy(config.distribute,
                                 config.cpu_devices or devices.env_cpu_devices(),
                                 config.worker_timeout, config.collective)


def run_folder_name(algorithm: str, hparams: dict) -> str:
    """libml's `{Algorithm}_{key}{value}_...` with keys sorted (spec §9)."""
    return "_".join([algorithm] + [f"{k}{_fmt(v)}" for k, v in sorted(hparams.items())])


def _fmt(value) -> str:
    if isinstance(value, float):
        # Derived decays such as 1 - 10/steps print 17 digits; file names are limited to 255 bytes.
        value = float(f"{value:.6g}")
    return str(value).replace("/", "-").replace(" ", "")


def _data_options(config: TrainConfig) -> Optional[tf.data.Options]:
    """tf.data options of the run's streams: None (TF's defaults) unless --nodata_autotune."""
    if config.data_autotune:
        return None
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def placeholder_unlabeled(batch: int, shape) -> tf.data.Dataset:
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
        import keras
        keras.utils.set_random_seed(config.seed)
        with self.strategy.scope():
            self.model = make_model(self.info, config)
        self._variables = model_variables(self.model)      # what a checkpoint holds
        self.hparams = self._run_hparams()
        self.run_dir = os.path.join(config.train_dir, str(config.dataset_name()),
                                    run_folder_name(algorithm, self.hparams))
        self.tf_dir = os.path.join(self.run_dir, "tf")
        self.stats_dir = os.path.join(self.run_dir, "stats")
        self.export_dir = os.path.join(self.run_dir, "export")
        self.evaluator = Evaluator(self.strategy, self.model, self._eval_sets, self.info.nclass)
        self._train_fn = None
        self._nonfinite = FirstNonFinite()      # the step whose loss first went non-finite
        self._bar = console.RunProgress(0, 0, 1, enabled=False)   # the run's bar, set by train()
        self.history: List[dict] = []
        self.gamma_hook = None
        if getattr(self.model, "gamma_state", None) is not None:      # --gamma=auto
            from libml.gamma_auto import GammaAutoHook
            self.gamma_hook = GammaAutoHook(self.model, self.info.nclass, self.run_dir,
                                            writes=self.role.is_chief)

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
                        shuffle_buffer=c.shuffle_buffer, options=options,
                        shard=(self.role.worker_id, self.role.num_workers))

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
        batch = self.worker_batch
        labeled = self.data.train_labeled(batch)
        if getattr(self.model, "uses_unlabeled", True):
            unlabeled = self.data.train_unlabeled(batch)
        else:  # the step ignores it: a constant batch instead of decoding and augmenting images
            unlabeled = placeholder_unlabeled(batch, self.info.shape)
        return iter(labeled), iter(unlabeled)

    # -- entry point --------------------------------------------------------------------------
    def run(self) -> dict:
        if self.config.eval_ckpt:
            return self.evaluate_checkpoint(self.config.eval_ckpt)
        if self.config.export_only:
            return self.export_latest()
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
        self._load_history(int(self.model.step.numpy()))
        writer = (tf.summary.create_file_writer(self.tf_dir) if self.role.is_chief
                  else tf.summary.create_noop_writer())
        step = int(self.model.step.numpy())
        finished_before = step >= c.train_nimg
        if finished_before:
            print(f"{self.run_dir}: already trained to {step / KIMG:g} kimg", file=sys.stderr)
        else:
            self._print_banner(start, step)
        self._bar = console.RunProgress(step, c.train_nimg, c.report_nimg, c.progress, self.algorithm)
        with self._bar:
            while step < c.train_nimg:
                end = min((step // c.report_nimg + 1) * c.report_nimg, c.train_nimg)
                sums, step = self._train_period(step, end, folder, ckpt)
                folder.check_loss(self._nonfinite.value())     # no report of a diverged period
                with self._reading_data():
                    self._report(writer, step, sums)
                if (step - c.batch) // c.save_nimg < step // c.save_nimg or step >= c.train_nimg:
                    self._save(folder, ckpt, step)
        writer.close()
        if c.export and not (finished_before and os.path.isdir(self.export_dir)):
            if not self.role.is_chief:      # the reads (collectives) only, nothing written
                join_export(self.model, self.info)
            else:
                with disk_errors(self.export_dir, what="the export"):
                    export_model(self.model, self.info, self.export_dir, self._export_meta())
        stats = accuracy_stats(self.history)
        if stats.get("reports"):
            window = min(20, stats["reports"])
            print(f"{self.run_dir}\n  test error {stats['error_last20']:.2f} % (median of the last "
                  f"{window} reports; stats/accuracy.json)", file=sys.stderr)
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
        print("\n".join(lines), file=sys.stderr)

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
            self._bar.update(c.batch)
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
                unlabeled = self.distribute(next(unlabeled_it))
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

    def _args(self) -> dict:
        """The settings args/args.json records (compared when the run resumes: libml/runargs.py)."""
        c = self.config
        return dict(self.hparams, dataset=c.dataset, algorithm=self.algorithm,
                    train_kimg=c.train_kimg, report_kimg=c.report_kimg, save_kimg=c.save_kimg,
                    keep_ckpt=c.keep_ckpt, mixed_precision=c.mixed_precision,
                    precision=self.model.precision,
                    jit_compile=c.jit_compile, load_checkpoint=c.load_checkpoint,
                    image_shape=list(self.info.shape), class_names=list(self.info.class_names))

    # -- evaluation and reporting -------------------------------------------------------------
    def _eval_sets(self) -> dict:
        b, d = self.config.eval_batch, self.data
        return {"train_labeled": self.distribute(d.eval_labeled(b)),
                "valid": self.distribute(d.valid(b)), "test": self.distribute(d.test(b))}

    def evaluate(self, ema: bool = True, sets=EVAL_SETS, keep=("valid",)):
        """libml.evaluate.Evaluator.evaluate on this run's evaluation sets."""
        return self.evaluator.evaluate(ema, sets, keep)

    def _report(self, writer, step: int, means: dict) -> None:
        accuracy, kept = self.evaluate(ema=True, keep=("valid", "train_labeled"))
        confidence = kept["valid"]["probs"].max(axis=1) if len(kept["valid"]["probs"]) else None
        kimg = step / KIMG
        with writer.as_default(step=step):
            write_scalar("accuracy/train_labeled", accuracy["train_labeled"])
            write_scalar("accuracy/valid", accuracy["valid"])
            write_scalar("accuracy", accuracy["test"])
            for key, value in means.items():
                write_scalar(key, value)
            write_scalar("monitors/lr", self.config.lr)
            write_scalar("monitors/kimg", kimg)
            if confidence is not None:
                write_histogram("monitors/unlabeled_confidence", confidence)
            if self.gamma_hook is not None:
                self._report_gamma(step, kept, accuracy)
        writer.flush()
        self.history = [h for h in self.history if h["step"] < step]
        self.history.append(dict(step=step, kimg=kimg, **{k: finite_or_none(v) for k, v in accuracy.items()}))
        if not self.role.is_chief:
            return
        write_json(os.path.join(self.run_dir, HISTORY_FILE), self.history, overwrite=True)
        write_json(os.path.join(self.run_dir, STATS_FILE), accuracy_stats(self.history), overwrite=True)
        self._bar.write(f"kimg {kimg:<8g} accuracy train/valid/test  {accuracy['train_labeled']:.2f}  "
                        f"{accuracy['valid']:.2f}  {accuracy['test']:.2f}   "
                        f"{means.get('monitors/img_per_sec', 0):.0f} img/s")
        self._bar.report(step, accuracy["test"])

    def _report_gamma(self, step: int, kept: dict, accuracy: dict) -> None:
        """--gamma=auto: the EMA model's pooled features of one window of unlabeled images (one
        extra pass of --eval_batch images); the hook updates gamma (libml/gamma_auto.py)."""
        c, hook = self.config, self.gamma_hook
        window = self.distribute(self.data.unlabeled_window(c.eval_batch,
                                                            hook.window_index(step, c.report_nimg)))
        outputs = self.evaluator.outputs(window)
        record = hook.report(step, outputs["features"], kept, accuracy)
        raw = "n/a" if record["ood_share_raw"] is None else f"{record['ood_share_raw']:.3f}"
        self._bar.write(f"kimg {step / KIMG:<8g} gamma {record['gamma']:.3f}  OOD share estimate "
                        f"{record['ood_share_estimate']:.3f} (raw {raw}, reference {record['reference']}"
                        f"{', trusted' if record['trusted'] else ''})")

    def _load_history(self, step: int) -> None:
        """Report history up to the restored step (reports after it will be redone)."""
        self.history = [h for h in read_history(self.run_dir) if h["step"] <= step]
        if self.gamma_hook is not None:
            self.gamma_hook.load_history(step)

    # -- evaluation only / export -------------------------------------------------------------
    def evaluate_checkpoint(self, path: str) -> dict:
        """--eval_ckpt: raw and EMA accuracy on valid and test, printed and written to JSON
        (`{run}/stats/eval-{checkpoint}.json` beside the checkpoint's run)."""
        prefix = resolve_checkpoint(path)
        read_model(self.model, prefix)
        result = dict(checkpoint=prefix, step=int(self.model.step.numpy()),
                      kimg=int(self.model.step.numpy()) / KIMG)
        for ema, label in ((False, "raw"), (True, "ema")):
            accuracy, _ = self.evaluate(ema=ema, sets=("valid", "test"))
            result[label] = {k: finite_or_none(v) for k, v in accuracy.items()}
        print(f"{'':8s} {'valid':>8s} {'test':>8s}")
        for label in ("raw", "ema"):
            r = result[label]
            print(f"{label:8s} {_pct(r['valid']):>8s} {_pct(r['test']):>8s}")
        run_dir = os.path.dirname(os.path.dirname(prefix))
        out = os.path.join(run_dir, "stats", f"eval-{os.path.basename(prefix)}.json")
        if self.role.is_chief:
            write_json(out, result, overwrite=True)
        print(f"wrote {out}")
        result["output"] = out
        return result

    def export_latest(self) -> dict:
        """--export_only: exports the newest checkpoint of this run (holding the run's lock)."""
        prefix = latest_checkpoint(self.tf_dir)
        if not prefix:
            raise UserError(f"{self.run_dir} has no complete checkpoint to export: train first "
                            f"(the same command without --export_only)")
        if not self.role.is_chief:         # the reads (collectives) only, nothing written
            read_model(self.model, prefix)
            join_export(self.model, self.info)
            return {}
        with RunLock(self.run_dir):
            read_model(self.model, prefix)
            with disk_errors(self.export_dir, what="the export"):
                paths = export_model(self.model, self.info, self.export_dir, self._export_meta())
        print(f"exported {prefix} to {self.export_dir}")
        return paths

    def _export_meta(self) -> dict:
        return dict(dataset=self.config.dataset, algorithm=self.algorithm,
                    step=int(self.model.step.numpy()), hparams=self.hparams)


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"
