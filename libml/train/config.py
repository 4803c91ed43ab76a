"""TrainConfig: every setting of the trainer, its command-line flag, and its check.

Each field is declared once, with its default, its --help text and its check:

    batch: int = option(64, "Labeled batch size B ...", positive)

`define_train_flags` makes one absl flag per field (DEFINE_integer/float/bool/string from the
field's type) and `TrainConfig.validate` runs each field's check, then the checks that involve
several fields. So a value is validated in one place, whether it comes from the command line
(`config_from_flags`), from `realmix_tf.registry.launch` or from Python code.

Algorithm hyper-parameters are not here: each algorithm defines its own flags, and its model
constructor checks them (realmix_tf/*.py).
"""
import dataclasses
import math
from typing import Callable, Optional

from absl import flags

from libml.train import devices
from libml.run.checkpoints import checkpoint_exists
from libml.base.errors import UserError
from libml.data.names import parse_dataset_name

KIMG = 1024
PRECISION_CHOICES = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
PRECISIONS = tuple(PRECISION_CHOICES.values())       # Keras dtype policies of SSLModel
SHORT_RUN_HORIZON = 10      # --short_run_scaling: decays keep e^-10 of the start after a run
SHORT_RUN_RAMP = 0.25       # --short_run_scaling: warm-ups in kimg end by a quarter of the run
KIMG_RAMPS = ("warmup_kimg", "op_start_kimg", "start_fix_kimg")   # hyper-parameters that are
        # warm-ups in kimg (MixMatch, RealMix; IOMatch's open-set start; OpenMatch's start_fix;
        # the others' ramps are fractions of --train_kimg)


def whole_kimg(value):
    """A kimg count as given (fractions allowed), shown as an int when it is whole (run-folder
    names keep libml's `train_kimg65536`)."""
    value = float(value)
    return int(value) if value.is_integer() else value


def _extend_augmentations():
    from libml.data.augment import AUGMENTATIONS
    return tuple(AUGMENTATIONS)


# ---------------------------------------------------------------------------------------------
# Checks of one value: check(name, value) raises a one-line UserError. The numeric ones refuse
# nan and inf first (absl parses them as floats), so every float flag checked here is finite.

def finite(name, value):
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"--{name}={value} is not a finite number: pass a finite value")


def positive(name, value):
    finite(name, value)
    if not value > 0:
        raise UserError(f"--{name}={value} must be positive: pass a value > 0")


def non_negative(fix: str) -> Callable:
    def check(name, value):
        finite(name, value)
        if value < 0:
            raise UserError(f"--{name}={value} is negative: {fix}")
    return check


def decay(name, value):
    finite(name, value)
    if not 0 <= value < 1:
        raise UserError(f"--{name}={value} is out of range: use a decay in [0, 1)")


def fraction(released: str) -> Callable:
    """A check of a fraction of the run in [0, 1]; `released`: the released default (text)."""
    def check(name, value):
        finite(name, value)
        if not 0 <= value <= 1:
            raise UserError(f"--{name}={value} is out of range: use a fraction of the run in "
                            f"[0, 1] ({released})")
    return check


def one_of(*choices) -> Callable:
    def check(name, value):
        if value not in choices:
            raise UserError(f"--{name}={value!r} is unknown: use one of {', '.join(choices)}")
    return check


def existing_checkpoint(name, path):
    if path and not checkpoint_exists(path):
        raise UserError(f"--{name}={path} not found: pass a run folder, its tf/ folder, a "
                        f"checkpoint prefix (tf/model.ckpt-N) or an exported .keras file")


def option(default, help: str, check: Optional[Callable] = None):
    """A TrainConfig field that is also a command-line flag."""
    return dataclasses.field(default=default, metadata=dict(help=help, check=check))


# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainConfig:
    """Everything the trainer needs. Defaults are the released code's (spec §2)."""
    dataset: str = option("cifar10.3@250-5000", "Dataset name {name}.{seed}@{nlabeled}-{nvalid} "
                          "(e.g. cifar10.3@250-5000) or {name}.{nlabeled}.")
    data_dir: str = option("", "Data folder; default $ML_DATA.")
    train_dir: str = option("./experiments", "Root folder of the runs.")
    batch: int = option(64, "Labeled batch size B (global over all devices); the unlabeled "
                        "batch is what the algorithm declares (MixMatch, RealMix: B images x 2 "
                        "views; FixMatch: B x --uratio images x weak + strong).", positive)
    lr: float = option(0.002, "Adam learning rate (constant).", positive)
    wd: float = option(0.02, "Decoupled weight decay: kernels *= 1 - wd*lr after each step.",
                       non_negative("pass a weight decay >= 0"))
    ema: float = option(0.999, "EMA decay of the weights used for evaluation.", decay)
    bn_momentum: float = option(0.999, "BatchNorm moving-statistics momentum.", decay)
    short_run_scaling: bool = option(True, "Adapt a run shorter than its averages and warm-up "
                                     "(the start banner says what changed): --ema and "
                                     "--bn_momentum at most 1 - 10/steps, so the averages forget "
                                     "the random start, and --warmup_kimg at most a quarter of "
                                     "the run. No effect on runs of 10,000 steps and 4096 kimg or "
                                     "more at the defaults (the paper's); --noshort_run_scaling "
                                     "keeps the flags as given.")
    train_kimg: float = option(65536, "Run length in kibi-images (1 kimg = 1024 labeled images); "
                               "fractions allowed.", positive)
    report_kimg: float = option(64, "Evaluation and summary period in kimg.", positive)
    save_kimg: float = option(64, "Checkpoint period in kimg.", positive)
    median_last: int = option(20, "The run's test error is 100 - the median test accuracy "
                              "of its last N reports (libml/run/run_error.py): 20 = the "
                              "libml / paper protocol; short runs: the last quarter of "
                              "their reports.", positive)
    keep_ckpt: int = option(50, "Checkpoints kept (oldest deleted).", positive)
    filters: int = option(32, "Width of the first ResNet stage (32 = WRN-28-2).", positive)
    repeat: int = option(4, "Residual blocks per stage (4 = 28 layers).", positive)
    scales: int = option(0, "Resolution stages; 0 = ceil(log2(width)) - 2.",
                         non_negative("use 0 (from the image size) or more"))
    seed: int = option(0, "Run seed: initial weights, data order, augmentation and per-step draws.",
                       non_negative("use a seed >= 0"))
    mixed_precision: str = option("auto", "auto (GPUs: bf16 from compute capability 8.0, "
                                  "older ones fp16 with loss scaling; CPUs: float32 or bf16, "
                                  "whichever a few timed steps found faster, measured once per "
                                  "CPU model and TensorFlow version and cached; a resumed run "
                                  "keeps its recorded precision), none (float32), bf16 or fp16.",
                                  one_of("auto", "none", "bf16", "fp16"))
    jit_compile: bool = option(False, "Compile the training step with XLA.")
    distribute: str = option("auto", "Devices: auto (several hosts from TF_CONFIG, else all local "
                             "GPUs, else one device), none (one device), mirrored (all local "
                             "GPUs or --cpu_devices), multiworker (hosts from TF_CONFIG). --batch "
                             "stays the global batch (docs/usage_distributed.md).",
                             one_of(*devices.DISTRIBUTE_CHOICES))
    replica_mode: str = option(devices.GLOBAL, "With several replicas: global (the step equals "
                               "one device on the global batch: BN statistics, MixUp partners, "
                               "OOD percentile and loss means over all replicas) or per_replica "
                               "(each replica alone, as the released code on several GPUs; "
                               "cheaper).", one_of(*devices.REPLICA_MODES))
    cpu_devices: int = option(0, "Split the CPU into N logical devices (tests, trying "
                              "--distribute on a laptop); 0 = $" + devices.CPU_DEVICES_ENV
                              + " or off.", non_negative("use 0 (off) or a device count"))
    worker_timeout: float = option(float(devices.DEFAULT_WORKER_TIMEOUT), "Seconds to wait "
                                   "for the other workers at start and in each collective.",
                                   positive)
    collective: str = option("auto", "All-reduce implementation between several hosts "
                             "(MultiWorkerMirroredStrategy): auto (TensorFlow's choice: ring), "
                             "ring, or nccl (GPUs only). One host with several GPUs always "
                             "uses NCCL.", one_of(*devices.COLLECTIVES))
    deterministic: bool = option(False, "Enable TF op determinism (bit-exact reruns and resumes; "
                                 "slower on GPU).")
    data_autotune: bool = option(True, "Let tf.data tune the input pipelines' parallelism and "
                                 "prefetching. --nodata_autotune fixes them instead: no effect "
                                 "on the results, it avoids autotune's stalls on a busy shared "
                                 "CPU (the tests use it).")
    load_checkpoint: str = option("", "Transfer learning: start from this run / checkpoint / "
                                  ".keras export, except the classifier head; step reset.",
                                  existing_checkpoint)
    eval_ckpt: str = option("", "Evaluate this run / checkpoint (raw and EMA weights on valid "
                            "and test), print and write JSON, then exit; flags not given come from the "
                            "run's args/args.json.", existing_checkpoint)
    extend: int = option(0, "Train on K augmented copies of the unlabeled set (paper: 50), made "
                         "by data_prep.extend_unlabeled; 0 = off.",
                         non_negative("use 0 (off) or a number of copies"))
    extend_aug: str = option("erase", "Augmentation of the extension copies: "
                             + ", ".join(_extend_augmentations()) + ".")
    extend_seed: int = option(0, "Seed the extension was made with.", non_negative("use a seed >= 0"))
    shuffle_buffer: int = option(0, "0: a fresh permutation per epoch; N: the released code's "
                                 "shuffle buffer of N records (8192).", non_negative("use 0 or more"))
    eval_batch: int = option(512, "Batch size of evaluation passes.", positive)
    export: bool = option(True, "Export the EMA model (.keras and SavedModel) to {run}/export at "
                          "the end of training.")
    export_only: bool = option(False, "Export the newest checkpoint of the run now, then exit.")
    progress: bool = option(True, "Show a progress bar per report period.")
    run_naming: str = option("short", "Run folder names: short ({Algorithm}_{the hyper-parameters "
                             "that differ from their defaults}_{digest of all}) or libml (every "
                             "hyper-parameter, as the released code). A run already in a "
                             "libml-named folder is continued there.", one_of("short", "libml"))
    algorithm: dict = dataclasses.field(default_factory=dict)   # algorithm hyper-parameters
    # Not a flag: the Keras policy a resumed run recorded (args.json); --mixed_precision=auto
    # keeps it instead of choosing anew (Trainer sets it).
    recorded_precision: str = ""

    def dataset_name(self):
        """The parsed --dataset; trainers with other naming schemes (fully supervised) override it."""
        return parse_dataset_name(self.dataset)

    def data_root(self) -> str:
        """--data_dir, else $ML_DATA."""
        from libml.data.names import data_dir
        return data_dir(self.data_dir)

    def load_data(self, options=None, shard=(0, 1)):
        """The run's streams (libml.data.pipeline.load_ssl; with --extend, the extension shards as the
        unlabeled set); configs with another kind of dataset (fully supervised) override it.
        shard: (worker, workers)."""
        from libml.data.pipeline import load_ssl
        root = self.data_root()
        unlabeled_files = None
        if self.extend:
            from libml.data.extend import extended_unlabeled_files
            unlabeled_files = extended_unlabeled_files(self.dataset, root, self.extend,
                                                       self.extend_aug, self.extend_seed)
        return load_ssl(self.dataset, root, seed=self.seed, unlabeled_files=unlabeled_files,
                        shuffle_buffer=self.shuffle_buffer, options=options, shard=shard)

    def validate(self) -> "TrainConfig":
        """Each field's check, then the combinations; raises UserError with one line naming the fix."""
        self.dataset_name()
        for field in dataclasses.fields(self):
            check = field.metadata.get("check") or (finite if field.type is float else None)
            if check is not None:
                check(field.name, getattr(self, field.name))
        if self.report_kimg > self.train_kimg:
            raise UserError(f"--report_kimg={self.report_kimg} exceeds --train_kimg={self.train_kimg}: "
                            f"report at most once per run length")
        if self.batch > self.report_nimg:
            raise UserError(f"--batch={self.batch} is larger than one report period "
                            f"({self.report_nimg} images): raise --report_kimg or lower --batch")
        if self.extend:
            one_of(*_extend_augmentations())("extend_aug", self.extend_aug)
        if self.eval_ckpt and self.load_checkpoint:
            raise UserError("--eval_ckpt and --load_checkpoint both given: --eval_ckpt evaluates a "
                            "checkpoint as it is, drop --load_checkpoint")
        if self.eval_ckpt and self.export_only:
            raise UserError("--eval_ckpt and --export_only both given: run them one at a time")
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
        """The Keras dtype policy of the run."""
        return self.precision_choice()[0]

    def precision_choice(self):
        """(Keras dtype policy, why): --mixed_precision=auto asks libml.base.machine."""
        if self.mixed_precision == "auto" and self.recorded_precision:
            return self.recorded_precision, ("--mixed_precision=auto: kept from the run's "
                                             "args/args.json (a resumed run keeps its precision)")
        if self.mixed_precision == "auto":
            from libml.train.precision_probe import auto_precision
            policy, reason = auto_precision()
            return policy, f"--mixed_precision=auto: {reason}"
        return PRECISION_CHOICES[self.mixed_precision], f"--mixed_precision={self.mixed_precision}"

    def effective_decays(self):
        """(EMA decay, BN momentum): the flags, or with --short_run_scaling at most
        1 - 10/steps, so that a run of `steps` steps forgets its start (0.999**1200 = 30 %)."""
        if not self.short_run_scaling:
            return self.ema, self.bn_momentum
        cap = max(0.0, 1.0 - SHORT_RUN_HORIZON / self.total_steps)
        return min(self.ema, cap), min(self.bn_momentum, cap)

    def effective_algorithm(self, defaults=None) -> dict:
        """The algorithm's hyper-parameters (`defaults`: the model's, for those not set), with
        --short_run_scaling its warm-ups in kimg (KIMG_RAMPS) at most SHORT_RUN_RAMP of the run."""
        values = dict({k: v for k, v in (defaults or {}).items() if k in KIMG_RAMPS}, **self.algorithm)
        if not self.short_run_scaling:
            return values
        cap = whole_kimg(SHORT_RUN_RAMP * self.train_kimg)
        return {k: (min(whole_kimg(v), cap) if k in KIMG_RAMPS else v) for k, v in values.items()}

    def short_run_changes(self, defaults=None) -> list:
        """[(flag, given, adapted)] of what --short_run_scaling changes (with it off: what it
        would change); `defaults` as in effective_algorithm."""
        scaled = dataclasses.replace(self, short_run_scaling=True)
        given = dict(dict(ema=self.ema, bn_momentum=self.bn_momentum),
                     **dataclasses.replace(self, short_run_scaling=False).effective_algorithm(defaults))
        used = dict(zip(("ema", "bn_momentum"), scaled.effective_decays()),
                    **scaled.effective_algorithm(defaults))
        return [(k, given[k], used[k]) for k in given if used[k] != given[k]]

    def short_run_line(self, defaults=None) -> str:
        """The start banner's line on a run shorter than its averages or warm-up ('' if none)."""
        changes = self.short_run_changes(defaults)
        if not changes:
            return ""
        shown = ", ".join(f"--{k} {_short(a)} -> {_short(b)}" for k, a, b in changes)
        length = f"{whole_kimg(self.train_kimg)} kimg = {self.total_steps} steps"
        if self.short_run_scaling:
            return (f"short run {length}: {shown} (EMA/BN averages over ~1/(1-decay) steps, "
                    f"warm-ups by a quarter of the run); --noshort_run_scaling keeps the flags")
        return (f"short run {length}: --noshort_run_scaling keeps the flags although the "
                f"averages or warm-up outlast the run; the default would use {shown}")

    def model_kwargs(self, defaults=None) -> dict:
        """Constructor arguments of every SSLModel: the shared settings and the algorithm's
        (`defaults` as in effective_algorithm)."""
        ema, bn_momentum = self.effective_decays()
        return dict(filters=self.filters, repeat=self.repeat, scales=self.scales, lr=self.lr,
                    wd=self.wd, ema=ema, bn_momentum=bn_momentum, seed=self.seed,
                    precision=self.precision(), jit_compile=self.jit_compile,
                    replica_mode=self.replica_mode, **self.effective_algorithm(defaults))


def _short(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


def define_flag(name: str, default, help: str, flag_values=flags.FLAGS) -> None:
    """One absl flag, its kind from the default's type (bool, int, float, str)."""
    _DEFINE[type(default)](name, default, help, flag_values=flag_values)


def define_train_flags(flag_values=flags.FLAGS, config_class=TrainConfig) -> None:
    """One flag per field of config_class (TrainConfig or a subclass); idempotent."""
    if "train_dir" in flag_values:
        return
    for field in dataclasses.fields(config_class):
        if "help" in field.metadata:
            _DEFINE[field.type](field.name, field.default, field.metadata["help"],
                                flag_values=flag_values)


def flag_settings(flag_values=flags.FLAGS, config_class=TrainConfig) -> dict:
    """The values of config_class's fields among parsed flags."""
    fields = {f.name for f in dataclasses.fields(config_class)} - {"algorithm"}
    return {name: flag_values[name].value for name in fields if name in flag_values}


def config_from_flags(flag_values=flags.FLAGS, config_class=TrainConfig, overrides=None,
                      **algorithm) -> TrainConfig:
    """The validated config of parsed flags; `overrides`: settings that replace the flags'
    (the original libml flags mapped by realmix_tf's command lines); `algorithm` = the
    algorithm's hyper-parameters."""
    values = flag_settings(flag_values, config_class)
    values.update({k: v for k, v in (overrides or {}).items() if k in values})
    return config_class(**values, algorithm=dict(algorithm)).validate()
