"""A run never continues on non-finite numbers.

- In the step (graph side): `all_finite(values)` of the step's losses; `FirstNonFinite` keeps
  the step count at the first step whose loss was not finite, without a host sync per step.
- Before a checkpoint is written (host side): `nonfinite_variables(variables)` names the
  variables holding NaN or Inf, so no such checkpoint is ever written.
- On resume: `checkpoint_is_finite(prefix)` reads a checkpoint's float tensors and tells
  whether it may be resumed from (checkpoints written before these checks existed may not be).
- `DivergenceError`: the one line naming the step and the last good checkpoint.
(Float flags are refused when not finite where they are checked: libml.train.config.finite.)
"""
from typing import Dict, Iterable, List, Optional

import numpy as np
import tensorflow as tf

from libml.base.errors import UserError

KIMG = 1024


def all_finite(values: Iterable) -> tf.Tensor:
    """Graph-side: True when every element of every tensor in `values` is finite."""
    checks = [tf.reduce_all(tf.math.is_finite(tf.cast(v, tf.float32))) for v in values]
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


def loss_values(outputs: Dict[str, tf.Tensor]) -> List[tf.Tensor]:
    """The step outputs that are losses (`losses/*`); all of them if none is named so."""
    losses = [v for k, v in outputs.items() if k.startswith("losses/")]
    return losses or list(outputs.values())


class FirstNonFinite:
    """A counter that remembers the step count (images seen) after the first step whose loss
    was not finite; -1 while every step was finite. Update it inside the tf.function that runs
    the step; read it on the host at report and checkpoint times only."""

    def __init__(self):
        with tf.init_scope():
            self.variable = tf.Variable(tf.constant(-1, tf.int64), trainable=False,
                                        name="first_nonfinite_step")

    def update(self, finite: tf.Tensor, step: tf.Tensor) -> None:
        bad = tf.logical_and(self.variable < 0, tf.logical_not(finite))
        self.variable.assign(tf.where(bad, tf.cast(step, tf.int64), self.variable))

    def value(self) -> Optional[int]:
        step = int(self.variable.numpy())
        return None if step < 0 else step


@tf.function(autograph=False)
def _finite_flags(tensors):
    return [tf.reduce_all(tf.math.is_finite(t)) for t in tensors]


def nonfinite_variables(variables: Dict[str, tf.Variable]) -> List[str]:
    """Names (keys of `variables`) of the float variables holding NaN or Inf."""
    names = [k for k, v in variables.items() if tf.as_dtype(v.dtype).is_floating]
    if not names:
        return []
    flags = _finite_flags([tf.convert_to_tensor(variables[k]) for k in names])
    return [k for k, ok in zip(names, flags) if not bool(ok)]


def checkpoint_is_finite(prefix: str) -> bool:
    """Whether every float tensor stored in the checkpoint `prefix` is finite."""
    reader = tf.train.load_checkpoint(prefix)
    for key, dtype in reader.get_variable_to_dtype_map().items():
        if dtype.is_floating:
            value = reader.get_tensor(key)
            if not np.all(np.isfinite(value)):
                return False
    return True


class DivergenceError(UserError):
    """Training produced a non-finite loss or weight. The run stops; nothing is saved."""

    def __init__(self, what: str, step: int, last_good: Optional[str], fix: str = ""):
        where = f"step {step} ({step / KIMG:g} kimg)"
        if last_good:
            keep = f"its last finite checkpoint is {last_good}, kept as the newest"
            again = "resumes from that checkpoint"
        else:
            keep, again = "no checkpoint was saved before it", "starts over"
        fix = fix or (f"start a new run with a lower --lr, or check the data; re-running this "
                      f"command {again}")
        super().__init__(f"{what} at {where}: the run stopped, {keep}: {fix}")
        self.step, self.last_good = step, last_good
