"""Synthetic pooled features with a known out-of-distribution share, for the failure modes of
--gamma=auto's estimator (issue 21): used by tests/test_ood_share.py and runs/ood_synthetic.py.

A world has K in-distribution classes and some outlier classes, each a non-negative direction
in D dimensions (like a WRN's pooled features after its final ReLU): an image's features are
|centre + noise|, the noise's scale depending on the class and on the image's role. Roles:
  labeled     `labels_per_class` images of each in-distribution class (the bank);
  valid       the first `nvalid` images of the unlabeled file (same mixture), with their class
              when in distribution, -1 when not (as the mismatch sets' validation images);
  unlabeled   the training unlabeled images, share `share` of them outliers.
Modes (each one a failure mode the issue lists, alone):
  base        10 labels a class, balanced inliers, equal spreads;
  duplicate   every outlier class is a near duplicate of one labeled class (its centre mostly
              that class's, plus its own part);
  imbalance   unlabeled inliers drawn 50/20/10/10/5/5 % over the classes, classes of unequal
              spread (the dominant class the tightest);
  few_labels  4 labels a class;
  tight       labeled features 10 % tighter than unseen images of their class (the model has
              fitted them).
"""
import dataclasses

import numpy as np

MODES = ("base", "duplicate", "imbalance", "few_labels", "tight")
NCLASS, NOUT, DIM = 6, 4, 64


@dataclasses.dataclass
class World:
    labeled: np.ndarray          # [L, D]
    labeled_labels: np.ndarray   # [L]
    valid: np.ndarray            # [V, D]
    valid_labels: np.ndarray     # [V], -1 = out of distribution
    unlabeled: np.ndarray        # [U, D]
    inside: np.ndarray           # [U] bool: in distribution
    share: float                 # true out-of-distribution share of `unlabeled`


def make_world(mode: str, share: float, seed: int = 0, nunlabeled: int = 1360, nvalid: int = 200,
               spread: float = 0.25) -> World:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.0, 1.0, (NCLASS + NOUT, DIM)) ** 4
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spreads = np.full(NCLASS + NOUT, spread)
    weights = np.full(NCLASS, 1.0 / NCLASS)
    labels_per_class, labeled_scale = 10, 1.0
    if mode == "duplicate":
        for j in range(NOUT):
            mixed = 0.8 * centres[j % NCLASS] + 0.6 * centres[NCLASS + j]
            centres[NCLASS + j] = mixed / np.linalg.norm(mixed)
    elif mode == "imbalance":
        weights = np.array([0.50, 0.20, 0.10, 0.10, 0.05, 0.05])
        spreads[:NCLASS] = spread * np.array([0.5, 0.7, 1.0, 1.3, 1.6, 1.6])
    elif mode == "few_labels":
        labels_per_class = 4
    elif mode == "tight":
        labeled_scale = 0.9

    def draw(classes, scale=1.0):
        noise = rng.normal(0.0, 1.0, (len(classes), DIM)) / np.sqrt(DIM)
        return np.abs(centres[classes] + noise * (spreads[classes] * scale)[:, None]).astype(np.float32)

    def mixture(n):
        n_out = int(round(share * n))
        classes = np.r_[NCLASS + rng.integers(0, NOUT, n_out), rng.choice(NCLASS, n - n_out, p=weights)]
        classes = classes[rng.permutation(n)]
        return draw(classes), classes

    labeled_labels = np.repeat(np.arange(NCLASS), labels_per_class)
    labeled = draw(labeled_labels, labeled_scale)
    valid, valid_classes = mixture(nvalid)
    unlabeled, classes = mixture(nunlabeled)
    inside = classes < NCLASS
    return World(labeled=labeled, labeled_labels=labeled_labels, valid=valid,
                 valid_labels=np.where(valid_classes < NCLASS, valid_classes, -1),
                 unlabeled=unlabeled, inside=inside, share=float(1.0 - inside.mean()))
