"""Checkpoints: the ones a run folder holds (found from the files themselves), writing them,
what they store and reading them back.

The checkpoints of a run folder, found from the files themselves.

TensorFlow's `tf/checkpoint` index file is only a convenience: a hand-edited one (rolled back,
its timestamps dropped) made CheckpointManager forget every checkpoint, so the run started over
at step 0 and overwrote them. Here a checkpoint is a prefix `model.ckpt-N` whose `.index` file
and every `.data-K-of-M` shard exist, whatever the index file says. `save_checkpoint` writes
the next one under a free name only (never over an existing checkpoint), removes what a failed
write left, deletes the oldest beyond `keep`, and rewrites the index file (with timestamps)
from the files, so TensorFlow's own tools (tf.train.latest_checkpoint) agree.

Checkpoints of an SSLModel: which variables are stored and under which keys, how a path
given on the command line becomes a checkpoint prefix, and reading one back. Which checkpoints
a run folder holds, and writing them: above.

A checkpoint stores `model_variables(model)` (a dict keyed by Keras variable path) plus, while
training, the two input iterators, so a resumed run continues with the same data order.
"""
import glob
import os
import re
import shutil
import time
from typing import Dict, List, Optional

import tensorflow as tf
from absl import logging

from libml.base.errors import UserError, first_line

CHECKPOINT_NAME = "model.ckpt"
INDEX_NAME = "checkpoint"
_DATA = re.compile(r"\.data-(\d+)-of-(\d+)$")
_TEMP_DIR = re.compile(r"^.+-\d+_temp$")                   # TensorFlow's sharded-save folder
_TEMP_INDEX = re.compile(r"^checkpoint\.tmp[0-9a-f]{32}$")  # its atomic index write


def checkpoint_step(prefix: str) -> int:
    """N of `.../model.ckpt-N`."""
    return int(prefix.rsplit("-", 1)[1])


def checkpoint_files(prefix: str) -> List[str]:
    """The files of a checkpoint prefix that exist: `.index` and `.data-*` shards."""
    found = glob.glob(glob.escape(prefix) + ".data-*-of-*")
    if os.path.exists(prefix + ".index"):
        found.append(prefix + ".index")
    return sorted(found)


def is_complete(prefix: str) -> bool:
    """The `.index` file and all M shards `.data-00000-of-M` ... exist."""
    if not os.path.isfile(prefix + ".index"):
        return False
    shards: Dict[int, set] = {}
    for path in glob.glob(glob.escape(prefix) + ".data-*-of-*"):
        match = _DATA.search(path)
        if match:
            shards.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    return any(found == set(range(total)) for total, found in shards.items())


def list_checkpoints(folder: str, name: str = CHECKPOINT_NAME) -> List[str]:
    """Prefixes of the complete checkpoints `{folder}/{name}-N`, oldest (smallest N) first."""
    pattern = re.compile(re.escape(name) + r"-(\d+)\.index$")
    found = []
    for path in glob.glob(os.path.join(glob.escape(folder), f"{name}-*.index")):
        match = pattern.search(os.path.basename(path))
        if match and is_complete(path[: -len(".index")]):
            found.append((int(match.group(1)), path[: -len(".index")]))
    return [prefix for _, prefix in sorted(found)]


def latest_checkpoint(folder: str, name: str = CHECKPOINT_NAME) -> Optional[str]:
    found = list_checkpoints(folder, name)
    return found[-1] if found else None


def remove_incomplete(folder: str, name: str = CHECKPOINT_NAME) -> List[str]:
    """Deletes what a writer killed mid-save left: TensorFlow's `{name}-N_temp/` folders and
    `checkpoint.tmp<hex>` index temporaries, and the shards of checkpoints that never got their
    `.index`. Call it only while holding the run's lock (no one else is saving)."""
    complete = set(list_checkpoints(folder, name))
    removed = []
    if os.path.isdir(folder):
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if os.path.isdir(path) and _TEMP_DIR.match(entry):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            elif _TEMP_INDEX.match(entry):
                os.remove(path)
                removed.append(path)
    for path in glob.glob(os.path.join(glob.escape(folder), f"{name}-*.data-*-of-*")):
        prefix = _DATA.sub("", path)
        if prefix not in complete and not os.path.exists(prefix + ".index"):
            os.remove(path)
            removed.append(path)
    return sorted(removed)


def index_latest(folder: str) -> Optional[str]:
    """What the index file names as the newest checkpoint (None if absent or unreadable)."""
    path = os.path.join(folder, INDEX_NAME)
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("model_checkpoint_path:"):
                    value = line.split(":", 1)[1].strip().strip('"')
                    return value if os.path.isabs(value) else os.path.join(folder, value)
    except (OSError, UnicodeDecodeError):
        return None
    return None


def write_index(folder: str, prefixes: List[str]) -> None:
    """Rewrites `{folder}/checkpoint` (TensorFlow's CheckpointState text format, relative names,
    each checkpoint's `.index` modification time as its timestamp) atomically."""
    from libml.base.files import atomic_path
    if not prefixes:
        return
    names = [os.path.basename(p) for p in prefixes]
    stamps = [_mtime(p + ".index") for p in prefixes]
    lines = [f'model_checkpoint_path: "{names[-1]}"']
    lines += [f'all_model_checkpoint_paths: "{n}"' for n in names]
    lines += [f"all_model_checkpoint_timestamps: {t:.6f}" for t in stamps]
    lines.append(f"last_preserved_timestamp: {min(stamps) - 1:.6f}")
    with atomic_path(os.path.join(folder, INDEX_NAME), overwrite=True) as tmp:
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")


def index_disagreement(folder: str) -> Optional[str]:
    """A note when the index file names another newest checkpoint than the files show."""
    newest, named = latest_checkpoint(folder), index_latest(folder)
    if newest and named and os.path.abspath(named) != os.path.abspath(newest):
        return (f"{os.path.join(folder, INDEX_NAME)} names {os.path.basename(named)} but "
                f"{os.path.basename(newest)} is newer: using the newest checkpoint (to roll "
                f"back, move the newer model.ckpt-* files out of {folder})")
    return None


def set_aside(prefix: str, reason: str) -> str:
    """Renames a checkpoint's files to `{prefix}.{reason}[-k]` (still readable with
    --eval_ckpt, no longer found as a checkpoint of the run); returns the new prefix."""
    target, k = f"{prefix}.{reason}", 1
    while checkpoint_files(target):
        k += 1
        target = f"{prefix}.{reason}-{k}"
    for path in checkpoint_files(prefix):
        os.replace(path, target + path[len(prefix):])
    return target


def save_checkpoint(checkpoint, folder: str, step: int, keep: int, need_bytes: int = 0,
                    name: str = CHECKPOINT_NAME, resume_note: str = "") -> str:
    """Writes `checkpoint` (a tf.train.Checkpoint) as `{folder}/{name}-{step}`; returns the
    prefix. Refuses an existing checkpoint of that step; a full or read-only disk is a one-line
    UserError, with the partial files removed."""
    from libml.base.storage import disk_errors
    prefix = os.path.join(folder, f"{name}-{step}")
    if os.path.exists(prefix + ".index"):
        raise UserError(f"{prefix} already exists: refusing to overwrite a checkpoint; move its "
                        f"files ({os.path.basename(prefix)}.*) away to redo step {step}")
    for path in checkpoint_files(prefix):     # shards of an unfinished write of this step
        os.remove(path)
    fix = "free space there (or move the run to another disk) and re-run the same command"
    fix += f": {resume_note}" if resume_note else ""
    what = f"checkpoint {os.path.basename(prefix)}"
    with disk_errors(prefix, need_bytes, what=what, fix=fix,
                     cleanup=[glob.escape(prefix) + s for s in ("_temp", ".index", ".data-*-of-*")]):
        written = checkpoint.write(prefix)
    with disk_errors(folder, what=f"the checkpoint index of {what}", fix=fix):
        kept = list_checkpoints(folder, name)
        for old in kept[: max(0, len(kept) - keep)]:
            for path in checkpoint_files(old):
                os.remove(path)
        write_index(folder, kept[-keep:])
    return written


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return time.time()


# What a damaged checkpoint raises when read (the reader raises IndexError on a short file).
READ_ERRORS = (tf.errors.OpError, ValueError, AssertionError, IndexError, RuntimeError)


def model_variables(model) -> Dict[str, tf.Variable]:
    """Every variable of an SSLModel keyed by its Keras path (net/..., ema_net/..., adam/...,
    step). Checkpoints store this dict rather than the object tree, so they do not depend on
    which Python containers Keras tracks, and transfer can match variables by path."""
    found: Dict[str, tf.Variable] = {}
    seen = set()

    def add(key, v):
        if id(v) in seen:
            return
        if key in found:
            raise ValueError(f"two model variables share the path {key}")
        seen.add(id(v))
        found[key] = v

    for v in list(model.net.weights) + list(model.ema_net.weights) + [model.step]:
        add(v.path, v)
    # Optimizer variables by position: their paths start with an auto-generated, per-process
    # optimizer name (adam, adam_1, ...).
    for i, v in enumerate(model.optimizer.variables):
        add(f"optimizer/{i:04d}_{v.name}", v)
    for v in model.variables:
        add(v.path, v)
    return found


def checkpoint_key(path: str) -> str:
    """The key under which `model_variables` stores the variable at `path`."""
    return "variables/" + path.replace(".", "..").replace("/", ".S") + "/.ATTRIBUTES/VARIABLE_VALUE"


def make_checkpoint(model, iterators=None) -> tf.train.Checkpoint:
    """The model's variables, plus the (labeled, unlabeled) input iterators if given (unlabeled
    None: an algorithm without unlabeled data)."""
    parts = dict(variables=model_variables(model))
    if iterators is not None:
        parts.update(labeled_iterator=iterators[0])
        if iterators[1] is not None:
            parts.update(unlabeled_iterator=iterators[1])
    return tf.train.Checkpoint(**parts)


def checkpoint_exists(path: str) -> bool:
    """True for a folder, a file or a checkpoint prefix (what --eval_ckpt/--load_checkpoint take)."""
    return bool(path) and (os.path.isdir(path) or os.path.isfile(path)
                           or bool(glob.glob(path + ".index")))


def resolve_checkpoint(path: str) -> str:
    """A checkpoint prefix from a run folder, its tf/ folder or a prefix; UserError if none."""
    if os.path.isdir(path):
        for folder in (os.path.join(path, "tf"), path):
            latest = latest_checkpoint(folder)
            if latest:
                return latest
        raise UserError(f"{path} holds no complete checkpoint (no tf/{CHECKPOINT_NAME}-N.index): "
                        f"pass a run folder that has saved at least once, or a checkpoint prefix")
    if path.endswith(".index"):
        path = path[: -len(".index")]
    if not os.path.exists(path + ".index"):
        raise UserError(f"{path} is not a checkpoint (no {path}.index): pass a run folder or "
                        f"tf/model.ckpt-N")
    return path


def mismatch(model, prefix: str) -> Optional[str]:
    """The first model variable that the checkpoint lacks or stores with another shape, as a
    short text; None if every variable fits. Checked before reading, so that a checkpoint of
    another architecture fails in one line (a failed read leaves TensorFlow warning about
    every unrestored value when the process exits)."""
    shapes = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
    for path, variable in model_variables(model).items():
        stored = shapes.get(checkpoint_key(path))
        if stored is None:
            return f"{path} is not in the checkpoint"
        if tuple(stored) != tuple(variable.shape):
            return f"{path} has shape {tuple(stored)} there, {tuple(variable.shape)} here"
    return None


def read_model(model, prefix: str) -> None:
    """Restores the model variables (not the iterators) of a checkpoint; UserError if the
    checkpoint is of another architecture or damaged."""
    try:
        problem = mismatch(model, prefix)
        if problem is None:
            make_checkpoint(model).read(prefix).expect_partial().assert_existing_objects_matched()
    except READ_ERRORS as e:
        problem = first_line(e)
    if problem:
        raise UserError(f"{prefix} does not match this model ({problem}): pass the flags the run "
                        f"was trained with (--filters/--repeat/--scales/--dataset)")


def read_training_state(model, iterators, prefix: str) -> None:
    """Restores the model and the input iterators from `prefix` (raises one of READ_ERRORS if
    the model does not read back). If only the iterator state does not fit (the input pipeline
    changed, e.g. another TF version), the model is restored and the data order restarts, with
    a warning."""
    problem = mismatch(model, prefix)
    if problem:
        raise ValueError(problem)
    try:
        make_checkpoint(model, iterators).read(prefix).expect_partial().assert_existing_objects_matched()
    except READ_ERRORS as e:
        make_checkpoint(model).read(prefix).expect_partial().assert_existing_objects_matched()
        logging.warning("restored the model from %s but not the input position (%s): the data "
                        "order will differ from an uninterrupted run", prefix, first_line(e))
