"""Test-error curves of one or several runs, drawn to a PNG.

    python -m runs.plot ./experiments/mnist5k.1@100-1/* --output=curves.png
    python -m runs.plot ./experiments/cifar10.*@250-5000 --sets=test,valid --output=cifar.png

Each PATH is a run folder or a folder above run folders (searched recursively; shell patterns
are expanded here too), as for runs.extract_accuracy. A run's curve comes from its
`stats/accuracy_history.json` (one entry per report: kimg and the train_labeled / valid / test
accuracies), else from its TensorBoard event files (tag `accuracy`, or the released RealMix's
`accuracy_test`; test set only). The y axis is the error in % (100 - accuracy), the x axis the
training length in kimg; one line per run and set (test solid, valid dashed, train_labeled
dotted), labelled with the algorithm and the hyper-parameters in which the runs differ. The PNG is written
atomically; an existing file is kept unless --overwrite.
"""
import os
from typing import Dict, List, Sequence, Tuple

from absl import flags

from libml.base import cli
from libml.base.console import plural

from libml.run import summaries
from libml.run.naming import is_digest
from libml.base.errors import UserError
from libml.base.files import atomic_path, check_overwrite

FLAGS = flags.FlagValues()
flags.DEFINE_string("output", "curves.png", "PNG file to write.", flag_values=FLAGS)
flags.DEFINE_list("sets", ["test"], "Sets to draw: test, valid, train_labeled.", flag_values=FLAGS)
flags.DEFINE_string("title", "", "Figure title (default: none).", flag_values=FLAGS)
flags.DEFINE_bool("log", False, "Logarithmic error axis.", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace an existing --output.", flag_values=FLAGS)

SETS = ("test", "valid", "train_labeled")
STYLES = {"test": "-", "valid": "--", "train_labeled": ":"}
KIMG = 1024


def curves(run_dir: str, sets: Sequence[str] = ("test",)) -> Dict[str, Tuple[List[float], List[float]]]:
    """{set: (kimg values, error % values)} of one run; empty when it has no reports yet."""
    history = summaries.read_history(run_dir)
    if history:
        result = {}
        for name in sets:
            points = [(float(h["kimg"]), 100.0 - float(h[name])) for h in history
                      if h.get(name) is not None]
            if points:
                result[name] = ([k for k, _ in points], [e for _, e in points])
        return result
    if "test" not in sets:
        return {}
    for folder in (os.path.join(run_dir, "tf"), run_dir):
        series = summaries.read_event_series(folder)
        if series:
            return {"test": ([step / KIMG for step, _ in series], [100.0 - v for _, v in series])}
    return {}


def labels(run_dirs: Sequence[str]) -> Dict[str, str]:
    """Short legend labels: the algorithm (the run folder's first word), the dataset when the
    runs use several, and the hyper-parameters in which runs of the same algorithm differ (run
    folders are `{Algorithm}_{key}{value}_...`, far too long for a legend under libml's naming;
    a short name's digest is shown only where two labels would otherwise be the same)."""
    parts = {run: os.path.normpath(run).split(os.sep) for run in run_dirs}
    tokens = {run: p[-1].split("_") for run, p in parts.items()}
    common = {}           # algorithm -> tokens all its runs share
    for t in tokens.values():
        common[t[0]] = common[t[0]] & set(t[1:]) if t[0] in common else set(t[1:])
    several_datasets = len({p[-2] for p in parts.values() if len(p) > 1}) > 1
    result = {}
    for run, t in tokens.items():
        text = t[0] + "".join(f" {x}" for x in t[1:] if x not in common[t[0]] and not is_digest(x))
        if several_datasets and len(parts[run]) > 1:
            text = f"{parts[run][-2]} {text}"
        result[run] = text if len(text) <= 60 else text[:57] + "..."
    texts = list(result.values())
    for run, text in result.items():       # the short names' digest only where labels tie
        if texts.count(text) > 1 and is_digest(tokens[run][-1]):
            result[run] = f"{text} {tokens[run][-1]}"
    return result


def draw(run_dirs: Sequence[str], output: str, sets: Sequence[str] = ("test",), title: str = "",
         log: bool = False, overwrite: bool = False) -> int:
    """Writes the PNG; returns the number of curves drawn."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    figure, axes = plt.subplots(figsize=(8, 5), dpi=100)
    drawn, names = 0, labels(run_dirs)
    try:
        for i, run in enumerate(run_dirs):
            colour = f"C{i % 10}"
            for name, (kimg, error) in curves(run, sets).items():
                axes.plot(kimg, error, STYLES[name], color=colour, linewidth=1.5,
                          label=f"{names[run]} ({name})" if len(sets) > 1 else names[run])
                drawn += 1
        if not drawn:
            raise UserError(f"no reports yet in {', '.join(run_dirs)}: plot runs that have "
                            f"reached their first report")
        axes.set_xlabel("kimg (1 kimg = 1024 labeled images)")
        axes.set_ylabel("error %")
        if log:
            axes.set_yscale("log")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
        if title:
            axes.set_title(title)
        figure.tight_layout()
        with atomic_path(output, overwrite) as tmp:
            figure.savefig(tmp, format="png")
    finally:
        plt.close(figure)
    return drawn


def main(argv=None):
    from runs.extract_accuracy import find_run_dirs
    paths = cli.parse(FLAGS, argv)
    if not paths:
        raise UserError("name the run folders: python -m runs.plot ./experiments/cifar10.*@250-5000 "
                        "--output=curves.png")
    unknown = [s for s in FLAGS.sets if s not in SETS]
    if unknown or not FLAGS.sets:
        raise UserError(f"--sets={','.join(FLAGS.sets)}: choose from {', '.join(SETS)}")
    if not FLAGS.output.lower().endswith(".png"):
        raise UserError(f"--output={FLAGS.output}: name a .png file")
    check_overwrite(FLAGS.output, FLAGS.overwrite)
    runs = find_run_dirs(paths)
    if not runs:
        raise UserError(f"no run folders under {' '.join(paths)}: train first, or pass the "
                        f"train_dir of the runs")
    count = draw(runs, FLAGS.output, FLAGS.sets, FLAGS.title, FLAGS.log, FLAGS.overwrite)
    print(f"drew {plural(count, 'curve')} of {plural(len(runs), 'run')} -> {FLAGS.output}")
    return 0


if __name__ == "__main__":
    cli.run(main, FLAGS)
