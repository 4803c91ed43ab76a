"""--eval_ckpt=RUN reads the run's own settings from its args/args.json.

A run folder records the flags it was trained with (libml.train.trainer.Trainer._args). When a
command evaluates it, every flag the user did not pass comes from that record: the dataset, the
architecture, the algorithm's hyper-parameters, the precision. A flag the user passed wins,
except an architecture flag that differs from the run's: the checkpoint could not be read, so
that is one error line naming the recorded value.
"""
import os
import sys
from typing import Dict, List, Optional, Tuple

from libml.base.errors import UserError
from libml.base.files import read_json
from libml.run.relaunch import same_value

ARGS_FILE = os.path.join("args", "args.json")
ARCHITECTURE = ("filters", "repeat", "scales")
# Recorded settings that an evaluation does not take from the run: where this command works,
# what it does, and the unlabeled data (evaluation reads only the labeled, valid and test sets).
NOT_TAKEN = frozenset({"eval_ckpt", "load_checkpoint", "export_only", "train_dir", "data_dir",
                       "extend", "extend_aug", "extend_seed", "shuffle_buffer", "progress"})


def run_folder_of(path: str) -> Optional[str]:
    """The run folder of what --eval_ckpt takes (a run folder, its tf/ folder, a checkpoint
    prefix tf/model.ckpt-N or its .index), if it has args/args.json; else None."""
    path = os.path.abspath(path.rstrip(os.sep) or path)
    if path.endswith(".index"):
        path = path[: -len(".index")]
    for folder in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        if os.path.isfile(os.path.join(folder, ARGS_FILE)):
            return folder
    return None


def recorded_args(run_dir: str) -> dict:
    args = read_json(os.path.join(run_dir, ARGS_FILE), "re-create it: re-run the training "
                     "command of the run (it resumes and records its settings)")
    if not isinstance(args, dict):
        raise UserError(f"{os.path.join(run_dir, ARGS_FILE)} is not a JSON object: re-run the "
                        f"training command of the run (it records its settings)")
    return args


def settings_to_take(recorded: dict, flag_names, passed: Dict[str, object],
                     run_dir: str = "the run") -> Tuple[Dict[str, object], List[str]]:
    """(flag values to set from the record, their names), for the flags among flag_names the
    user did not pass (`passed`: name -> value of the flags given on the command line).
    UserError if a passed architecture flag differs from the recorded one."""
    conflicts = [f"--{k}={passed[k]} (the run has {recorded[k]})" for k in ARCHITECTURE
                 if k in passed and k in recorded and not same_value(passed[k], recorded[k])]
    if conflicts:
        raise UserError(f"{run_dir} was trained with another architecture: "
                        f"{', '.join(conflicts)}; drop these flags (--eval_ckpt reads them from "
                        f"{ARGS_FILE})")
    take = {k: recorded[k] for k in flag_names
            if k in recorded and k not in passed and k not in NOT_TAKEN
            and isinstance(recorded[k], (str, int, float, bool))}
    return take, sorted(take)


def apply_to_flags(flag_values, flag_names) -> Optional[str]:
    """With --eval_ckpt set: the flags the user did not pass take the run's recorded values
    (set on flag_values). Returns the note to print (None when nothing was taken)."""
    path = flag_values["eval_ckpt"].value if "eval_ckpt" in flag_values else ""
    run_dir = run_folder_of(path) if path else None
    if run_dir is None:
        return None
    recorded = recorded_args(run_dir)
    passed = {k: flag_values[k].value for k in flag_names if flag_values[k].present}
    take, names = settings_to_take(recorded, flag_names, passed, run_dir)
    for key, value in take.items():
        flag = flag_values[key]
        flag.value = str(value) if isinstance(flag.default, str) else value
    if not names:
        return None
    shown = [f"--{k}={flag_values[k].value}" for k in names if k in ("dataset",) + ARCHITECTURE]
    more = len(names) - len(shown)
    listed = ", ".join(shown + ([f"{more} more"] if more else []))
    return f"--eval_ckpt: the flags not given come from {os.path.join(run_dir, ARGS_FILE)}: {listed}"


def say(note: Optional[str]) -> None:
    if note:
        print(f"note: {note}", file=sys.stderr)
