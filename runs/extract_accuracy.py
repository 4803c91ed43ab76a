"""Median test accuracy of the last 1/10/20/50 reports of runs, and the table over seeds.

    python -m runs.extract_accuracy ./experiments/cifar10.*@250-500 [more folders or runs ...]

Each PATH is a run folder (`{train_dir}/{dataset}/{Algorithm}_...`) or any folder above run
folders (searched recursively); shell-style patterns are expanded here too. A run's numbers
come from its `stats/accuracy.json` (written by the trainer, or by the released
scripts/extract_accuracy.py), else from its TensorBoard event files under `tf/`: tag
`accuracy` (libml / realmix_tf) or `accuracy_test` (released RealMix), one value per report;
a report written twice (after a resume) counts once, the later value wins.

Printed: one row per run (reports, median accuracy of the last 1/10/20/50 reports), then one
row per experiment = the same run folder name over the seeds of a split (`cifar10.*@250-500`):
the median-of-last-20 error of each seed and their mean ± sample standard deviation, the
number the paper reports (spec §8.3).
"""
import glob
import os
import re
import statistics
from typing import Dict, List, Sequence

from absl import flags

from libml.base import cli
from libml.base.errors import UserError
from libml.run import run_error
from libml.run.summaries import MEDIAN_WINDOWS, TEST_TAGS, run_stats

FLAGS = flags.FlagValues()
flags.DEFINE_list("tags", list(TEST_TAGS), "Event tags of the test accuracy, in order of "
                  "preference.", flag_values=FLAGS)

_SEED = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_]*)\.\d+@")


def is_run_dir(path: str) -> bool:
    return (os.path.exists(os.path.join(path, "stats", "accuracy.json"))
            or os.path.exists(os.path.join(path, "args", "args.json"))
            or bool(glob.glob(os.path.join(path, "tf", "events.out.tfevents.*"))))


def find_run_dirs(paths: Sequence[str]) -> List[str]:
    """Run folders at or below the given paths (patterns expanded), sorted, without repeats."""
    found: List[str] = []
    for pattern in paths:
        matches = sorted(glob.glob(pattern)) or ([pattern] if os.path.exists(pattern) else [])
        if not matches:
            raise UserError(f"{pattern} does not exist: pass run folders or folders above them "
                            f"(e.g. ./experiments/cifar10.*@250-500)")
        for top in matches:
            for folder, subdirs, _ in os.walk(top):
                if is_run_dir(folder):
                    found.append(os.path.normpath(folder))
                    subdirs[:] = []
                else:
                    subdirs.sort()
    return list(dict.fromkeys(found))


def experiment_key(run_dir: str) -> str:
    """`.../cifar10.*@250-500/RealMix_...`: the run with the split seed left out."""
    parent, run = os.path.split(os.path.normpath(run_dir))
    top, dataset = os.path.split(parent)
    return os.path.join(top, _SEED.sub(r"\g<name>.*@", dataset), run)


def mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def report(run_dirs: Sequence[str], tags: Sequence[str]) -> str:
    lines = ["| run | reports | last01 | last10 | last20 | last50 | from |", "|---|---|---|---|---|---|---|"]
    groups: Dict[str, List[float]] = {}
    for run in run_dirs:
        stats = run_stats(run, tags)
        if stats is None:
            lines.append(f"| {run} | 0 | - | - | - | - | no reports yet |")
            continue
        lines.append(f"| {run} | {stats.get('reports', '?')} | " + " | ".join(
            _pct(stats.get(f"last{n:02d}")) for n in MEDIAN_WINDOWS) + f" | {stats['source']} |")
        groups.setdefault(experiment_key(run), []).append(100.0 - stats["last20"])
    lines += ["", f"{run_error.name(20).capitalize()}, over seeds:", "",
              "| experiment | seeds | error per seed | mean ± std |", "|---|---|---|---|"]
    for key, errors in groups.items():
        lines.append(f"| {key} | {len(errors)} | {', '.join(f'{e:.2f}' for e in errors)} | "
                     f"{mean_std(errors)} |")
    return "\n".join(lines)


def main(argv=None):
    paths = cli.parse(FLAGS, argv)
    if not paths:
        raise UserError("name the run folders: python -m runs.extract_accuracy ./experiments/cifar10.*@250-500")
    runs = find_run_dirs(paths)
    if not runs:
        raise UserError(f"no run folders (with stats/accuracy.json, args/args.json or tf/events.*) "
                        f"under {' '.join(paths)}: train first, or pass the train_dir of the runs")
    print(report(runs, FLAGS.tags))
    return 0


if __name__ == "__main__":
    cli.run(main, FLAGS)
