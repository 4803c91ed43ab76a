"""The share of out-of-distribution images in the unlabeled set, estimated from the model's own
scores (`--gamma=auto`, `python -m realmix_tf.inspect`). Pure NumPy, no TensorFlow.

Method (docs/usage_gamma_auto.md): mixture-proportion estimation by the best bin, "BBE"
(Garg, Wu, Smola, Balakrishnan, Lipton: "Mixture Proportion Estimation and PU Learning: A
Modern Approach", NeurIPS 2021), on a one-dimensional in-distribution score of the model.
The unlabeled scores are a mixture (1 - pi) * F_in + pi * F_out; images the model scores
highest are (almost) all in-distribution, so above a high threshold t

    P_unlabeled(score >= t) ~= (1 - pi) * P_reference(score >= t),

where the reference is a sample of in-distribution images (held-out labeled images). BBE
takes the threshold that minimises an upper confidence bound of the ratio and returns the
ratio there as 1 - pi. It needs no second network and no model of F_out, and it is right at
0 % and 100 % mismatch, where a two-component mixture fit or an Otsu threshold (MTC) must
still split the scores in two.

The score is the log-odds of the top class, log p_max - log(1 - p_max), computed from the
logits: it orders images exactly as RealMix's mask does (by max softmax confidence) but does
not saturate at p_max = 1.0 in float32, so the most confident images stay distinguishable.
"""
import dataclasses
import math
from typing import Optional

import numpy as np

SCORES = ("confidence", "energy")
MIN_REFERENCE = 20      # held-out labeled images needed to use them as the reference
MAX_GAMMA = 0.95        # the mask needs gamma < 1


# ---------------------------------------------------------------------------------------------
# Scores (higher = more in-distribution)

def confidence_score(logits) -> np.ndarray:
    """log p_max - log(1 - p_max) of each row of logits [N, C] (C >= 2), exact for any
    logit scale: the top logit minus the log-sum-exp of the others."""
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be [N, C] with C >= 2, got shape {z.shape}")
    top = np.argmax(z, axis=1)
    rows = np.arange(len(z))
    others = z.copy()
    others[rows, top] = -np.inf
    return z[rows, top] - _logsumexp(others)


def energy_score(logits) -> np.ndarray:
    """Negative free energy log sum_c exp(z_c) (Liu et al., NeurIPS 2020), per row."""
    return _logsumexp(np.asarray(logits, np.float64))


def score(logits, kind: str = "confidence") -> np.ndarray:
    if kind not in SCORES:
        raise ValueError(f"unknown OOD score {kind!r}: use one of {', '.join(SCORES)}")
    return confidence_score(logits) if kind == "confidence" else energy_score(logits)


def confidence_from_score(values) -> np.ndarray:
    """p_max from the log-odds confidence score."""
    return 1.0 / (1.0 + np.exp(-np.asarray(values, np.float64)))


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = np.max(z, axis=1)
    m = np.where(np.isfinite(m), m, 0.0)
    return m + np.log(np.sum(np.exp(z - m[:, None]), axis=1))


# ---------------------------------------------------------------------------------------------
# The estimate

@dataclasses.dataclass(frozen=True)
class ShareEstimate:
    share: float            # estimated fraction of out-of-distribution images in the mixture
    threshold: float        # the chosen score threshold t
    reference_above: float  # fraction of the reference scoring >= t
    mixture_above: float    # fraction of the mixture scoring >= t
    n_reference: int
    n_mixture: int


def estimate_share(reference, mixture, delta: float = 0.1, min_reference: int = 5) -> ShareEstimate:
    """BBE estimate of the out-of-distribution share of `mixture` (1-D scores, higher = more
    in-distribution) given in-distribution `reference` scores.

    For every candidate threshold t (the reference scores), with q_r(t), q_m(t) the fractions
    scoring >= t and eps_n = sqrt(log(4 / delta) / (2 n)), takes the t minimising the upper
    confidence bound (q_m(t) + eps_m) / (q_r(t) - eps_r) of the in-distribution share, over
    thresholds with at least `min_reference` reference images above them, and returns
    share = 1 - q_m(t) / q_r(t), clipped to [0, 1]."""
    ref = np.sort(np.asarray(reference, np.float64).ravel())
    mix = np.sort(np.asarray(mixture, np.float64).ravel())
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(mix))):
        raise ValueError("scores must be finite")
    n_r, n_m = len(ref), len(mix)
    if n_r < min_reference or n_m < 1:
        raise ValueError(f"need at least {min_reference} reference and 1 mixture scores, got "
                         f"{n_r} and {n_m}")
    eps_r = math.sqrt(math.log(4 / delta) / (2 * n_r))
    eps_m = math.sqrt(math.log(4 / delta) / (2 * n_m))
    thresholds = np.unique(ref)
    q_r = (n_r - np.searchsorted(ref, thresholds, side="left")) / n_r
    q_m = (n_m - np.searchsorted(mix, thresholds, side="left")) / n_m
    usable = (q_r * n_r >= min_reference) & (q_r > eps_r)
    if not usable.any():          # a tiny reference: all of it (t = its minimum)
        usable = thresholds == thresholds[0]
    bound = np.where(usable, (q_m + eps_m) / np.maximum(q_r - eps_r, 1e-12), np.inf)
    best = int(np.argmin(bound))
    return ShareEstimate(share=float(1.0 - min(q_m[best] / q_r[best], 1.0)),
                         threshold=float(thresholds[best]), reference_above=float(q_r[best]),
                         mixture_above=float(q_m[best]), n_reference=n_r, n_mixture=n_m)


def auroc(in_scores, out_scores) -> Optional[float]:
    """Area under the ROC curve of `score` separating in- (positive) from out-of-distribution
    images: P(in > out) + P(in == out) / 2 (Mann-Whitney). None if a side is empty."""
    pos = np.asarray(in_scores, np.float64).ravel()
    neg = np.asarray(out_scores, np.float64).ravel()
    if not len(pos) or not len(neg):
        return None
    from scipy.stats import rankdata
    ranks = rankdata(np.concatenate([pos, neg]))      # average ranks over ties
    rank_sum = ranks[: len(pos)].sum()
    return float((rank_sum - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def choose_reference(valid_scores, labeled_scores):
    """(reference scores, name): the scores of the validation images that carry a class label
    (held out from training, so scored like unseen in-distribution images) when there are at
    least MIN_REFERENCE of them, else those of the labeled training images ("labeled": the
    model has fitted them, so they look more in-distribution than unseen images and the share
    comes out high)."""
    if len(valid_scores) >= MIN_REFERENCE:
        return np.asarray(valid_scores), "valid"
    return np.asarray(labeled_scores), "labeled"


# ---------------------------------------------------------------------------------------------
# Over a run: trust rule and smoothing (the state is checkpointed by the trainer)

def trust_accuracy(nclass: int) -> float:
    """Reference accuracy from which the model is trusted: half-way from chance to perfect."""
    return 0.5 * (1.0 + 1.0 / nclass)


@dataclasses.dataclass
class AutoGamma:
    """gamma chosen from the data. `update` once per report with the raw share estimate and
    the EMA model's accuracy on the reference images; `gamma` is what the mask uses.

    - The estimate starts at 0 and stays 0 until the model is trusted: its accuracy on the
      held-out reference images has reached trust_accuracy(nclass) at `trust_reports`
      consecutive reports (once trusted, always trusted: a resumed run keeps it).
    - Then it follows the raw estimates with an exponential moving average,
      estimate += rate * (raw - estimate), so gamma rises from 0 over a few reports.
    - gamma = min(estimate, max_gamma) (the mask needs gamma < 1).
    """
    nclass: int
    rate: float = 0.3
    trust_reports: int = 2
    max_gamma: float = MAX_GAMMA
    estimate: float = 0.0
    streak: int = 0           # consecutive reports at or above the trust accuracy
    trusted: bool = False

    def update(self, raw_share: Optional[float], reference_accuracy: float) -> float:
        """Folds in one report; returns the new gamma. raw_share None: no estimate this time."""
        if not self.trusted:
            self.streak = self.streak + 1 if reference_accuracy >= trust_accuracy(self.nclass) else 0
            self.trusted = self.streak >= self.trust_reports
        if self.trusted and raw_share is not None:
            raw = min(max(float(raw_share), 0.0), 1.0)
            self.estimate += self.rate * (raw - self.estimate)
        return self.gamma

    @property
    def gamma(self) -> float:
        return min(self.estimate, self.max_gamma) if self.trusted else 0.0

    # The trainer keeps these three numbers in checkpoint variables (exact resume).
    def state(self) -> tuple:
        return float(self.estimate), int(self.streak), bool(self.trusted)

    def set_state(self, estimate: float, streak: int, trusted: bool) -> None:
        self.estimate, self.streak, self.trusted = float(estimate), int(streak), bool(trusted)
