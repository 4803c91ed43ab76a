"""Miniature replication of the RealMix paper's claims on mnist5k (5,000 MNIST digits, offline).

    python -m runs.miniature                                   # all three experiments, seeds 1,2
    python -m runs.miniature --experiments=ablation --seeds=1,2,3
    python -m runs.miniature --quick --experiments=sizes --methods=Supervised,RealMix  # smoke test

Three scaled-down experiments (paper tables in brackets):
  sizes     supervised vs Π-model vs VAT vs MixMatch vs RealMix at two labeled-set sizes
            (Table 2 / Fig. 3);
  mismatch  labeled digits 0-5, 4 unlabeled classes with 0/25/50/75/100 % taken from digits 6-9,
            supervised vs Mean Teacher vs MixMatch vs RealMix (gamma 0/0.2/0.4/0.6/0.85)
            (Table 1 / Fig. 2);
  ablation  RealMix at 75 % mismatch with gamma 0.6 vs 0.3 vs no OOD mask (Table 6);
  gamma_auto (only when asked for) RealMix with --gamma=auto vs the hand-chosen gamma vs no
            mask at every mismatch level, and the estimated OOD share vs the truth
            (docs/usage_gamma_auto.md).
Hyper-parameters are the paper commands' CIFAR-10 ones (runs/experiments.py), the mismatch sets
at the released loss scale (--loss_nclass=10); VAT runs in float32 (it refuses mixed precision).

The script prepares its own data under {work_dir}/ML_DATA (create_datasets mnist5k,
create_split, create_mismatch --source=mnist5k, extend_unlabeled), trains every run in this
process with libml.train.trainer (fresh model per run) under {work_dir}/train_dir, and writes
{output}/results.md, results.json and one PNG per experiment. A cell is the mean ± sample
standard deviation over seeds of the runs' test error % (median of the last --median_last
reports; libml/run/run_error.py), the number each trainer's last line says. Re-running reuses finished runs (their result is cached in
{work_dir}/results/) and resumes interrupted ones from their checkpoints.
"""
import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from absl import flags

from libml.base import cli
from libml.base.errors import UserError
from libml.base.files import write_json
from libml.run import run_error
from runs.experiments import (CIFAR, MISMATCH_GAMMA, MT_CIFAR, PI_CIFAR, RELEASED_LOSS_SCALE,
                              VAT_FLAGS, paper_error)

# TensorFlow is imported only once a run starts: bad flags fail fast and quietly.

FLAGS = flags.FlagValues()
flags.DEFINE_list("experiments", ["sizes", "mismatch", "ablation"], "Experiments to run: sizes, "
                  "mismatch, ablation, gamma_auto, ood_score (the last two not run by default).",
                  flag_values=FLAGS)
flags.DEFINE_list("methods", ["Supervised", "PiModel", "VAT", "MeanTeacher", "MixMatch", "RealMix"],
                  "Methods to "
                  "run (the ablation is RealMix only).", flag_values=FLAGS)
flags.DEFINE_list("seeds", ["1", "2"], "Seeds: each seed is both the split seed (dataset "
                  "mnist5k.{seed}@N-V) and the training seed.", flag_values=FLAGS)
flags.DEFINE_list("sizes", ["50", "100"], "Labeled-set sizes of the sizes experiment (mnist5k: "
                  "10 classes, so 50 = 5 labels per class).", flag_values=FLAGS)
flags.DEFINE_integer("mismatch_labels_per_class", 10, "Labels per class (digits 0-5) of the "
                     "mismatch sets: 10 -> mnist6_mismatch{x}.{seed}@60.", flag_values=FLAGS)
flags.DEFINE_integer("nvalid", 200, "Validation images taken from the front of the unlabeled set "
                     "(the dataset name's -V); they are not trained on.", flag_values=FLAGS)
flags.DEFINE_float("train_kimg", 32, "Length of every run in kimg (1 kimg = 1024 labeled images; "
                   "32 kimg = 512 steps of 64).", flag_values=FLAGS)
flags.DEFINE_integer("reports", 16, "Evaluations per run (--report_kimg = train_kimg / reports).",
                     flag_values=FLAGS)
flags.DEFINE_integer("median_last", 4, "A run's test error is 100 - the median test accuracy "
                     "of its last N reports (the trainer's --median_last; the paper: 20 of "
                     "512; here the last quarter of the 16 reports).", flag_values=FLAGS)
flags.DEFINE_float("warmup_fraction", 0.25, "Ramp-up of the unlabeled-loss weight (MixMatch, "
                   "RealMix) as a fraction of the run (--warmup_kimg = fraction x train_kimg).",
                   flag_values=FLAGS)
flags.DEFINE_integer("filters", 16, "Wide ResNet width (paper: 32).", flag_values=FLAGS)
flags.DEFINE_integer("repeat", 1, "Residual blocks per stage (paper: 4).", flag_values=FLAGS)
flags.DEFINE_integer("batch", 64, "Labeled batch (unlabeled: the same number of images x 2 "
                     "views).", flag_values=FLAGS)
flags.DEFINE_integer("extend", 10, "RealMix's Extend: augmented copies of the unlabeled set "
                     "(paper: 50; 0 = off).", flag_values=FLAGS)
flags.DEFINE_string("extend_aug", "erase", "Augmentation of the Extend copies.", flag_values=FLAGS)
flags.DEFINE_string("mixed_precision", "auto", "auto, none, bf16 or fp16 (see the trainer; auto "
                    "is float32 on CPUs without AMX).", flag_values=FLAGS)
flags.DEFINE_string("work_dir", "./miniature", "Holds ML_DATA/ (the data), train_dir/ (the runs) "
                    "and results/ (one cached result per finished run).", flag_values=FLAGS)
flags.DEFINE_string("output", "docs/miniature", "Folder of results.md, results.json and the PNG "
                    "plots.", flag_values=FLAGS)
flags.DEFINE_bool("data_autotune", True, "Passed to every run (--nodata_autotune: fixed tf.data "
                  "parallelism, for a busy shared CPU; no effect on the results).", flag_values=FLAGS)
flags.DEFINE_list("levels", ["0", "25", "50", "75", "100"], "Mismatch levels of the ood_score "
                  "experiment.", flag_values=FLAGS)
flags.DEFINE_bool("quick", False, "Tiny settings for a smoke test: the first seed and label "
                  "count only, train_kimg 0.25, 2 reports, filters 8, batch 32, Extend 2 copies.",
                  flag_values=FLAGS)

EXPERIMENTS = ("sizes", "mismatch", "ablation", "gamma_auto", "ood_score")
DEFAULT_EXPERIMENTS = EXPERIMENTS[:3]
AUTO_ROWS = (("auto", "RealMix (γ = auto)"), ("hand", "RealMix (γ per level)"), (0.0, "RealMix (γ = 0)"))
SCORE_ROWS = (("prototype", "hand", "RealMix, prototype mask (γ per level)"),
              ("prototype", "auto", "RealMix, prototype mask (γ = auto)"),
              ("confidence", "hand", "RealMix, confidence mask (γ per level)"),
              ("confidence", 0.0, "RealMix (no mask)"))
METHODS = ("Supervised", "PiModel", "VAT", "MeanTeacher", "MixMatch", "RealMix")   # registry names
LEVELS = tuple(MISMATCH_GAMMA)
ABLATION_GAMMAS = ((0.6, "RealMix (γ = 0.6)"), (0.3, "RealMix (γ = 0.3)"), (0.0, "RealMix w/o OOD mask"))
ABLATION_LEVEL = 75


def _paper(table: int, method: str, settings) -> str:
    return " / ".join(f"{paper_error(table, method, x):.2f}" for x in settings)


SIZES, PCTS = ("250 labels", "4000 labels"), tuple(f"{level}%" for level in LEVELS)
PAPER = {   # CIFAR-10 error % of the paper (runs/experiments.py), for the pattern (not the values)
    "sizes": f"Table 2 (250 / 4000 labels): MixMatch {_paper(2, 'MixMatch [2]', SIZES)}, RealMix "
             f"{_paper(2, 'RealMix', SIZES)}; Π-model {_paper(2, 'Π-Model [8]', SIZES)}, VAT "
             f"{_paper(2, 'VAT [9]', SIZES)}, Mean Teacher {_paper(2, 'Mean Teacher [14]', SIZES)}",
    "mismatch": f"Table 1 (0/25/50/75/100 %): supervised {_paper(1, 'Supervised (labeled only)', ['all levels'])}; "
                f"Mean Teacher {_paper(1, 'MT [14]', PCTS)}; MixMatch {_paper(1, 'MM [2]', PCTS)}; "
                f"RealMix {_paper(1, 'RealMix', PCTS)}",
    "ablation": "Table 6 (75 %): " + ", ".join(
        f"{label} {_paper(6, method, ['75% mismatch'])}" for label, method in
        (("γ = 0.6", "RealMix (γ = 0.60)"), ("γ = 0.3", "RealMix (γ = 0.3)"),
         ("no mask", "RealMix w/o OODMask")))
        + f"; supervised {_paper(1, 'Supervised (labeled only)', ['all levels'])}",
    "gamma_auto": "Table 1 (0/25/50/75/100 %), RealMix with γ chosen by hand per level: "
                  f"{_paper(1, 'RealMix', PCTS)} (no paper estimates γ from the data)",
    "ood_score": "Table 1 (0/25/50/75/100 %), RealMix with its confidence mask: "
                 f"{_paper(1, 'RealMix', PCTS)}; no mask at 75 %: "
                 f"{_paper(6, 'RealMix w/o OODMask', ['75% mismatch'])} (the paper has no "
                 "feature-space mask)",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    seeds: Tuple[int, ...] = (1, 2)
    sizes: Tuple[int, ...] = (50, 100)
    methods: Tuple[str, ...] = tuple(METHODS)
    experiments: Tuple[str, ...] = DEFAULT_EXPERIMENTS
    mismatch_labels_per_class: int = 10
    nvalid: int = 200
    train_kimg: float = 32
    reports: int = 16
    median_last: int = 4
    warmup_fraction: float = 0.25
    filters: int = 16
    repeat: int = 1
    batch: int = 64
    extend: int = 10
    extend_aug: str = "erase"
    mixed_precision: str = "auto"
    data_autotune: bool = True
    levels: Tuple[int, ...] = LEVELS       # of the ood_score experiment

    @property
    def report_kimg(self) -> float:
        return self.train_kimg / self.reports

    @property
    def mismatch_labels(self) -> int:
        return 6 * self.mismatch_labels_per_class


QUICK = dict(train_kimg=0.25, reports=2, median_last=1, filters=8, batch=32, extend=2)


# ---------------------------------------------------------------------------------------------
# Runs and cells

@dataclasses.dataclass(frozen=True)
class Run:
    """One training run; runs shared by several cells (the supervised baseline of every
    mismatch level, gamma 0.6 at 75 %) are trained once."""
    method: str
    dataset: str
    seed: int
    hparams: Tuple[Tuple[str, object], ...] = ()    # the algorithm's keyword arguments
    extend: int = 0

    def key(self, s: Settings) -> str:
        text = json.dumps([self.method, self.dataset, self.seed, list(self.hparams), self.extend,
                           s.extend_aug if self.extend else "", s.train_kimg, s.reports, s.filters,
                           s.repeat, s.batch, s.mixed_precision, "short_run_scaling"])
        return f"{self.method}-{self.dataset}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


@dataclasses.dataclass(frozen=True)
class Cell:
    experiment: str
    row: str          # method label
    column: str       # setting label
    seed: int
    run: Run
    note: str = ""


def sizes_name(n: int, seed: int, s: Settings) -> str:
    return f"mnist5k.{seed}@{n}-{s.nvalid}"


def mismatch_name(level: int, seed: int, s: Settings) -> str:
    return f"mnist6_mismatch{level}.{seed}@{s.mismatch_labels}-{s.nvalid}"


def method_hparams(method: str, s: Settings, **overrides) -> Tuple[Tuple[str, object], ...]:
    """The paper commands' CIFAR-10 hyper-parameters (runs/experiments.py), with the ramp-ups
    scaled to the run length. Values may also be trainer flags (wd, mixed_precision)."""
    warmup = s.warmup_fraction * s.train_kimg
    from realmix_tf import mean_teacher as baseline_losses
    paper = {name: float(value) for name, value in CIFAR}      # beta, w_match
    ramp = dict(warmup_pos=baseline_losses.WARMUP_POS)
    base = {"Supervised": {},
            "PiModel": dict(_values(PI_CIFAR), **ramp),
            "VAT": dict(_values(VAT_FLAGS), mixed_precision="none", **ramp),
            "MeanTeacher": dict(_values(MT_CIFAR), consistency_weight=
                                baseline_losses.MEAN_TEACHER_CONSISTENCY_WEIGHT, **ramp),
            "MixMatch": dict(paper, warmup_kimg=warmup),
            "RealMix": dict(paper, warmup_kimg=warmup, tsa="none", tsa_source="labels",
                            gamma=0.0)}[method]
    base.update(overrides)
    return tuple(sorted(base.items()))


def _values(flag_pairs) -> dict:
    """(("wd", "0.2"), ("loss_nclass", "10")) -> {"wd": 0.2, "loss_nclass": 10}."""
    return {name: int(value) if value.isdigit() else float(value) for name, value in flag_pairs}


def make_run(method: str, dataset: str, seed: int, s: Settings, **overrides) -> Run:
    extend = s.extend if method == "RealMix" else 0
    return Run(method, dataset, seed, method_hparams(method, s, **overrides), extend)


def build_cells(s: Settings) -> List[Cell]:
    cells: List[Cell] = []
    for seed in s.seeds:
        if "sizes" in s.experiments:
            for method in ("Supervised", "PiModel", "VAT", "MixMatch", "RealMix"):
                if method not in s.methods:
                    continue
                for n in s.sizes:
                    # The paper's RealMix at <= 250 labels: linear TSA, no OOD mask, Extend.
                    extra = dict(tsa="linear") if method == "RealMix" else {}
                    cells.append(Cell("sizes", method, f"{n} labels", seed,
                                      make_run(method, sizes_name(n, seed, s), seed, s, **extra)))
        if "mismatch" in s.experiments:
            for method in ("Supervised", "MeanTeacher", "MixMatch", "RealMix"):
                if method not in s.methods:
                    continue
                for level in LEVELS:
                    if method == "Supervised":   # reads only the labels, the same at every level
                        run = make_run(method, mismatch_name(0, seed, s), seed, s)
                        note = "one run per seed (labeled set identical at every level)"
                    else:
                        extra = dict(gamma=MISMATCH_GAMMA[level]) if method == "RealMix" else {}
                        run = make_run(method, mismatch_name(level, seed, s), seed, s,
                                       **_values(RELEASED_LOSS_SCALE), **extra)
                        note = ""
                    label = "RealMix (γ per level)" if method == "RealMix" else method
                    cells.append(Cell("mismatch", label, f"{level}%", seed, run, note))
        if "ablation" in s.experiments and "RealMix" in s.methods:
            column = f"{ABLATION_LEVEL}% mismatch"
            for gamma, label in ABLATION_GAMMAS:
                cells.append(Cell("ablation", label, column, seed,
                                  make_run("RealMix", mismatch_name(ABLATION_LEVEL, seed, s), seed, s,
                                           gamma=gamma, **_values(RELEASED_LOSS_SCALE))))
            if "Supervised" in s.methods:   # the reference the paper quotes beside Table 6
                cells.append(Cell("ablation", "Supervised", column, seed,
                                  make_run("Supervised", mismatch_name(0, seed, s), seed, s),
                                  "the mismatch experiment's supervised run (same labeled set)"))
        if "gamma_auto" in s.experiments and "RealMix" in s.methods:
            # --gamma=auto vs the hand-chosen gamma (the mismatch runs) vs no mask, per level.
            for gamma, label in AUTO_ROWS:
                for level in LEVELS:
                    g = MISMATCH_GAMMA[level] if gamma == "hand" else gamma
                    cells.append(Cell("gamma_auto", label, f"{level}%", seed,
                                      make_run("RealMix", mismatch_name(level, seed, s), seed, s,
                                               gamma=g, **_values(RELEASED_LOSS_SCALE))))
        if "ood_score" in s.experiments and "RealMix" in s.methods:
            # What the mask ranks by (issue 21): prototype vs confidence vs no mask, per level.
            for score, gamma, label in SCORE_ROWS:
                for level in s.levels:
                    g = MISMATCH_GAMMA[level] if gamma == "hand" else gamma
                    extra = {} if score == "confidence" else dict(ood_score=score)
                    cells.append(Cell("ood_score", label, f"{level}%", seed,
                                      make_run("RealMix", mismatch_name(level, seed, s), seed, s,
                                               gamma=g, **extra, **_values(RELEASED_LOSS_SCALE))))
    return cells


def unique_runs(cells: Sequence[Cell]) -> List[Run]:
    return list(dict.fromkeys(c.run for c in cells))


# ---------------------------------------------------------------------------------------------
# Data preparation (the data_prep command lines, called in this process)

def prepare_data(cells: Sequence[Cell], s: Settings, root: str) -> None:
    from data_prep import create_datasets, create_mismatch, create_split
    from libml.data.names import parse_dataset_name
    os.makedirs(os.path.join(root, "SSL"), exist_ok=True)
    datasets = list(dict.fromkeys(c.run.dataset for c in cells))
    if not all(os.path.exists(os.path.join(root, f"mnist5k-{p}")) for p in
               ("train.tfrecord", "test.tfrecord", "meta.json")):
        create_datasets.main(["create_datasets", "mnist5k", f"--data_dir={root}"])
    for name in datasets:
        d = parse_dataset_name(name)
        if os.path.exists(d.label_path(root)) and os.path.exists(d.unlabel_path(root)):
            continue
        if d.name == "mnist5k":
            create_split.main(["create_split", f"--seed={d.seed}", f"--size={d.nlabeled}",
                               os.path.join(root, "SSL", "mnist5k"),
                               os.path.join(root, "mnist5k-train.tfrecord")])
        else:
            level = int(d.name[len("mnist6_mismatch"):])
            # The level's -test.tfrecord and -meta.json do not depend on the seed: a second
            # seed re-writes them (same content) instead of refusing them.
            again = os.path.exists(os.path.join(root, f"{d.name}-meta.json"))
            create_mismatch.main(["create_mismatch", "--source=mnist5k", f"--mismatch={level}",
                                  f"--seed={d.seed}", f"--labels_per_class={s.mismatch_labels_per_class}",
                                  f"--data_dir={root}"] + (["--overwrite"] if again else []))
    for run in unique_runs(cells):
        if run.extend:
            prepare_extension(run.dataset, run.extend, s.extend_aug, root)


def prepare_extension(dataset: str, copies: int, aug: str, root: str) -> None:
    from data_prep import extend_unlabeled
    from libml.data.extend import extended_unlabeled_files
    try:
        extended_unlabeled_files(dataset, root, copies, aug, 0)
        return
    except UserError:
        pass
    extend_unlabeled.main(["extend_unlabeled", f"--dataset={dataset}", f"--copies={copies}",
                           f"--aug={aug}", "--seed=0", "--noprogress", f"--data_dir={root}"])


# ---------------------------------------------------------------------------------------------
# Training

def median_error(test_accuracies: Sequence[float], last: int) -> Optional[float]:
    """The run's test error (libml/run/run_error.py), the number its trainer's last line says."""
    return run_error.error_of(test_accuracies, last)


def run_decay(s: Settings) -> float:
    """EMA decay and BN momentum of every run: what --short_run_scaling gives (1 - 10/steps)."""
    from libml.train.config import TrainConfig
    return TrainConfig(batch=s.batch, train_kimg=s.train_kimg, short_run_scaling=True).effective_decays()[0]


def train_flags(run: Run, s: Settings, root: str, train_dir: str) -> dict:
    """The command-line flags of one run (as `python -m realmix_tf.<module>` would take them)."""
    values = dict(dataset=run.dataset, data_dir=root, train_dir=train_dir, batch=s.batch,
                  train_kimg=s.train_kimg, report_kimg=s.report_kimg, save_kimg=s.train_kimg / 2,
                  keep_ckpt=1, filters=s.filters, repeat=s.repeat, seed=run.seed,
                  mixed_precision=s.mixed_precision, short_run_scaling=True, export=False,
                  progress=False, data_autotune=s.data_autotune, median_last=s.median_last)
    values.update(dict(run.hparams))
    if run.extend:
        values.update(extend=run.extend, extend_aug=s.extend_aug)
    return values


def train_run(run: Run, s: Settings, root: str, train_dir: str) -> dict:
    """Trains one run (resuming it if it was interrupted) with a fresh model, through the same
    flag parsing and checks as its command line; returns its per-report test accuracies, run
    folder and wall time."""
    import keras
    from libml.run.summaries import read_history
    from realmix_tf import registry
    keras.backend.clear_session()
    gc.collect()
    start = time.time()
    run_dir = registry.launch(run.method, train_flags(run, s, root, train_dir))["run_dir"]
    history = read_history(run_dir)
    result = dict(run_dir=run_dir, method=run.method, dataset=run.dataset, seed=run.seed,
                  hparams=dict(run.hparams), extend=run.extend, wall_seconds=time.time() - start,
                  test=[h["test"] for h in history], kimg=[h["kimg"] for h in history])
    if dict(run.hparams).get("gamma") == "auto":
        result.update(ood_share(run_dir, root))
    return result


def ood_share(run_dir: str, root: str) -> dict:
    """--gamma=auto runs: the last report's estimate and gamma (stats/gamma_auto.json), and
    realmix_tf.outliers on the final model (whole-set estimate, true share, AUROC)."""
    from realmix_tf.gamma_auto import HISTORY_FILE
    from libml.base.files import read_json
    from realmix_tf import outliers as inspect
    last = read_json(os.path.join(run_dir, HISTORY_FILE), "re-run the miniature")[-1]
    summary = inspect.inspect(run_dir, root=root, overwrite=True)
    return dict(gamma_final=last["gamma"], estimate_final=last["ood_share_estimate"],
                estimate_inspect=summary["estimated_ood_share"],
                true_share=summary.get("true_ood_share"), auroc=summary.get("auroc"),
                auroc_reference=summary.get("auroc_reference"),
                auroc_confidence=summary.get("auroc_confidence"),
                auroc_mask=summary.get("auroc_mask"), masked_ood_share=summary.get("masked_ood_share"))


def run_all(runs: Sequence[Run], s: Settings, root: str, train_dir: str,
            results_dir: str) -> Dict[Run, dict]:
    """Each run's result, trained unless cached in results_dir/{key}.json."""
    out = {}
    for i, run in enumerate(runs):
        path = os.path.join(results_dir, run.key(s) + ".json")
        if os.path.exists(path):
            with open(path) as f:
                out[run] = json.load(f)
            continue
        print(f"[{i + 1}/{len(runs)}] {run.method} {run.dataset} seed {run.seed} "
              f"{dict(run.hparams)}", file=sys.stderr, flush=True)
        out[run] = train_run(run, s, root, train_dir)
        write_json(path, out[run], overwrite=True)
    return out


# ---------------------------------------------------------------------------------------------
# Tables and plots

def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def aggregate(cells: Sequence[Cell], results: Dict[Run, dict], s: Settings) -> dict:
    """{experiment: {'rows': [...], 'columns': [...], 'errors': {row: {column: [per seed]}},
    'notes': {row: note}}} in the order the cells were built."""
    table: dict = {}
    for c in cells:
        t = table.setdefault(c.experiment, dict(rows=[], columns=[], errors={}, notes={}))
        if c.row not in t["rows"]:
            t["rows"].append(c.row)
        if c.column not in t["columns"]:
            t["columns"].append(c.column)
        if c.note:
            t["notes"][c.row] = c.note
        error = median_error(results[c.run]["test"], s.median_last)
        if error is not None:
            t["errors"].setdefault(c.row, {}).setdefault(c.column, []).append(error)
        if "true_share" in results[c.run]:     # --gamma=auto: the share estimates vs the truth
            for key in SHARE_ROWS:
                value = results[c.run].get(key)
                if value is not None:
                    t.setdefault("shares", {}).setdefault(key, {}).setdefault(c.column, []).append(value)
    return table


SHARE_ROWS = {"true_share": "true OOD share (training unlabeled images)",
              "estimate_final": "estimate at the last report (smoothed)",
              "gamma_final": "γ used after the last report",
              "estimate_inspect": "estimate of the final model on all unlabeled images (inspect)",
              "auroc": "AUROC of the nearest-neighbour score, unlabeled in vs out (inspect)",
              "auroc_reference": "AUROC of the nearest-neighbour score, reference vs unlabeled out (inspect)",
              "auroc_confidence": "AUROC of the confidence (the mask's ranking), unlabeled in vs out (inspect)"}


TITLES = {
    "sizes": "Labeled-set size: mnist5k, error % (paper Table 2 / Fig. 3 pattern)",
    "mismatch": "Distribution mismatch: digits 0-5 labeled, error % (paper Table 1 / Fig. 2 pattern)",
    "ablation": "OOD-mask ablation at 75 % mismatch, error % (paper Table 6 pattern)",
    "gamma_auto": "γ from the data (--gamma=auto) vs γ by hand vs no mask, error %",
    "ood_score": "What the OOD mask ranks by: prototype vs confidence vs no mask, error %",
}


def markdown_table(t: dict, per_seed: bool = False) -> List[str]:
    """Methods x settings: mean ± std over seeds, or (per_seed) each seed's error."""
    def cell(values):
        if per_seed:
            return ", ".join(f"{v:.2f}" for v in values) or "-"
        return format_cell(values)

    lines = ["| method | " + " | ".join(t["columns"]) + " |", "|---" * (len(t["columns"]) + 1) + "|"]
    for row in t["rows"]:
        errors = t["errors"].get(row, {})
        lines.append(f"| {row} | " + " | ".join(cell(errors.get(col, [])) for col in t["columns"]) + " |")
    return lines


def markdown_report(tables: dict, s: Settings, meta: dict) -> str:
    seeds = ", ".join(map(str, s.seeds))
    out = ["# RealMix miniature replication on mnist5k", "",
           f"Seeds {seeds} (split and training seed); each cell is the mean ± sample standard "
           f"deviation over the seeds of the runs' {run_error.name(s.median_last)}, of "
           f"{s.reports} reports per run (EMA model; the number each trainer's last line "
           f"says). Every run: {s.train_kimg:g} kimg "
           f"({round(s.train_kimg * 1024 / s.batch)} steps of batch {s.batch}), a report every "
           f"{s.report_kimg:g} kimg, WRN with filters={s.filters} repeat={s.repeat}, "
           f"--mixed_precision={s.mixed_precision}, EMA decay = BN momentum = {run_decay(s):.6g} "
           f"(1 − 10/steps, as --short_run_scaling), unlabeled-loss ramp-up over "
           f"the first {s.warmup_fraction:g} of the run; RealMix uses Extend = {s.extend} "
           f"'{s.extend_aug}' copies. Validation: the first {s.nvalid} unlabeled images (not "
           f"trained on). Test: 1,000 mnist5k test digits (600 of digits 0-5 for mismatch).", ""]
    for name in EXPERIMENTS:
        if name not in tables:
            continue
        t = tables[name]
        out += [f"## {TITLES[name]}", ""] + markdown_table(t) + [""]
        out += [f"Error % per seed ({seeds}):", ""] + markdown_table(t, per_seed=True) + [""]
        if t.get("shares"):
            out += ["Share of out-of-distribution unlabeled images, mean over seeds:", "",
                    "| quantity | " + " | ".join(t["columns"]) + " |", "|---" * (len(t["columns"]) + 1) + "|"]
            for key, label in SHARE_ROWS.items():
                row = t["shares"].get(key, {})
                out.append(f"| {label} | " + " | ".join(
                    f"{statistics.mean(row[c]):.3f}" if row.get(c) else "-" for c in t["columns"]) + " |")
            out.append("")
        for row, note in t["notes"].items():
            out.append(f"- {row}: {note}.")
        out += [f"- Paper, CIFAR-10: {PAPER[name]}.", f"- Plot: `{name}.png`.", ""]
    out += ["## Run", "", f"- Command: `{meta['command']}`",
            f"- Runs: {meta['runs']}, of which {meta['runs_trained']} trained by this invocation "
            f"(the others reused from earlier ones); wall time of this invocation "
            f"{meta['wall_minutes']:.1f} min (including data preparation); sum of the training "
            f"wall times of all {meta['runs']} runs {meta['run_minutes']:.1f} min.",
            f"- Machine: {meta['machine']}; load average at start / end: {meta['load_start']} / "
            f"{meta['load_end']}.", f"- Finished {meta['finished']}.", ""]
    return "\n".join(out)


def plot(name: str, t: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    columns = t["columns"]
    if name == "ablation":
        rows = t["rows"]
        stats = [mean_std(t["errors"].get(r, {}).get(columns[0], [math.nan])) for r in rows]
        ax.bar(range(len(rows)), [m for m, _ in stats], yerr=[sd or 0 for _, sd in stats],
               capsize=6, color=["tab:green", "tab:olive", "tab:gray", "tab:blue"][:len(rows)])
        ax.set_xticks(range(len(rows)), [r.replace(" (", "\n(").replace(" w/o", "\nw/o") for r in rows])
        ax.set_xlabel(columns[0])
    else:
        x = list(range(len(columns)))
        for row in t["rows"]:
            errors = t["errors"].get(row, {})
            points = [(i, mean_std(errors[c])) for i, c in enumerate(columns) if errors.get(c)]
            if not points:
                continue
            ax.errorbar([i for i, _ in points], [m for _, (m, _) in points],
                        yerr=[sd or 0 for _, (_, sd) in points], marker="o", capsize=4, label=row,
                        linestyle="--" if row == "Supervised" else "-")
        ax.set_xticks(x, columns)
        ax.set_xlabel("labeled images" if name == "sizes" else "unlabeled images from digits 6-9")
        ax.legend()
    ax.set_ylabel("test error % (mean ± std over seeds)")
    ax.set_title(TITLES[name].split(",")[0] if name != "ablation" else "OOD-mask ablation, 75 % mismatch")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(output: str, cells, results, s: Settings, meta: dict, work_dir: str) -> dict:
    os.makedirs(output, exist_ok=True)
    tables = aggregate(cells, results, s)
    text = markdown_report(tables, s, meta)
    tmp = os.path.join(output, "results.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(output, "results.md"))
    for name, t in tables.items():
        plot(name, t, os.path.join(output, f"{name}.png"))
    # Run folders relative to --work_dir: results.json names no path of the machine it ran on.
    runs = [dict(results[r], key=r.key(s), run_dir=os.path.relpath(results[r]["run_dir"], work_dir))
            for r in unique_runs(cells)]
    for r in runs:
        r["error"] = median_error(r["test"], s.median_last)
    write_json(os.path.join(output, "results.json"),
               dict(settings=dataclasses.asdict(s), meta=meta, tables=tables, runs=runs),
               overwrite=True)
    return tables


# ---------------------------------------------------------------------------------------------
# Command line

def settings_from_flags(fv) -> Settings:
    unknown = [e for e in fv.experiments if e not in EXPERIMENTS]
    if unknown or not fv.experiments:
        raise UserError(f"--experiments={','.join(fv.experiments)}: use one or more of {','.join(EXPERIMENTS)}")
    bad = [m for m in fv.methods if m not in METHODS]
    if bad or not fv.methods:
        raise UserError(f"--methods={','.join(fv.methods)}: use one or more of {','.join(METHODS)}")
    try:
        seeds = tuple(int(x) for x in fv.seeds)
        sizes = tuple(int(x) for x in fv.sizes)
    except ValueError:
        raise UserError(f"--seeds={','.join(fv.seeds)} --sizes={','.join(fv.sizes)}: use "
                        f"comma-separated integers, e.g. --seeds=1,2 --sizes=50,100") from None
    if not seeds or min(seeds) < 1:
        raise UserError(f"--seeds={','.join(fv.seeds)}: use seeds >= 1 (0 takes the first images "
                        f"of each class, the same split for every seed)")
    if not sizes or min(sizes) < 10 or max(sizes) > 3000:
        raise UserError(f"--sizes={','.join(fv.sizes)}: use label counts in [10, 3000] "
                        f"(mnist5k: 4,000 training digits, 10 classes)")
    if not 1 <= fv.mismatch_labels_per_class <= 300:
        raise UserError(f"--mismatch_labels_per_class={fv.mismatch_labels_per_class}: use 1..300")
    if fv.reports < 1 or not 1 <= fv.median_last <= fv.reports:
        raise UserError(f"--reports={fv.reports} --median_last={fv.median_last}: use reports >= 1 "
                        f"and 1 <= median_last <= reports")
    if not 0 <= fv.warmup_fraction <= 1:
        raise UserError(f"--warmup_fraction={fv.warmup_fraction}: use a fraction in [0, 1]")
    try:
        levels = tuple(int(x) for x in fv.levels)
    except ValueError:
        levels = ()
    if not levels or any(x not in LEVELS for x in levels):
        raise UserError(f"--levels={','.join(fv.levels)}: use mismatch levels among "
                        f"{', '.join(map(str, LEVELS))}")
    from libml.train.config import positive       # imports TensorFlow: after the checks above
    positive("train_kimg", fv.train_kimg)
    values = dict(seeds=seeds, sizes=sizes, methods=tuple(fv.methods),
                  experiments=tuple(e for e in EXPERIMENTS if e in fv.experiments),
                  mismatch_labels_per_class=fv.mismatch_labels_per_class, nvalid=fv.nvalid,
                  train_kimg=fv.train_kimg, reports=fv.reports, median_last=fv.median_last,
                  warmup_fraction=fv.warmup_fraction, filters=fv.filters, repeat=fv.repeat,
                  batch=fv.batch, extend=fv.extend, extend_aug=fv.extend_aug,
                  mixed_precision=fv.mixed_precision, data_autotune=fv.data_autotune,
                  levels=levels)
    if fv.quick:
        values.update(QUICK, seeds=seeds[:1], sizes=sizes[:1])
    s = Settings(**values)
    if s.nvalid < 1 or s.filters < 1 or s.repeat < 1 or s.batch < 1 or s.train_kimg <= 0 or s.extend < 0:
        raise UserError("--nvalid, --filters, --repeat, --batch, --train_kimg must be positive and "
                        "--extend >= 0: fix the flag")
    if s.report_kimg * 1024 < s.batch:
        raise UserError(f"--reports={s.reports} makes a report period ({s.report_kimg:g} kimg) "
                        f"shorter than one batch: use fewer reports or a longer --train_kimg")
    return s


def load_average() -> str:
    try:
        return "(" + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + ")"
    except OSError:
        return "n/a"


def miniature(s: Settings, work_dir: str, output: str, command: str) -> dict:
    """Prepares the data, trains every run not yet finished and writes the outputs."""
    start, load_start = time.time(), load_average()
    work_dir = os.path.abspath(work_dir)
    root = os.path.join(work_dir, "ML_DATA")
    train_dir = os.path.join(work_dir, "train_dir")
    results_dir = os.path.join(work_dir, "results")
    cells = build_cells(s)
    if not cells:
        raise UserError(f"no cell to run with --experiments={','.join(s.experiments)} "
                        f"--methods={','.join(s.methods)}: the ablation needs RealMix")
    prepare_data(cells, s, root)
    runs = unique_runs(cells)
    cached = sum(os.path.exists(os.path.join(results_dir, r.key(s) + ".json")) for r in runs)
    results = run_all(runs, s, root, train_dir, results_dir)
    meta = dict(command=command, runs=len(runs), runs_trained=len(runs) - cached,
                wall_minutes=(time.time() - start) / 60,
                run_minutes=sum(results[r]["wall_seconds"] for r in runs) / 60,
                machine=f"{os.cpu_count()} CPUs, no GPU" if not _has_gpu() else "GPU",
                load_start=load_start, load_end=load_average(),
                finished=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    tables = write_outputs(output, cells, results, s, meta, work_dir)
    print(f"wrote {os.path.join(output, 'results.md')} ({len(runs)} runs, "
          f"{meta['wall_minutes']:.1f} min)")
    return dict(tables=tables, meta=meta, cells=cells, results=results)


def _has_gpu() -> bool:
    import tensorflow as tf
    return bool(tf.config.list_physical_devices("GPU"))


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip() + "\n\n" + FLAGS.get_help(include_special_flags=False))
        return 0
    rest = cli.parse(FLAGS, argv)
    if rest:
        raise UserError(f"unexpected arguments {' '.join(rest)}: pass --flag=value")
    s = settings_from_flags(FLAGS)
    command = "python -m runs.miniature " + " ".join(argv[1:])
    miniature(s, FLAGS.work_dir, FLAGS.output, command.strip())
    return 0


if __name__ == "__main__":
    try:
        cli.run(main, FLAGS)
    except SystemExit as done:
        # The finished runs' tf.data iterators are still alive here, and TensorFlow tears them
        # down one worker thread at a time: after 42 runs the interpreter sat idle for more
        # than 5 minutes in their destructors. Every output is written and closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(done.code if isinstance(done.code, int) else 1)
