"""The out-of-distribution reference of an export: what `realmix_tf.predict` needs to say "none
of these classes" (issue 24).

Score: the OOD score of `realmix_tf.outliers` and of --gamma=auto's estimate, 1 - the cosine
similarity of an image's pooled features (the classifier's input) to its nearest class
prototype (the unit sum of the unit features of the labeled images of a class, EMA model;
libml/nn/ood_score.py). Higher = more outlying; 0..2.

Threshold: the QUANTILE (0.95) quantile of the scores of the labeled validation images (the
first nvalid unlabeled records that carry a label; never trained on), taken as the smallest of
their scores at or below which at least 95 % of them fall (numpy's "inverted_cdf"); predict
flags an image "out" when its score is above it, so at most 5 % of them would be flagged. With fewer than
MIN_VALID (20) labeled validation images, the labeled training images scored leave-one-out
(each against its class prototype without itself) stand in; the model has fitted them, so the
threshold is then tighter (more images flagged) than one calibrated on unseen images.

File: `ood_reference.npz` in the export folder (written with it, atomically), plain arrays
only, read with allow_pickle=False: prototypes float32 [nclass, D], calibration_scores float32
[N] (the scores the threshold was taken from), threshold and quantile (float64 scalars),
calibrated_on ("valid" or "labeled_loo") and score (a name) as 0-d strings, version.
"""
import os
from typing import Optional

import numpy as np
import tensorflow as tf

from libml.base.errors import UserError, first_line
from libml.base.files import atomic_path
from libml.nn import ood_score

FILE = "ood_reference.npz"
QUANTILE = 0.95
MIN_VALID = 20
SCORE = "prototype_cosine_distance"
VERSION = 1
CALIBRATED_ON = {"valid": "labeled validation images", "labeled_loo": "labeled images, leave-one-out"}


def prototypes(features, labels, nclass: int) -> np.ndarray:
    """Class prototypes [nclass, D] (a zero row for a class without images), float32."""
    sums, _ = ood_score.class_sums(features, np.asarray(labels, np.int64), nclass)
    return ood_score.unit_rows(sums).numpy()


def scores(features, protos) -> np.ndarray:
    """The OOD score [N] of feature rows: 1 - cosine to the nearest prototype (float32)."""
    features = np.asarray(features, np.float32).reshape(-1, np.asarray(protos).shape[1])
    similarity, _ = ood_score.prototype_score(features, protos)
    return 1.0 - similarity.numpy()


def scores_leave_one_out(features, labels, nclass: int) -> np.ndarray:
    """The OOD score [N] of each labeled image against the prototypes, its own class's
    computed without it (a class of one image then has none: similarity -1 to it)."""
    labels = np.asarray(labels, np.int64)
    unit = ood_score.unit_rows(features)
    sums, counts = ood_score.class_sums(features, labels, nclass)
    similarity = tf.matmul(unit, ood_score.unit_rows(sums), transpose_b=True)    # [N, K]
    similarity = tf.where(counts[None, :] > 0, similarity, -1.0)
    own = tf.gather(sums, labels) - unit                                         # own class minus self
    norm = tf.norm(own, axis=1)
    own_similarity = tf.where(norm > 1e-6, tf.reduce_sum(unit * own, axis=1) / tf.maximum(norm, 1e-12), -1.0)
    similarity = tf.where(tf.one_hot(labels, nclass) > 0, own_similarity[:, None], similarity)
    return 1.0 - tf.reduce_max(similarity, axis=1).numpy()


def build(labeled_features, labeled_labels, valid_features, valid_labels, nclass: int,
          quantile: float = QUANTILE, min_valid: int = MIN_VALID) -> dict:
    """The reference's arrays (the npz's content) from the EMA model's features of the labeled
    images and of the validation images (rows with a negative label are left out)."""
    labeled = np.asarray(labeled_features, np.float32)
    labels = np.asarray(labeled_labels, np.int64)
    valid_labels = np.asarray(valid_labels, np.int64).ravel()
    valid = (np.asarray(valid_features, np.float32)[valid_labels >= 0] if len(valid_labels)
             else np.zeros((0, labeled.shape[1]), np.float32))
    protos = prototypes(labeled, labels, nclass)
    if len(valid) >= min_valid:
        calibration, on = scores(valid, protos), "valid"
    else:
        calibration, on = scores_leave_one_out(labeled, labels, nclass), "labeled_loo"
    return dict(prototypes=protos, calibration_scores=calibration.astype(np.float32),
                threshold=threshold(calibration, quantile),
                quantile=np.float64(quantile), calibrated_on=np.array(on), score=np.array(SCORE),
                version=np.int64(VERSION))


def threshold(calibration, quantile: float = QUANTILE) -> np.float64:
    """The smallest calibration score with at least `quantile` of them at or below it."""
    return np.float64(np.quantile(np.asarray(calibration, np.float64), quantile, method="inverted_cdf"))


def write(path: str, reference: dict, overwrite: bool = False) -> None:
    """Writes the npz atomically (temporary name, then rename)."""
    with atomic_path(path, overwrite) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **reference)


class Reference:
    """A loaded reference: `score(features)` -> OOD scores, `flags(scores)` -> "in"/"out"."""

    def __init__(self, arrays: dict, path: str):
        self.path = path
        self.prototypes = arrays["prototypes"]
        self.threshold = float(arrays["threshold"])
        self.quantile = float(arrays["quantile"])
        self.calibrated_on = str(arrays["calibrated_on"])
        self.n_calibration = int(len(arrays["calibration_scores"]))

    def score(self, features) -> np.ndarray:
        features = np.asarray(features, np.float32)
        if features.ndim != 2 or features.shape[1] != self.prototypes.shape[1]:
            raise UserError(f"{self.path} holds prototypes of {self.prototypes.shape[1]} features, "
                            f"the model gives {features.shape[1:]}: the two come from different "
                            f"exports; re-export the run with --export_only")
        return scores(features, self.prototypes)

    def flags(self, values) -> list:
        return ["out" if v > self.threshold else "in" for v in np.asarray(values)]

    def describe(self) -> str:
        return (f"ood_score: cosine distance to the nearest class prototype; ood = out above "
                f"{self.threshold:.4f}, the score below which {100 * self.quantile:g} % of the "
                f"{self.n_calibration} {CALIBRATED_ON.get(self.calibrated_on, self.calibrated_on)} fall")


def read(folder: str, nclass: Optional[int] = None) -> Optional[Reference]:
    """The reference of an export folder, None when it has none (an older export). A damaged
    or foreign file is one line; nothing in it is unpickled or run."""
    path = os.path.join(folder, FILE)
    if not os.path.isfile(path):
        return None
    fix = "re-export the run with --export_only (or delete the file to predict without ood_score)"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"unreadable {path} ({first_line(e)}): {fix}") from None
    needed = ("prototypes", "calibration_scores", "threshold", "quantile", "calibrated_on")
    problem = next((f"no {k}" for k in needed if k not in arrays), None)
    if problem is None:
        protos = arrays["prototypes"]
        if protos.ndim != 2 or protos.dtype.kind != "f" or (nclass is not None and len(protos) != nclass):
            problem = f"prototypes of shape {protos.shape} for {nclass} classes"
        elif arrays["threshold"].shape != () or not np.isfinite(arrays["threshold"]):
            problem = "threshold is not one finite number"
    if problem:
        raise UserError(f"malformed {path} ({problem}): {fix}")
    return Reference(arrays, path)
