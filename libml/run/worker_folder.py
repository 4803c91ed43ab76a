"""What a non-chief worker of a multi-worker run keeps, and how every worker resumes together.

Under MultiWorkerMirroredStrategy the chief writes the run folder (libml/run/runfolder.py). The
other workers run the same code, because reading the replicated state (the sync-on-read
BatchNorm statistics) for a save or an export is a collective every worker must join. Here a
non-chief worker:

- writes its copy of each checkpoint to TensorFlow's in-memory file system (`ram://`) and
  deletes it at once: the collectives run, nothing lands on its disk;
- keeps its own input position, which the chief's checkpoint cannot hold (the chief's
  iterators carry the chief's slice of the data), beside the chief's checkpoint in the shared
  run folder: `{run}/tf/worker{w}/input.ckpt-N` (the two input iterators, a few kB for cached
  sets), as many as the run keeps;
- resumes from the checkpoint the chief resumes from (its step is sent to every worker), with
  its own input position of that step; when that file is missing (a kill between the chief's
  save and the worker's), the position is rebuilt by reading step/batch batches from the start
  of its shard, which gives the same stream (every draw is seeded by the run seed and the step).

`follow_chief` also checks that every worker sees the chief's run folder: a `--train_dir` that
is not one shared folder fails at start, in one line, on every worker.
"""
import glob
import json
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Optional

import tensorflow as tf

from libml.run import checkpoints as checkpoint_files
from libml.run.checkpoints import READ_ERRORS, mismatch, read_model
from libml.base.errors import UserError
from libml.run.runfolder import RunFolder
from libml.run.relaunch import LOCK_NAME

INPUT_NAME = "input.ckpt"
SHARED_FIX = ("--train_dir must be one file system folder that every host sees at the same "
              "path (NFS, a shared volume): mount it on every host, then re-run the same "
              "command on every host")


def input_dir(tf_dir: str, worker_id: int) -> str:
    """Where worker `worker_id` keeps its input positions: `{run}/tf/worker{w}`."""
    return os.path.join(tf_dir, f"worker{worker_id}")


def input_checkpoint(iterators) -> tf.train.Checkpoint:
    """The input iterators alone, under the keys of libml.run.checkpoints.make_checkpoint
    (unlabeled None: an algorithm that reads no unlabeled data)."""
    parts = dict(labeled_iterator=iterators[0])
    if iterators[1] is not None:
        parts.update(unlabeled_iterator=iterators[1])
    return tf.train.Checkpoint(**parts)


def workers_sum(strategy, value: int) -> int:
    """The sum over the workers of each one's `value` (a collective: every worker calls it)."""
    local = len(strategy.extended.worker_devices)
    mine = tf.constant(int(value), tf.int64)
    per_replica = strategy.run(lambda: tf.identity(mine))
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
    return int(total.numpy()) // local


class WorkerFolder(RunFolder):
    """A non-chief worker's side of the run folder: no lock, no args, no events; saves only
    its input position. `run_dir` is the chief's (shared) run folder."""

    def __init__(self, run_dir: str, keep: int, worker_id: int):
        super().__init__(run_dir, keep)
        self.worker_id = worker_id
        self.input_dir = input_dir(self.tf_dir, worker_id)
        self._scratch = f"ram://realmix-worker{worker_id}-{os.getpid()}"

    def open(self, args: Dict) -> "WorkerFolder":
        self.args = dict(args)
        self.remove_old_copies()
        return self

    def remove_old_copies(self) -> List[str]:
        """Removes what earlier versions' non-chief worker w left for this run in the system
        temp folder after a kill (`realmix-worker{w}-*/<absolute run path>/`: a full copy of
        the checkpoints and exports). No one else uses them: the chief holds the run's lock."""
        inside = os.path.abspath(self.run_dir).lstrip(os.sep)
        removed = []
        for folder in glob.glob(os.path.join(glob.escape(tempfile.gettempdir()),
                                             f"realmix-worker{self.worker_id}-*")):
            if os.path.isdir(os.path.join(folder, inside)):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        if removed:
            print(f"worker {self.worker_id}: removed {len(removed)} old temporary copy(ies) of "
                  f"this run: {', '.join(removed)}", file=sys.stderr)
        return removed

    def restore(self, read, read_errors=(Exception,)) -> str:
        return ""           # the chief chooses the checkpoint: follow_chief

    def record_args(self) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        if tf.io.gfile.exists(self._scratch):
            tf.io.gfile.rmtree(self._scratch)

    def _write(self, checkpoint, step: int, variables: Dict) -> str:
        scratch = f"{self._scratch}/{checkpoint_files.CHECKPOINT_NAME}-{step}"
        checkpoint.write(scratch)                # the collectives of the chief's save
        tf.io.gfile.rmtree(self._scratch)
        position = input_checkpoint((checkpoint.labeled_iterator,
                                     getattr(checkpoint, "unlabeled_iterator", None)))
        os.makedirs(self.input_dir, exist_ok=True)
        checkpoint_files.save_checkpoint(position, self.input_dir, step, self.keep,
                                         name=INPUT_NAME)
        return os.path.join(self.tf_dir, f"{checkpoint_files.CHECKPOINT_NAME}-{step}")

    # -- resuming with the chief --------------------------------------------------------------
    def shared_problem(self, chief_pid: int, chief_step: int) -> Optional[str]:
        """Why this worker does not see the chief's run folder (None if it does)."""
        lock = os.path.join(self.run_dir, LOCK_NAME)
        try:
            with open(lock) as f:
                holder = json.load(f)
        except (OSError, ValueError):
            holder = {}
        if holder.get("pid") != chief_pid:
            return (f"worker {self.worker_id} does not see the chief's run folder at "
                    f"{self.run_dir} (no {LOCK_NAME} of the chief there)")
        if chief_step >= 0:
            prefix = os.path.join(self.tf_dir, f"{checkpoint_files.CHECKPOINT_NAME}-{chief_step}")
            if not checkpoint_files.is_complete(prefix):
                return (f"worker {self.worker_id} does not see the chief's checkpoint {prefix}")
        return None

    def resume(self, chief_step: int, model, iterators, batch: int) -> str:
        """Reads the chief's checkpoint of `chief_step` (the model) and this worker's input
        position of that step (or rebuilds it); returns the prefix ("" for a fresh start).
        Input positions newer than `chief_step` (saved after the chief's last save) are removed,
        so the next saves never meet them."""
        checkpoint_files.remove_incomplete(self.input_dir, INPUT_NAME)
        for prefix in checkpoint_files.list_checkpoints(self.input_dir, INPUT_NAME):
            if checkpoint_files.checkpoint_step(prefix) > max(chief_step, -1):
                for path in checkpoint_files.checkpoint_files(prefix):
                    os.remove(path)
        if chief_step < 0:
            return ""
        prefix = os.path.join(self.tf_dir, f"{checkpoint_files.CHECKPOINT_NAME}-{chief_step}")
        read_model(model, prefix)
        position = os.path.join(self.input_dir, f"{INPUT_NAME}-{chief_step}")
        if checkpoint_files.is_complete(position):
            input_checkpoint(iterators).read(position).assert_existing_objects_matched()
        else:
            batches = chief_step // batch
            print(f"worker {self.worker_id}: no input position {position}: rebuilding it from "
                  f"the start of this worker's shard ({batches} batches)", file=sys.stderr)
            for it in filter(None, iterators):
                _advance(it, tf.constant(batches, tf.int64))
        self.last_good = prefix
        return prefix


@tf.function
def _advance(iterator, count):
    i = tf.constant(0, tf.int64)
    while i < count:
        iterator.get_next()
        i += 1


def follow_chief(strategy, role, folder: RunFolder, read, model, iterators, batch: int) -> str:
    """Every worker (collectives): the chief chooses the checkpoint to resume from (the newest
    finite one whose variables fit, from its files) and sends its step, with its pid to check
    that the run folder is shared; then every worker reads at once (reading replicated
    variables is a collective too): the chief with `read(prefix)`, each other worker the
    chief's model and its own input position. UserError on every worker if one of them does
    not see the chief's run folder. Returns the prefix read ("" for a fresh start)."""
    chief = role.is_chief
    restored = folder.restore(lambda prefix: _fits(model, prefix), READ_ERRORS) if chief else ""
    step = checkpoint_files.checkpoint_step(restored) if restored else -1
    chief_step = workers_sum(strategy, step + 1 if chief else 0) - 1
    chief_pid = workers_sum(strategy, os.getpid() if chief else 0)
    problem = None if chief else folder.shared_problem(chief_pid, chief_step)
    missing = workers_sum(strategy, 0 if problem is None else 1 << min(role.worker_id, 62))
    if missing:
        if problem is None:
            lost = [w for w in range(role.num_workers) if missing >> min(w, 62) & 1]
            problem = (f"worker{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} "
                       f"{'do' if len(lost) > 1 else 'does'} not see the chief's run folder "
                       f"{folder.run_dir}")
        raise UserError(f"{problem}: {SHARED_FIX}")
    if chief:
        if restored:
            read(restored)
        return restored
    return folder.resume(chief_step, model, iterators, batch)


def _fits(model, prefix: str) -> None:
    problem = mismatch(model, prefix)
    if problem:
        raise ValueError(problem)
