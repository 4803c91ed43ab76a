"""A run's recorded settings (`{run}/args/args.json`) against those of a new launch.

When a run resumes, some settings may change and some may not:

- RESUMABLE: how long and how often (run length, report/save cadence, checkpoints kept), how
  the run is shown or exported, and speed switches. They change neither what a step computes
  nor what a checkpoint holds. The new value is recorded (args.json holds what is in effect).
- START_ONLY: read only when the run starts from scratch (--load_checkpoint). A resumed run
  ignores a new value; the recorded one stays.
- everything else is fixed: precision (a float16 run's checkpoints hold the loss scale; bf16
  and float32 compute different numbers; --mixed_precision itself may change when the
  precision it resolves to does not, e.g. auto -> none where auto means float32), architecture, dataset and its classes, algorithm and
  its hyper-parameters (most of these are in the run folder's name as well).

`resume_args(recorded, current, run_dir)` returns the settings to record and the notes to
print, or raises a UserError naming every fixed setting that differs and the fix: resume with
the recorded values or start another run. It never suggests deleting the run.
"""
import dataclasses
import math
from typing import List, Tuple

from libml.base.errors import UserError

RESUMABLE = frozenset({"train_kimg", "report_kimg", "save_kimg", "keep_ckpt", "eval_batch",
                       "progress", "export", "jit_compile", "deterministic", "data_dir",
                       "data_autotune"})
START_ONLY = frozenset({"load_checkpoint"})
# Recorded facts that are not flags (shown without `--`).
NOT_FLAGS = frozenset({"algorithm", "image_shape", "class_names", "nclass", "precision"})


@dataclasses.dataclass(frozen=True)
class Difference:
    name: str
    recorded: object
    current: object
    resumable: bool = False       # resumable here although not in RESUMABLE (see differences)

    @property
    def kind(self) -> str:
        if self.name in RESUMABLE or self.resumable:
            return "resumable"
        return "start_only" if self.name in START_ONLY else "fixed"

    def describe(self) -> str:
        label = self.name if self.name in NOT_FLAGS else f"--{self.name}"
        return f"{label}={_show(self.current)} (recorded {_show(self.recorded)})"


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if value == "":
        return "''"
    return str(value)


def same_value(a, b) -> bool:
    """Equality of recorded (JSON) and current values: numbers with a relative tolerance of
    1e-9, tuples as lists, bools not as numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return a == b


def differences(recorded: dict, current: dict) -> List[Difference]:
    """Settings present in both whose values differ, sorted by name. A setting missing from
    the record (written by an older version) cannot be compared and is not reported.
    --mixed_precision may change when both record the precision it resolved to and that is
    the same (e.g. auto -> none on a CPU where auto means float32): the precision is fixed."""
    same_precision = ("precision" in recorded and "precision" in current
                      and same_value(recorded["precision"], current["precision"]))
    return [Difference(k, recorded[k], current[k], k == "mixed_precision" and same_precision)
            for k in sorted(set(recorded) & set(current))
            if not same_value(recorded[k], current[k])]


def resume_args(recorded: dict, current: dict, run_dir: str) -> Tuple[dict, List[str]]:
    """(settings to record, notes) for resuming `run_dir`; UserError if a fixed one differs."""
    diffs = differences(recorded, current)
    fixed = [d for d in diffs if d.kind == "fixed"]
    if fixed:
        these = "this cannot change" if len(fixed) == 1 else "these cannot change"
        it = "it changes" if len(fixed) == 1 else "they change"
        raise UserError(
            f"{run_dir} was run with other settings: {', '.join(d.describe() for d in fixed)}; "
            f"{these} when a run resumes ({it} what a step computes or what its checkpoints "
            f"hold): re-run with the recorded values (args/args.json) to resume "
            f"it, or pass another --train_dir to start a separate run")
    merged = dict(current)
    merged.update({k: v for k, v in recorded.items() if k not in current})
    notes = []
    changed = [d for d in diffs if d.kind == "resumable"]
    if changed:
        notes.append(f"resuming {run_dir} with changed settings: "
                     + ", ".join(d.describe() for d in changed))
    for d in diffs:
        if d.kind == "start_only":
            merged[d.name] = d.recorded
            notes.append(f"--{d.name} is used only when a run starts: {run_dir} keeps "
                         f"{_show(d.recorded)} (ignored: {_show(d.current)})")
    return merged, notes
