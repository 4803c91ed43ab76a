"""What a relaunch on a run folder checks: one trainer per folder (the lock), and the recorded
settings against the new launch's (args.json).

One trainer per run folder.

`RunLock(folder)` holds `{folder}/run.lock` for as long as a trainer works in the folder. The
lock is an flock(2) on that file, so the kernel releases it when the holder exits or is
killed: a lock left by a dead process is stale by construction and the next launch takes it
over (and says so). The file records the holder (pid, host, start time, command line), so a
second launch names who holds the folder in its one-line error. What a killed holder left
half written is removed by the next holder (libml.base.files.remove_stale_temps,
libml.run.checkpoints.remove_incomplete).

A run's recorded settings (`{run}/args/args.json`) against those of a new launch.

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
import datetime
import errno
import fcntl
import json
import math
import os
import socket
import sys
from typing import List, Optional, Tuple

from libml.base.errors import UserError

LOCK_NAME = "run.lock"


def holder_record(argv: Optional[List[str]] = None) -> dict:
    """What a lock file says about its holder: this process."""
    return dict(pid=os.getpid(), host=socket.gethostname(),
                started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                command=" ".join(sys.argv if argv is None else argv)[:300])


def describe_holder(holder: dict) -> str:
    if not holder:
        return "another process (its lock file is empty)"
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
    return text + (f" ({holder['command']})" if holder.get("command") else "")


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 65536)
        return json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


class RunLock:
    """Exclusive use of a run folder. `acquire()` raises UserError (exit code 2) naming the
    holder if another live process has it; `taken_over` is the record of a dead holder whose
    lock this one replaced (or None)."""

    def __init__(self, folder: str, fix: str = "wait for it to finish, or stop it, or pass "
                                                  "another --train_dir"):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.fix = fix
        self.taken_over: Optional[dict] = None
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        from libml.base.storage import disk_errors
        with disk_errors(self.folder, what="the run folder"):
            os.makedirs(self.folder, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    holder = _read_holder(fd)
                    os.close(fd)
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    raise UserError(f"{self.folder} is in use by {describe_holder(holder)}: "
                                    f"{self.fix}") from None
                # The previous holder may have deleted the file between our open and our lock:
                # then we hold a lock on a file nobody else will see. Start again.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                break
            previous = _read_holder(fd)
            self.taken_over = previous or None
            data = json.dumps(holder_record(), sort_keys=True).encode() + b"\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Deletes the lock file (while still holding it, so no one locks a deleted file)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False

    def __del__(self):
        self.release()


RESUMABLE = frozenset({"train_kimg", "report_kimg", "save_kimg", "keep_ckpt", "eval_batch",
                       "progress", "export", "jit_compile", "deterministic", "data_dir",
                       "data_autotune", "median_last"})
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
