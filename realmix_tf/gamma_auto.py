"""--gamma=auto during training: the model's state and the trainer's report hook.

A model that masks by gamma (RealMix) creates a `GammaState` in its constructor (under the
strategy scope) when gamma is "auto" and reads `state.gamma` in its step: a variable, so the
traced step never changes and every replica reads the same value. At each report the trainer
calls `GammaAutoHook.report(...)` with the EMA model's pooled features of one window of
`--eval_batch` un-augmented unlabeled images (the only extra forward pass) and of the labeled
and validation images (the evaluation's own pass); the hook scores them by the cosine
similarity to the nearest class prototype of the labeled images (or to the nearest labeled
image), estimates the window's out-of-distribution share
against the in-distribution reference (realmix_tf/ood_share.py), updates the smoothed estimate and
gamma, logs them to TensorBoard (`monitors/gamma`, `monitors/ood_share_estimate`,
`monitors/ood_share_raw`, `monitors/gamma_trusted`) and to `stats/gamma_auto.json`. The
estimate, the trust streak and the trust flag are model variables, so they are in every
checkpoint (exact resume).
"""
import os
from typing import Dict, List, Optional

import keras
import numpy as np

from realmix_tf import ood_share
from libml.base.errors import UserError
from libml.base.files import read_json, write_json
from libml.run.summaries import write_scalar

AUTO = "auto"
HISTORY_FILE = os.path.join("stats", "gamma_auto.json")    # in the run folder


class GammaState(keras.layers.Layer):
    """The checkpointed variables of --gamma=auto (create under the strategy scope). A Keras
    layer, so that the model tracks them: they are in `model.variables`, hence in every
    checkpoint (libml.run.checkpoints.model_variables)."""

    def __init__(self):
        super().__init__(name="gamma_auto", trainable=False)
        only_first = dict(trainable=False, aggregation="only_first_replica")
        self.gamma = keras.Variable(0.0, dtype="float32", name="gamma_auto", **only_first)
        self.estimate = keras.Variable(0.0, dtype="float32", name="gamma_auto_estimate", **only_first)
        self.streak = keras.Variable(0, dtype="int64", name="gamma_auto_streak", **only_first)
        self.trusted = keras.Variable(0, dtype="int64", name="gamma_auto_trusted", **only_first)

    def load(self, auto: ood_share.AutoGamma) -> None:
        auto.set_state(float(self.estimate.numpy()), int(self.streak.numpy()),
                       bool(self.trusted.numpy()))

    def store(self, auto: ood_share.AutoGamma) -> None:
        estimate, streak, trusted = auto.state()
        self.estimate.assign(estimate)
        self.streak.assign(streak)
        self.trusted.assign(int(trusted))
        self.gamma.assign(auto.gamma)


def parse_gamma(value):
    """--gamma: 'auto' or a number (its range is checked by the model); returns 'auto' or a
    float. A word is a UserError."""
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--gamma={value!r} is not a number: use a fraction in [0, 1) or auto") from None


class GammaAutoHook:
    """The trainer's report hook for a model with a `gamma_state` (GammaState)."""

    def __init__(self, model, nclass: int, run_dir: str, score: Optional[str] = None,
                 writes: bool = True):
        """writes=False: a non-chief worker, which reads the chief's history but writes nothing."""
        self.state: GammaState = model.gamma_state
        self.writes = writes
        self.nclass = nclass
        # The feature score: the model's own (`ood_score`, when it ranks its mask by a feature
        # score) or ood_share.DEFAULT_SCORE.
        own = getattr(model, "ood_score", None)
        self.score = score or (own if own in ood_share.SCORE_KINDS else ood_share.DEFAULT_SCORE)
        self.auto = ood_share.AutoGamma(nclass=nclass)
        self.path = os.path.join(run_dir, HISTORY_FILE)
        self.history: List[dict] = []

    def load_history(self, step: int) -> None:
        """Reports up to the restored step (later ones are redone), as the accuracy history."""
        history = read_json(self.path, "delete it; it is rewritten at the next report") \
            if os.path.exists(self.path) else []
        self.history = [h for h in history if h["step"] <= step]

    @staticmethod
    def window_index(step: int, report_nimg: int) -> int:
        """This report's window (SSLData.unlabeled_window): consecutive reports read
        interleaved windows that together cover the unlabeled set."""
        return step // max(report_nimg, 1)

    def report(self, step: int, window_features, kept: Dict[str, dict],
               accuracy: Dict[str, float]) -> dict:
        """One report, inside the trainer's TensorBoard writer context. window_features: the
        EMA model's pooled features of the window; kept: the evaluation's outputs of 'valid'
        and 'train_labeled' ({"features", "labels", ...}, Trainer.evaluate); accuracy: the
        trainer's, in %.

        Estimate: ood_share.reference_scores and estimate_scores with the score `self.score`
        and the module's defaults (ood_share.CALIBRATE, ood_share.SPLIT; the split BBE is
        seeded with the step: a resumed run redoes a report exactly). Trust: the accuracy of
        the trust set; with fewer than MIN_REFERENCE labeled validation images, the lower of
        the labeled images' accuracy and their leave-one-out nearest-prototype accuracy in
        feature space (the classifier fits the labeled images long before the features
        separate the classes)."""
        labeled, valid = kept["train_labeled"], kept["valid"]
        valid_labels = np.asarray(valid["labels"])
        trust_set = ood_share.trust_set(int((valid_labels >= 0).sum()))
        ref_accuracy = accuracy[trust_set] / 100.0
        feature_accuracy: Optional[float] = None
        if trust_set == "train_labeled" and len(labeled["features"]):
            feature_accuracy = ood_share.prototype_accuracy_loo(labeled["features"], labeled["labels"],
                                                                self.nclass)
            ref_accuracy = min(ref_accuracy, feature_accuracy)
        raw: Optional[float] = None
        n_reference, ref_name, shift = 0, "labeled", 0.0
        if len(window_features) and len(labeled["features"]) >= 2:
            scores = ood_share.reference_scores(labeled["features"], labeled["labels"], window_features,
                                                valid["features"], valid_labels, self.nclass, self.score)
            n_reference, ref_name, shift = len(scores.reference), scores.name, scores.shift
            if n_reference >= 5:
                raw = ood_share.estimate_scores(scores, seed=step).share
        self.state.load(self.auto)
        gamma = self.auto.update(raw, ref_accuracy if np.isfinite(ref_accuracy) else 0.0)
        self.state.store(self.auto)
        record = dict(step=step, kimg=step / 1024, gamma=gamma, ood_share_estimate=self.auto.estimate,
                      ood_share_raw=raw, trusted=self.auto.trusted, reference=ref_name,
                      n_reference=int(n_reference), n_window=int(len(window_features)),
                      trust_set=trust_set, reference_accuracy=ref_accuracy,
                      feature_accuracy=feature_accuracy, score=self.score, calibration_shift=shift)
        write_scalar("monitors/gamma", gamma)
        write_scalar("monitors/ood_share_estimate", self.auto.estimate)
        write_scalar("monitors/ood_share_raw", float("nan") if raw is None else raw)
        write_scalar("monitors/gamma_trusted", float(self.auto.trusted))
        self.history = [h for h in self.history if h["step"] < step] + [record]
        if self.writes:
            write_json(self.path, self.history, overwrite=True)
        return record
