"""Checkpoints of an SSLModel: which variables are stored and under which keys, how a path
given on the command line becomes a checkpoint prefix, and reading one back. Which checkpoints
a run folder holds, and writing them, is libml/run/checkpoint_files.py.

A checkpoint stores `model_variables(model)` (a dict keyed by Keras variable path) plus, while
training, the two input iterators, so a resumed run continues with the same data order.
"""
import glob
import os
from typing import Dict, Optional

import tensorflow as tf
from absl import logging

from libml.run.checkpoint_files import CHECKPOINT_NAME, latest_checkpoint
from libml.base.errors import UserError, first_line

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
