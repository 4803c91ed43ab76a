"""Evaluation under the run's strategy: accuracy over the records with a known label, and for
the sets asked for, every image's outputs (the inputs of --gamma=auto, realmix_tf/gamma_auto.py).

    evaluator = Evaluator(strategy, model, datasets, nclass)
    accuracy, kept = evaluator.evaluate(ema=True, keep=("valid",))
    outputs = evaluator.outputs(distributed_dataset)       # e.g. a window of unlabeled images

`datasets()` returns {set name: distributed dataset of global batches}; it is called once, on
the first evaluation (the trainer builds them with Trainer.distribute). Each replica classifies
its share of a batch; the hit and label counts are summed over replicas and workers, the
per-image outputs gathered in batch order. Batches padded for the devices
(libml.train.devices.distribute_eval: every device at least 2 rows, oneDNN fails on fewer) carry
a "real" mask: padding rows are neither counted nor returned. One tf.function per weight set
(raw or EMA), traced once per kind of call (counts only, or counts and outputs).
"""
from typing import Callable, Dict

import numpy as np
import tensorflow as tf

from libml.train.devices import REAL

OUTPUTS = ("probs", "features", "labels")
SETS = ("train_labeled", "valid", "test")


class Evaluator:
    """Accuracy and per-image outputs of `model` (an SSLModel: `classify(images, ema,
    features=True)` -> (probs [N, K], pooled features [N, D])) on distributed datasets."""

    def __init__(self, strategy: tf.distribute.Strategy, model, datasets: Callable[[], Dict],
                 nclass: int):
        self.strategy, self.model, self.nclass = strategy, model, nclass
        self._make_datasets = datasets
        self._datasets = None
        self._fns = {}

    def _fn(self, ema: bool):
        if ema not in self._fns:
            strategy, model = self.strategy, self.model

            def replica(batch):
                probs, features = model.classify(batch["image"], ema=ema, features=True)
                labels = tf.cast(batch["label"], tf.int64)
                real = batch.get(REAL, tf.ones_like(labels, tf.bool))     # not a padding row
                known = tf.logical_and(real, labels >= 0)
                hit = tf.logical_and(known, tf.argmax(probs, axis=-1) == labels)
                return (tf.reduce_sum(tf.cast(hit, tf.int64)), tf.reduce_sum(tf.cast(known, tf.int64)),
                        probs, features, labels, tf.cast(real, tf.int32))

            def evaluate(batch, outputs: bool):
                """Counts; with outputs (a trace-time bool), also the gathered per-image outputs."""
                hits, known, probs, features, labels, real = strategy.run(replica, args=(batch,))
                total = tf.distribute.ReduceOp.SUM
                counts = (strategy.reduce(total, hits, axis=None), strategy.reduce(total, known, axis=None))
                if not outputs:
                    return counts
                real = strategy.gather(real, axis=0) > 0      # int32: all-gathers take no bool
                return counts + tuple(tf.boolean_mask(strategy.gather(t, axis=0), real)
                                      for t in (probs, features, labels))

            self._fns[ema] = tf.function(evaluate)
        return self._fns[ema]

    def evaluate(self, ema: bool = True, sets=SETS, keep=("valid",)):
        """({set: accuracy %} over records with a known label (label >= 0; NaN if none), and
        for the sets in `keep` {set: {"probs": [N, K], "features": [N, D], "labels": [N]}})."""
        if self._datasets is None:
            self._datasets = self._make_datasets()
        fn = self._fn(ema)
        result, kept = {}, {}
        for name in sets:
            hits = known = 0
            parts = []
            for batch in self._datasets[name]:
                h, k, *outputs = fn(batch, name in keep)
                hits, known = hits + int(h), known + int(k)
                if name in keep:
                    parts.append([o.numpy() for o in outputs])
            result[name] = 100.0 * hits / known if known else float("nan")
            if name in keep:
                kept[name] = self._stack(parts)
        return result, kept

    def outputs(self, dataset, ema: bool = True) -> dict:
        """{"probs", "features", "labels"} of every image of a distributed dataset."""
        fn = self._fn(ema)
        return self._stack([[o.numpy() for o in fn(batch, True)[2:]] for batch in dataset])

    def _stack(self, parts) -> dict:
        if not parts:
            return dict(probs=np.zeros([0, self.nclass], np.float32),
                        features=np.zeros([0, 0], np.float32), labels=np.zeros([0], np.int64))
        return {key: np.concatenate([p[i] for p in parts]) for i, key in enumerate(OUTPUTS)}
