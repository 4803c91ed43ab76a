"""How a trainer uses its run folder, so that a run survives what a shared machine throws at it.

    folder = RunFolder(run_dir, keep=config.keep_ckpt)
    folder.open(args)            # lock (exit 2 if another launch holds it), clean a killed run's
                                 # temporaries, compare args with args/args.json
    prefix = folder.restore(read)    # newest finite checkpoint that reads back
    folder.record_args()         # args.json = the settings in effect (after start-up succeeded)
    ...
    folder.save(checkpoint, step, variables)   # never non-finite, never over an existing one
    folder.close()               # or close(failed=True): removes a folder that start-up created

Checkpoints are found from the files (libml.run.checkpoints), not from TensorFlow's index;
ones that are not finite (written before these checks existed) or that do not read back are
skipped, and renamed aside if an older one is resumed from, so the run's next save never meets
them. A failed start-up leaves no run folder behind.
"""
import os
import re
import shutil
import sys
from typing import Callable, Dict, List, Optional

import numpy as np
import tensorflow as tf

from libml.run import checkpoints as checkpoint_files

from libml.run import finite
from libml.run.naming import is_digest

from libml.run import relaunch as runargs

from libml.run import relaunch as runlock
from libml.base.errors import UserError, first_line
from libml.base.files import remove_stale_temps

ARGS_FILE = os.path.join("args", "args.json")


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def recorded_precision(run_dir: str, known) -> str:
    """The Keras policy `run_dir`'s args/args.json records, if it is one of `known` ('' when
    there is none or it cannot be read: RunFolder.open reports an unreadable file)."""
    import json
    try:
        with open(os.path.join(run_dir, ARGS_FILE)) as f:
            precision = json.load(f).get("precision", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return precision if precision in known else ""


LENGTH_KEY = "train_kimg"


def other_length_note(run_dir: str) -> str:
    """For algorithms whose schedule depends on the run length (RealMix's TSA, Mean Teacher's
    and VAT's warm-ups), --train_kimg is part of the run folder's name, so another value is
    another run. When a new run folder has siblings that differ only in train_kimg and hold
    checkpoints, one line says so (and how to continue one of them) instead of silence. Short
    names (libml/run/naming.py) match whatever their digest; they name train_kimg only when it
    is not the default, so a run of the default length is not found this way."""
    name, parent = os.path.basename(run_dir.rstrip(os.sep)), os.path.dirname(run_dir.rstrip(os.sep))
    match = re.search(rf"(?:^|_){LENGTH_KEY}([^_]+)(?:_|$)", name)
    if not match or not os.path.isdir(parent):
        return ""
    rest = name[match.end(1):]
    *rest_words, last = rest.split("_")
    rest = (re.escape("_".join(rest_words)) + "_[0-9a-f]{%d}" % len(last)
            if rest_words and is_digest(last) else re.escape(rest))   # short names: any digest
    pattern = re.compile(re.escape(name[:match.start(1)]) + r"([^_]+)" + rest + "$")
    others = sorted(m.group(1) for m in map(pattern.match, os.listdir(parent))
                    if m and m.group(1) != match.group(1)
                    and checkpoint_files.list_checkpoints(os.path.join(parent, m.group(0), "tf")))
    if not others:
        return ""
    values = ", ".join(f"--{LENGTH_KEY}={v}" for v in others)
    return (f"note: this is a new run ({run_dir}): --{LENGTH_KEY} sets this algorithm's schedule "
            f"and is part of its folder name, and a run of the same settings exists with "
            f"{values}; to continue that run instead, stop this one and pass its --{LENGTH_KEY}")


class RunFolder:
    def __init__(self, run_dir: str, keep: int, tf_subdir: str = "tf"):
        self.run_dir = run_dir
        self.tf_dir = os.path.join(run_dir, tf_subdir)
        self.keep = keep
        self.lock = runlock.RunLock(run_dir)
        self.args: Dict = {}
        self.last_good: Optional[str] = None     # newest finite checkpoint (restored or saved)
        self._existed = True

    @property
    def args_path(self) -> str:
        return os.path.join(self.run_dir, ARGS_FILE)

    # -- start-up -----------------------------------------------------------------------------
    def open(self, args: Dict) -> "RunFolder":
        """Locks the folder, removes a killed run's leftovers, and compares `args` with the
        recorded ones (UserError naming the settings that cannot change on resume)."""
        self._existed = os.path.isdir(self.run_dir)
        self.lock.acquire()
        try:
            self._start(args)
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def _start(self, args: Dict) -> None:
        holder = self.lock.taken_over
        if holder:
            _say(f"{self.run_dir}: took over the lock of {runlock.describe_holder(holder)}, "
                 f"which no longer runs")
        removed = remove_stale_temps(self.run_dir, min_age=0, folders=True)
        removed += checkpoint_files.remove_incomplete(self.tf_dir)
        if removed:
            _say(f"{self.run_dir}: removed {len(removed)} unfinished temporary file(s) of a "
                 f"stopped run")
        self.args = dict(args)
        if not self._existed:
            note = other_length_note(self.run_dir)
            if note:
                _say(note)
        if os.path.exists(self.args_path):
            from libml.base.files import read_json
            recorded = read_json(self.args_path, "restore it from a backup, or delete only that "
                                                 "file: the next launch records the flags again")
            self.args, notes = runargs.resume_args(recorded, args, self.run_dir)
            for note in notes:
                _say(note)

    def restore(self, read: Callable[[str], None], read_errors=(Exception,)) -> str:
        """Calls read(prefix) on the newest checkpoint that is finite and reads back; returns
        its prefix ("" if the run has none). Skipped newer ones are renamed aside once an older
        one is restored. UserError if none of several checkpoints can be restored."""
        note = checkpoint_files.index_disagreement(self.tf_dir)
        if note:
            _say(note)
        skipped: List[tuple] = []
        for prefix in reversed(checkpoint_files.list_checkpoints(self.tf_dir)):
            try:
                if not finite.checkpoint_is_finite(prefix):
                    skipped.append((prefix, "nonfinite", "holds non-finite weights"))
                    continue
                read(prefix)
            except read_errors as e:
                skipped.append((prefix, "unreadable", first_line(e)))
                continue
            for path, reason, why in skipped:
                aside = checkpoint_files.set_aside(path, reason)
                _say(f"{os.path.basename(path)} {why}: renamed to {os.path.basename(aside)}; "
                     f"resuming from {os.path.basename(prefix)}")
            self.last_good = prefix
            return prefix
        if skipped:
            reasons = "; ".join(f"{os.path.basename(p)} {why}" for p, _, why in skipped[:3])
            raise UserError(f"no checkpoint of {self.tf_dir} can be resumed from ({reasons}): "
                            f"re-run with the flags recorded in {self.args_path}, or pass "
                            f"another --train_dir to start a separate run")
        return ""

    def record_args(self) -> None:
        """Writes args.json with the settings in effect (call once start-up has succeeded)."""
        from libml.base.files import write_json
        from libml.base.storage import disk_errors
        with disk_errors(self.args_path, what="args/args.json"):
            write_json(self.args_path, self.args, overwrite=True)

    # -- training -----------------------------------------------------------------------------
    def check_loss(self, first_bad: Optional[int]) -> None:
        """DivergenceError if a step's loss was not finite (first_bad: its step count)."""
        if first_bad is not None:
            raise finite.DivergenceError("the loss is not finite", first_bad, self.last_good)

    def check_weights(self, step: int, variables: Dict) -> None:
        """DivergenceError naming the variables that hold NaN or Inf (the loss may stay finite
        meanwhile, e.g. when only the EMA weights or BN statistics went bad). Called before a
        report (so that no poisoned figure reaches stats/ or TensorBoard) and before a save."""
        bad = finite.nonfinite_variables(variables)
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise finite.DivergenceError(f"weights are not finite ({shown})", step, self.last_good)

    def save(self, checkpoint, step: int, variables: Dict) -> str:
        """Writes checkpoint `step` unless a variable is not finite (DivergenceError then,
        nothing written). A full or read-only disk is a one-line UserError."""
        self.check_weights(step, variables)
        prefix = self._write(checkpoint, step, variables)
        self.last_good = prefix
        return prefix

    def _write(self, checkpoint, step: int, variables: Dict) -> str:
        resume = (f"it resumes from {os.path.basename(self.last_good)}" if self.last_good
                  else "it starts over")
        return checkpoint_files.save_checkpoint(
            checkpoint, self.tf_dir, step, self.keep, need_bytes=self.checkpoint_bytes(variables),
            resume_note=resume)

    def checkpoint_bytes(self, variables: Dict) -> int:
        """About what one checkpoint takes: the variables' bytes, or the last one's files."""
        size = sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in variables.values())
        if self.last_good:
            on_disk = sum(os.path.getsize(p) for p in checkpoint_files.checkpoint_files(self.last_good)
                          if os.path.exists(p))
            size = max(size, on_disk)
        return size

    # -- end ----------------------------------------------------------------------------------
    def close(self, failed: bool = False) -> None:
        """Releases the lock; after a failed start-up, removes the folder if it was created by
        this launch and holds no file."""
        self.lock.release()
        if failed and not self._existed and os.path.isdir(self.run_dir):
            if not any(files for _, _, files in os.walk(self.run_dir)):
                shutil.rmtree(self.run_dir, ignore_errors=True)
                parent = os.path.dirname(self.run_dir)      # {train_dir}/{dataset}, if empty now
                try:
                    os.rmdir(parent)
                except OSError:
                    pass
