"""The command lines of every experiment of the RealMix paper (Tables 1-6), with the paper's
numbers beside them; optionally runs them, or compares finished runs with the paper.

    python -m runs.paper_commands --table=2                 # print Table 2 (Markdown)
    python -m runs.paper_commands --table=all --seeds=1,2,3,4,5 --train_dir=/ssd/exp
    python -m runs.paper_commands --table=5 --run           # run it (skips finished steps)
    python -m runs.paper_commands --table=1 --results       # measured vs paper

Every experiment is one `Experiment` in `EXPERIMENTS`; the data preparation (create_datasets,
create_split, create_mismatch, extend_unlabeled) is derived from its dataset name and flags.
Settings (paper §4 and spec §11.2): WRN-28-2, Adam lr 0.002, wd 0.02, EMA 0.999, batch 64,
"500k iterations" = --train_kimg=32768 (512 reports of 64 kimg, 524,288 steps), beta 0.75,
w_match 75 (CIFAR) / 250 (SVHN), linear TSA at <= 250 labels, Extend = 50 random-erasing copies,
gamma = 0 / 0.2 / 0.4 / 0.6 / 0.85 at 0-100 % mismatch. The paper reports the standard
deviation over 2 seeds (here splits 1 and 2); libml's own tables used splits 1-5.
"""
import dataclasses
import glob
import json
import math
import os
import shlex
import subprocess
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from absl import flags

from libml.base import cli
from libml.train.config import positive
from libml.base.errors import UserError
from realmix_tf import registry
from runs.experiments import EXPERIMENTS, REPORT_KIMG, TABLES, TRAIN_KIMG, Experiment

FLAGS = flags.FlagValues()
flags.DEFINE_string("table", "all", "Paper table to print or run: 1..6 or all.", flag_values=FLAGS)
flags.DEFINE_list("seeds", ["1", "2"], "Split seeds (the paper: 2 seeds; libml: 1,2,3,4,5).",
                  flag_values=FLAGS)
flags.DEFINE_integer("nvalid", 500, "Validation images taken from the unlabeled set (the dataset "
                     "name's -V; released RealMix: 500, MixMatch tables: 1).", flag_values=FLAGS)
flags.DEFINE_float("train_kimg", 32768, "Run length of every training command, in kimg "
                   "(32768 = 524,288 steps of 64: the paper's 500k iterations).", flag_values=FLAGS)
flags.DEFINE_bool("run", False, "Execute the commands in order, stopping at the first failure; "
                  "finished steps (outputs present, runs with all their reports) are skipped.",
                  flag_values=FLAGS)
flags.DEFINE_bool("results", False, "Print the measured median-of-last-20 error (mean +- std over "
                  "seeds) of finished runs beside the paper's numbers.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", "", "Data folder passed to every command (default: $ML_DATA).",
                    flag_values=FLAGS)
flags.DEFINE_string("train_dir", "./experiments", "Root folder of the runs.", flag_values=FLAGS)

# Flags the trainer leaves out of args.json at their default.
OMITTED_AT_DEFAULT = {"extend": "0", "smoothing": "0", "loss_nclass": "0"}


# ---------------------------------------------------------------------------------------------
# Commands

@dataclasses.dataclass(frozen=True)
class Command:
    """One command line. args may hold {data} and {train}; `outputs` (paths with {data}) all
    present means a data step is done; `experiment`/`dataset` identify a training run."""
    module: str
    args: Tuple[str, ...]
    outputs: Tuple[str, ...] = ()
    experiment: Optional[Experiment] = None
    dataset: str = ""

    def argv(self, data: str, train: str) -> List[str]:
        return [a.format(data=data, train=train) for a in self.args]

    def render(self, data: str, train: str) -> str:
        parts = ["python", "-m", self.module] + [_shell_word(a) for a in self.argv(data, train)]
        return " ".join(parts)


def _shell_word(arg: str) -> str:
    """Quoted for the shell, except $ML_DATA and glob patterns, which the shell must expand."""
    if any(c in arg for c in "*$"):
        return arg
    return shlex.quote(arg)


@dataclasses.dataclass(frozen=True)
class Settings:
    seeds: Tuple[int, ...] = (1, 2)
    nvalid: int = 500
    train_kimg: float = TRAIN_KIMG
    data_dir: str = ""            # passed as --data_dir when set
    train_dir: str = "./experiments"

    def data_flag(self) -> Tuple[str, ...]:
        return ("--data_dir={data}",) if self.data_dir else ()


def _source_of(name: str) -> Tuple[str, str]:
    """(create_datasets name, train file stem) of an SSL dataset name."""
    if name == "svhn_noextra":
        return "svhn", "svhn"
    return name, name


def create_datasets_command(source: str, s: Settings) -> Command:
    outputs = [f"{{data}}/{source}-train.tfrecord", f"{{data}}/{source}-test.tfrecord",
               f"{{data}}/{source}-meta.json"]
    if source == "svhn":
        outputs.append("{data}/svhn_noextra-test.tfrecord")
    return Command("data_prep.create_datasets", (source,) + s.data_flag(), tuple(outputs))


def prep_commands(exp: Experiment, dataset: str, s: Settings) -> List[Command]:
    """The data-preparation commands a training run needs, in order."""
    if exp.module == "realmix_tf.fully_supervised":
        return [create_datasets_command(dataset.split("-")[0], s)]
    from libml.data.names import parse_dataset_name
    d = parse_dataset_name(dataset)
    split = f"{{data}}/SSL/{d.split}"
    split_outputs = (f"{split}-label.tfrecord", f"{split}-unlabel.tfrecord")
    if d.name.startswith("cifar6_mismatch"):
        level = d.name[len("cifar6_mismatch"):]
        labels = () if d.nlabeled == 2400 else (f"--labels_per_class={d.nlabeled // 6}",)
        steps = [create_datasets_command("cifar10", s),
                 Command("data_prep.create_mismatch", ("--source=cifar10", f"--mismatch={level}",
                                                       f"--seed={d.seed}") + labels + s.data_flag(),
                         split_outputs + (f"{{data}}/{d.name}-test.tfrecord", f"{{data}}/{d.name}-meta.json"))]
    else:
        source, stem = _source_of(d.name)
        steps = [create_datasets_command(source, s),
                 Command("data_prep.create_split", (f"--seed={d.seed}", f"--size={d.nlabeled}",
                                                    f"{{data}}/SSL/{d.name}", f"{{data}}/{stem}-train.tfrecord"),
                         split_outputs + (f"{split}-map.json",))]
    values = dict(exp.flags)
    if int(values.get("extend", 0)):
        copies, aug = values["extend"], values.get("extend_aug", "erase")
        folder = f"{{data}}/SSL/extend/{d}/{aug}{copies}-seed0"
        steps.append(Command("data_prep.extend_unlabeled", (f"--dataset={d}", f"--copies={copies}",
                                                            f"--aug={aug}", "--seed=0") + s.data_flag(),
                             (f"{folder}/manifest.json",)))
    return steps


def train_command(exp: Experiment, dataset: str, s: Settings) -> Command:
    train = "{train}/" + exp.subdir if exp.subdir else "{train}"
    args = [f"--dataset={dataset}"] + [f"--{k}={v}" for k, v in exp.flags]
    args += [f"--train_kimg={s.train_kimg:g}", f"--train_dir={train}"] + list(s.data_flag())
    return Command(exp.module, tuple(args), experiment=exp, dataset=dataset)


def extraction_command(exps: Iterable[Experiment], s: Settings) -> Optional[Command]:
    """runs.extract_accuracy over the dataset folders of these experiments (seeds as *)."""
    folders = []
    for exp in exps:
        if not exp.module:
            continue
        dataset = exp.dataset.format(seed="*", nvalid=s.nvalid)
        folder = "/".join(p for p in ("{train}", exp.subdir, dataset) if p)
        if folder not in folders:
            folders.append(folder)
    return Command("runs.extract_accuracy", tuple(folders)) if folders else None


def table_commands(table: int, s: Settings) -> Dict[str, List[Command]]:
    """{'prep': [...], 'train': [...], 'extract': [...]} of one table, without repeats."""
    exps = [e for e in EXPERIMENTS if e.table == table]
    prep, train = [], []
    for exp in exps:
        for dataset in exp.datasets(s.seeds, s.nvalid):
            for c in prep_commands(exp, dataset, s):
                if c not in prep:
                    prep.append(c)
            c = train_command(exp, dataset, s)
            if c not in train:
                train.append(c)
    extract = extraction_command(exps, s)
    return {"prep": prep, "train": train, "extract": [extract] if extract else []}


def module_flags(module_name: str) -> set:
    """The flag names a command-line module accepts: a trainer's from the registry (less the
    ones it refuses), a data script's from its own FlagValues (FLAGS or make_flags()). Imports the module (and TensorFlow)."""
    import importlib
    module = importlib.import_module(module_name)
    if module_name.startswith("realmix_tf.") and module_name != "realmix_tf.predict":
        refused = {"extend"} if registry.get(module_name).model_class().unlabeled is None else set()
        return set(registry.define_flags(module_name)) - refused
    if hasattr(module, "make_flags"):
        return set(module.make_flags())
    return set(module.FLAGS)


def all_commands(s: Settings) -> List[Command]:
    """Every command of every table, without repeats."""
    out: List[Command] = []
    for t in TABLES:
        for group in table_commands(t, s).values():
            out += [c for c in group if c not in out]
    return out


# ---------------------------------------------------------------------------------------------
# Printing

def _paper_table(table: int) -> List[str]:
    """The paper's numbers of one table as a Markdown table (methods x settings)."""
    exps = [e for e in EXPERIMENTS if e.table == table and e.paper_error is not None]
    settings = list(dict.fromkeys(e.setting for e in exps))
    methods = list(dict.fromkeys(e.method for e in exps))
    cell = {(e.method, e.setting): e.paper for e in exps}
    lines = ["| method | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell.get((m, st), "") for st in settings) + " |")
    return lines


def format_table(table: int, s: Settings, data: str, train: str) -> str:
    cmds = table_commands(table, s)
    out = [f"## Table {table}: {TABLES[table]}", "", "Paper:", ""] + _paper_table(table)
    out += ["", "Data preparation:", "", "```bash"]
    out += [c.render(data, train) for c in cmds["prep"]] + ["```", "", "Training:", "", "```bash"]
    for exp in (e for e in EXPERIMENTS if e.table == table):
        note = f" ({exp.note})" if exp.note else ""
        out.append(f"# {exp.method}, {exp.setting}: paper {exp.paper} % error{note}")
        for dataset in exp.datasets(s.seeds, s.nvalid):
            out.append(train_command(exp, dataset, s).render(data, train))
    out += ["```", "", "Median of the last 20 reports (mean ± std over seeds):", "", "```bash"]
    out += [c.render(data, train) for c in cmds["extract"]] + ["```", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Finding finished runs (for --run skips and --results)

def _same(value, wanted: str) -> bool:
    import fnmatch
    if isinstance(value, bool) or value is None:
        return str(value).lower() == wanted.lower()
    try:
        return math.isclose(float(value), float(wanted), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return str(value) == wanted or fnmatch.fnmatch(str(value), wanted)


def matching_runs(command: Command, train: str) -> List[str]:
    """Run folders of `command`: {train_dir}/{dataset}/* whose args/args.json has the
    command's algorithm and every flag value it records."""
    argv = command.argv("", train)
    values = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    root = os.path.join(values.pop("train_dir"), values.pop("dataset"))
    values.pop("data_dir", None)
    for k, default in OMITTED_AT_DEFAULT.items():
        values.setdefault(k, default)
    found = []
    for path in sorted(glob.glob(os.path.join(glob.escape(root), "*", "args", "args.json"))):
        try:
            with open(path) as f:
                args = json.load(f)
        except (OSError, ValueError):
            continue
        if args.get("algorithm") != registry.get(command.module).name:
            continue
        if all(_same(args[k], v) if k in args else OMITTED_AT_DEFAULT.get(k, v) == v
               for k, v in values.items()):
            found.append(os.path.dirname(os.path.dirname(path)))
    return found


def finished_reports(run_dir: str) -> int:
    try:
        with open(os.path.join(run_dir, "stats", "accuracy.json")) as f:
            return int(json.load(f).get("reports", 0))
    except (OSError, ValueError, TypeError):
        return 0


def required_reports(train_kimg: float) -> int:
    return math.ceil(train_kimg / REPORT_KIMG - 1e-9)


def is_done(command: Command, data: str, train: str, s: Settings) -> bool:
    if command.experiment is None:
        return bool(command.outputs) and all(os.path.exists(p.format(data=data)) for p in command.outputs)
    need = required_reports(s.train_kimg)
    return any(finished_reports(r) >= need for r in matching_runs(command, train))


# ---------------------------------------------------------------------------------------------
# Running

def resolve_globs(argv: List[str]) -> List[str]:
    """--flag=pattern arguments expanded like the shell would; exactly one match needed."""
    out = []
    for a in argv:
        if "*" in a and a.startswith("--") and "=" in a:
            name, pattern = a.split("=", 1)
            matches = sorted(glob.glob(pattern))
            if len(matches) != 1:
                raise UserError(f"{name}={pattern} matches {len(matches)} folders: "
                                f"{'run the pretraining first' if not matches else 'keep exactly one'} "
                                f"(see Table 4)")
            a = f"{name}={matches[0]}"
        out.append(a)
    return out


def run_order(c: Command) -> int:
    """Data first, then the ImageNet32 pretraining (Table 4 loads it), other runs, extraction."""
    if c.module == "runs.extract_accuracy":
        return 2
    return 0 if c.experiment is None or c.dataset.startswith("imagenet32") else 1


def run_commands(commands: Sequence[Command], s: Settings, data: str, train: str,
                 runner=subprocess.call) -> int:
    """Runs the commands in order, in the caller's working folder (relative paths mean what
    they mean to the caller); skips finished ones; stops at the first failure (UserError).
    Returns the number of commands run."""
    env = cli.child_env()
    count = 0
    for c in commands:
        shown = c.render(data, train)
        if c.module != "runs.extract_accuracy" and is_done(c, data, train, s):
            print(f"[done] {shown}", flush=True)
            continue
        print(f"[run]  {shown}", flush=True)
        argv = c.argv(data, train)
        if c.module == "runs.extract_accuracy":
            argv = [p for a in argv for p in (sorted(glob.glob(a)) or [a])]
        rc = runner([sys.executable, "-m", c.module] + resolve_globs(argv), env=env)
        count += 1
        if rc != 0:
            raise UserError(f"command failed with exit code {rc}: {shown}: fix the problem shown "
                            f"above and run the same paper_commands line again (finished steps "
                            f"are skipped)")
    return count


def results_lines(table: int, s: Settings, train: str) -> List[str]:
    """Measured median-of-last-20 error (mean ± std over seeds) beside the paper's number."""
    from libml.run.summaries import run_stats
    from runs.extract_accuracy import mean_std
    lines = [f"## Table {table}: {TABLES[table]}", "",
             "| method | setting | paper | measured (mean ± std) | seeds done |", "|---|---|---|---|---|"]
    for exp in (e for e in EXPERIMENTS if e.table == table):
        errors = []
        datasets = exp.datasets(s.seeds, s.nvalid)
        for dataset in datasets:
            runs = matching_runs(train_command(exp, dataset, s), train)
            stats = [run_stats(r) for r in runs]
            stats = [x for x in stats if x and x.get("last20") is not None]
            if stats:
                errors.append(100.0 - stats[0]["last20"])
        measured = mean_std(errors) if errors else "-"
        lines.append(f"| {exp.method} | {exp.setting} | {exp.paper} | {measured} | "
                     f"{len(errors)}/{len(datasets)} |")
    return lines + [""]


# ---------------------------------------------------------------------------------------------

def parse_tables(value: str) -> List[int]:
    if value == "all":
        return sorted(TABLES)
    try:
        tables = [int(t) for t in value.split(",")]
    except ValueError:
        tables = [0]
    bad = [t for t in tables if t not in TABLES]
    if bad:
        raise UserError(f"--table={value}: use 1..{max(TABLES)}, a comma-separated list of them, "
                        f"or all")
    return tables


def parse_seeds(values: Sequence[str]) -> Tuple[int, ...]:
    try:
        seeds = tuple(int(v) for v in values)
    except ValueError:
        seeds = ()
    if not seeds or any(v < 1 for v in seeds):
        raise UserError(f"--seeds={','.join(values)}: use split seeds >= 1, e.g. --seeds=1,2")
    return seeds


def settings_from_flags(fv=FLAGS) -> Settings:
    if fv.nvalid < 1:
        raise UserError(f"--nvalid={fv.nvalid}: use at least 1 validation image")
    positive("train_kimg", fv.train_kimg)
    return Settings(parse_seeds(fv.seeds), fv.nvalid, fv.train_kimg, fv.data_dir, fv.train_dir)


def main(argv=None):
    rest = cli.parse(FLAGS, argv)
    if rest:
        raise UserError(f"unexpected arguments {' '.join(rest)}: every option is a --flag")
    tables = parse_tables(FLAGS.table)
    s = settings_from_flags()
    train = s.train_dir
    if FLAGS.results:
        print("\n".join(line for t in tables for line in results_lines(t, s, train)))
        return 0
    if not FLAGS.run:
        data = s.data_dir or "$ML_DATA"
        print("\n".join(format_table(t, s, data, train) for t in tables))
        return 0
    from libml.data.names import data_dir
    data = data_dir(s.data_dir)
    commands: List[Command] = []
    for t in tables:
        cmds = table_commands(t, s)
        for c in cmds["prep"] + cmds["train"] + cmds["extract"]:
            if c not in commands:
                commands.append(c)
    # Table 4's pretraining must finish before the runs that load it.
    commands.sort(key=run_order)
    run_commands(commands, s, data, train)
    return 0


if __name__ == "__main__":
    cli.run(main, FLAGS)
