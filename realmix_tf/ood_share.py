"""The share of out-of-distribution images in the unlabeled set, estimated from the model's own
features (`--gamma=auto`, `python -m realmix_tf.outliers`). Pure NumPy, no TensorFlow.

Method (docs/usage_gamma_auto.md): mixture-proportion estimation by the best bin, "BBE"
(Garg, Wu, Smola, Balakrishnan, Lipton: "Mixture Proportion Estimation and PU Learning: A
Modern Approach", NeurIPS 2021), on a one-dimensional in-distribution score of the model.
The unlabeled scores are a mixture (1 - pi) * F_in + pi * F_out; images the model scores
highest are (almost) all in-distribution, so above a high threshold t

    P_unlabeled(score >= t) ~= (1 - pi) * P_reference(score >= t),

where the reference is a sample of in-distribution images. BBE takes the threshold that
minimises an upper confidence bound of the ratio and returns the ratio there as 1 - pi.

The score is the deep nearest-neighbour score (Sun, Ming, Zhu, Li: "Out-of-Distribution
Detection with Deep Nearest Neighbors", ICML 2022): the cosine similarity of an image's pooled
features (the classifier's input, same forward pass) to its nearest labeled image. The
reference is every labeled image scored against the other labeled images (leave one out) and
every validation image with a class label scored against the labeled images. The classifier's
confidence (`confidence_score`, `energy_score`, kept for comparison) separated in- from
out-of-distribution images at chance level on the miniature's models (AUROC 0.41-0.57): MixMatch's
sharpening makes the model confident on outliers too.

Issue 21 (`reference_scores` + `estimate_scores` = `estimate_from_features`, what --gamma=auto
and inspect use): the score is the cosine similarity to the nearest class prototype (the mean
direction of the labeled images of a class; `prototype_similarity`, the NumPy twin of
libml/nn/ood_score.py's in-step score) or the nearest-neighbour score above (`kind="knn"`).
Options, off by default (CALIBRATE, SPLIT; measurements in docs/usage_gamma_auto.md): the
labeled images' leave-one-out scores shifted so that their median is the labeled validation
images' (`calibrate`: for a model that has fitted its labeled images but not its unlabeled
ones), and BBE choosing its threshold on one random half of the reference and reading the
ratio on the other half (`estimate_share_split`: the minimum over thresholds is otherwise
biased towards a high share). Trust with few labeled validation images also asks the
features to separate the labeled classes (`prototype_accuracy_loo`).
"""
import dataclasses
import math
from typing import Optional

import numpy as np

SCORES = ("confidence", "energy")
MIN_REFERENCE = 20      # validation images with a label needed to judge trust on them
MAX_BANK = 2048         # labeled images in the nearest-neighbour bank at most
MIN_FRACTION = 0.5      # BBE's bin holds at least this share of the reference
MAX_GAMMA = 0.95        # the mask needs gamma < 1
MIN_CALIBRATION = 20    # labeled validation images needed to calibrate the labeled reference
SPLIT_REPEATS = 4       # random halvings of the reference in estimate_share_split
SCORE_KINDS = ("prototype", "knn")
DEFAULT_SCORE = "prototype"
# The estimate's defaults, from the measurements in docs/usage_gamma_auto.md: on the
# miniature's trained models the labeled validation images (never trained on) score *lower*
# than the consistency-trained unlabeled inliers, so calibrating on them and the split BBE
# (which removes an upward bias) both made the estimate err lower; both stay available.
CALIBRATE = False
SPLIT = False


# ---------------------------------------------------------------------------------------------
# Scores (higher = more in-distribution): the classifier's confidence (for comparison)

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
# The estimate, and the nearest-neighbour score it runs on

@dataclasses.dataclass(frozen=True)
class ShareEstimate:
    share: float            # estimated fraction of out-of-distribution images in the mixture
    threshold: float        # the chosen score threshold t
    reference_above: float  # fraction of the reference scoring >= t
    mixture_above: float    # fraction of the mixture scoring >= t
    n_reference: int
    n_mixture: int


def estimate_share(reference, mixture, delta: float = 0.1, min_reference: int = 5,
                   min_fraction: float = MIN_FRACTION) -> ShareEstimate:
    """BBE estimate of the out-of-distribution share of `mixture` (1-D scores, higher = more
    in-distribution) given in-distribution `reference` scores.

    For every candidate threshold t (the reference scores), with q_r(t), q_m(t) the fractions
    scoring >= t and eps_n = sqrt(log(4 / delta) / (2 n)), takes the t minimising the upper
    confidence bound (q_m(t) + eps_m) / (q_r(t) - eps_r) of the in-distribution share, over
    thresholds with at least `min_reference` reference images and at least `min_fraction` of
    the reference above them, and returns share = 1 - q_m(t) / q_r(t), clipped to [0, 1].
    min_fraction keeps the bin from shrinking to the few top images, where the ratio of two
    small fractions is noisy and its minimum biased low (the share high)."""
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
    usable = (q_r * n_r >= min_reference) & (q_r > eps_r) & (q_r >= min_fraction)
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


def _unit_rows(features) -> np.ndarray:
    f = np.asarray(features, np.float32)
    if f.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {f.shape}")
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def bank_rows(n: int) -> np.ndarray:
    """Which of n labeled images form the nearest-neighbour bank: all, or MAX_BANK spread
    evenly over the file (its class round-robin order) when there are more."""
    return np.arange(n) if n <= MAX_BANK else np.linspace(0, n - 1, MAX_BANK).round().astype(np.int64)


def knn_similarity(features, bank, leave_one_out: bool = False, chunk: int = 1024) -> np.ndarray:
    """Cosine similarity of each row of `features` [N, D] to its nearest row of `bank` [M, D]
    (higher = more in-distribution). leave_one_out: `features` is the bank itself and each
    row's own entry is skipped (needs M >= 2)."""
    f, b = _unit_rows(features), _unit_rows(bank)
    if len(b) < (2 if leave_one_out else 1) or (len(f) and f.shape[1] != b.shape[1]):
        raise ValueError(f"need a bank of [M, {f.shape[1]}] with M >= {2 if leave_one_out else 1}, "
                         f"got {b.shape}")
    out = np.empty(len(f), np.float64)
    for start in range(0, len(f), chunk):
        sim = f[start:start + chunk] @ b.T
        if leave_one_out:
            rows = np.arange(len(sim))
            sim[rows, start + rows] = -np.inf
        out[start:start + chunk] = sim.max(axis=1)
    return out


def feature_scores(labeled_features, unlabeled_features, valid_features=None):
    """(reference scores, unlabeled scores, reference name) of the nearest-neighbour score.
    Bank: the labeled images (bank_rows). Reference: the bank's images leave-one-out, plus
    the validation images with a class label (`valid_features`, may be empty), which the model
    has not trained on. Name: "labeled+valid" or "labeled"."""
    labeled = np.asarray(labeled_features, np.float32)
    bank = labeled[bank_rows(len(labeled))]
    reference = knn_similarity(bank, bank, leave_one_out=True)
    name = "labeled"
    if valid_features is not None and len(valid_features):
        reference = np.concatenate([reference, knn_similarity(valid_features, bank)])
        name = "labeled+valid"
    return reference, knn_similarity(unlabeled_features, bank), name


def estimate_share_split(reference, mixture, seed: int = 0, repeats: int = SPLIT_REPEATS,
                         delta: float = 0.1, min_reference: int = 5,
                         min_fraction: float = MIN_FRACTION) -> ShareEstimate:
    """estimate_share without its selection bias: `repeats` times, the reference is cut into
    two random halves (NumPy generator seeded with `seed`: reproducible); BBE chooses the
    threshold on one half and the in-distribution share q_m(t) / q_r(t) is read on the other.
    Returns the mean share (and the mean of the thresholds and tail fractions). Choosing and
    reading on the same reference favours thresholds where q_r is high by chance, which
    biases the share up by a few points (+0.06 on 260 reference images with no outliers).
    A reference of fewer than 2 * min_reference scores: estimate_share on all of it."""
    ref = np.asarray(reference, np.float64).ravel()
    mix = np.sort(np.asarray(mixture, np.float64).ravel())
    if len(ref) < 2 * min_reference:
        return estimate_share(ref, mix, delta, min_reference, min_fraction)
    rng = np.random.default_rng(seed)
    picks = []
    for _ in range(repeats):
        order = rng.permutation(len(ref))
        choose, read = ref[order[: len(ref) // 2]], np.sort(ref[order[len(ref) // 2:]])
        t = estimate_share(choose, mix, delta, min_reference, min_fraction).threshold
        q_r = (len(read) - np.searchsorted(read, t, side="left")) / len(read)
        q_m = (len(mix) - np.searchsorted(mix, t, side="left")) / len(mix)
        share = 1.0 - min(q_m / q_r, 1.0) if q_r > 0 else 0.0
        picks.append((share, t, q_r, q_m))
    share, t, q_r, q_m = np.mean(np.array(picks), axis=0)
    return ShareEstimate(share=float(share), threshold=float(t), reference_above=float(q_r),
                         mixture_above=float(q_m), n_reference=len(ref), n_mixture=len(mix))


def prototypes(features, labels, nclass: int) -> np.ndarray:
    """Class prototypes [nclass, D]: the L2-normalised sum of the L2-normalised features of each
    class's images; a zero row for a class without images (never a nearest prototype)."""
    f = _unit_rows(features).astype(np.float64)
    labels = np.asarray(labels, np.int64).ravel()
    sums = np.zeros((nclass, f.shape[1]))
    np.add.at(sums, labels, f)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.where(norms > 0, sums / np.maximum(norms, 1e-12), 0.0)


def prototype_similarity(features, protos):
    """(similarity [N], nearest class [N]): the cosine similarity of each row of `features` to
    its nearest prototype (higher = more in-distribution). Zero rows of `protos` (classes
    without images) count as similarity -1, the lowest a cosine can be. The NumPy twin of
    libml.nn.ood_score.prototype_score."""
    f = _unit_rows(features).astype(np.float64)
    p = np.asarray(protos, np.float64)
    if p.ndim != 2 or (len(f) and p.shape[1] != f.shape[1]):
        raise ValueError(f"prototypes must be [K, {f.shape[1]}], got shape {p.shape}")
    sim = np.where((np.linalg.norm(p, axis=1) > 0)[None, :], f @ p.T, -1.0)
    return sim.max(axis=1), sim.argmax(axis=1)


def prototype_similarity_loo(features, labels, nclass: int) -> np.ndarray:
    """Each labeled image's prototype similarity with itself left out of its class's
    prototype (a class of one image then has no prototype)."""
    f = _unit_rows(features).astype(np.float64)
    labels = np.asarray(labels, np.int64).ravel()
    sums = np.zeros((nclass, f.shape[1]))
    np.add.at(sums, labels, f)
    out = np.empty(len(f))
    for k in np.unique(labels):
        rows = np.flatnonzero(labels == k)
        others = sums[None, :, :].repeat(len(rows), axis=0)        # [n_k, K, D]
        others[:, k, :] -= f[rows]
        norms = np.linalg.norm(others, axis=2)
        cos = np.einsum("nd,nkd->nk", f[rows], others) / np.maximum(norms, 1e-12)
        out[rows] = np.where(norms > 1e-9, cos, -1.0).max(axis=1)
    return out


def prototype_accuracy_loo(features, labels, nclass: int) -> float:
    """Leave-one-out nearest-prototype accuracy of the labeled images in feature space: how
    well the features, not the classifier, separate the labeled classes (the trust rule's
    measure when the labeled validation images are few). nan without images."""
    f = _unit_rows(features).astype(np.float64)
    labels = np.asarray(labels, np.int64).ravel()
    if not len(f):
        return float("nan")
    sums = np.zeros((nclass, f.shape[1]))
    np.add.at(sums, labels, f)
    own = sums[labels] - f                                           # [N, D]
    cos = f @ _unit_rows(sums).T.astype(np.float64)                  # other classes: all images
    own_norm = np.linalg.norm(own, axis=1)
    cos[np.arange(len(f)), labels] = np.where(own_norm > 1e-9,
                                              np.sum(f * own, axis=1) / np.maximum(own_norm, 1e-12), -1.0)
    cos[:, np.linalg.norm(sums, axis=1) <= 0] = -1.0
    return float(np.mean(cos.argmax(axis=1) == labels))


def calibrate(labeled_scores, valid_scores, min_valid: int = MIN_CALIBRATION):
    """(labeled scores shifted, shift): the labeled images' leave-one-out scores moved by
    median(valid) - median(labeled) when there are at least `min_valid` labeled validation
    scores (unseen in-distribution images, scored as an unlabeled image is), else unchanged
    (shift 0). The model has fitted its labeled images: left alone they look more typical
    than unseen inliers and the estimate errs high (synthetic, 10 % tighter labeled
    features: +0.16 at 0 %)."""
    labeled = np.asarray(labeled_scores, np.float64)
    valid = np.asarray(valid_scores, np.float64)
    if len(valid) < min_valid or not len(labeled):
        return labeled, 0.0
    shift = float(np.median(valid) - np.median(labeled))
    return labeled + shift, shift


@dataclasses.dataclass(frozen=True)
class FeatureScores:
    reference: np.ndarray   # in-distribution reference scores (calibrated labeled, then valid)
    scores: np.ndarray      # the scored (unlabeled) images
    name: str               # "labeled+valid" / "labeled"
    kind: str               # "prototype" / "knn"
    shift: float            # added to the labeled leave-one-out scores (calibrate)
    n_labeled: int
    n_valid: int


def reference_scores(labeled_features, labeled_labels, unlabeled_features, valid_features=None,
                     valid_labels=None, nclass: Optional[int] = None,
                     kind: str = DEFAULT_SCORE, calibrate_labeled: bool = CALIBRATE) -> FeatureScores:
    """The scores --gamma=auto estimates from. kind "prototype": cosine similarity to the
    nearest class prototype of the labeled images (leave one out for the labeled images
    themselves); "knn": to the nearest labeled image (bank_rows; leave one out). Reference:
    the labeled images' scores (with calibrate_labeled, shifted to the labeled validation
    images' median, `calibrate`), then the validation images' own. valid_labels: only rows
    >= 0 are used (the others may be outliers); None = all rows are in distribution."""
    if kind not in SCORE_KINDS:
        raise ValueError(f"unknown feature score {kind!r}: use one of {', '.join(SCORE_KINDS)}")
    labeled = np.asarray(labeled_features, np.float32)
    labels = np.asarray(labeled_labels, np.int64).ravel()
    valid = np.zeros((0, labeled.shape[1]), np.float32) if valid_features is None else \
        np.asarray(valid_features, np.float32).reshape(-1, labeled.shape[1])
    if valid_labels is not None:
        valid = valid[np.asarray(valid_labels).ravel() >= 0]
    if kind == "prototype":
        nclass = int(nclass if nclass is not None else labels.max() + 1)
        protos = prototypes(labeled, labels, nclass)
        loo = prototype_similarity_loo(labeled, labels, nclass)
        score_of = lambda f: prototype_similarity(f, protos)[0]
    else:
        bank = labeled[bank_rows(len(labeled))]
        loo = knn_similarity(bank, bank, leave_one_out=True)
        score_of = lambda f: knn_similarity(f, bank)
    valid_scores = score_of(valid) if len(valid) else np.zeros(0)
    loo, shift = calibrate(loo, valid_scores) if calibrate_labeled else (loo, 0.0)
    return FeatureScores(reference=np.concatenate([loo, valid_scores]),
                         scores=score_of(unlabeled_features),
                         name="labeled+valid" if len(valid) else "labeled", kind=kind, shift=shift,
                         n_labeled=len(loo), n_valid=len(valid))


def estimate_from_features(labeled_features, labeled_labels, unlabeled_features,
                           valid_features=None, valid_labels=None, nclass: Optional[int] = None,
                           kind: str = DEFAULT_SCORE, seed: int = 0, calibrate_labeled: bool = CALIBRATE,
                           split: bool = SPLIT):
    """(ShareEstimate, FeatureScores): the out-of-distribution share of the unlabeled images,
    as --gamma=auto estimates it at a report (reference_scores, then estimate_share_split
    seeded with `seed` when split, else estimate_share)."""
    scores = reference_scores(labeled_features, labeled_labels, unlabeled_features,
                              valid_features, valid_labels, nclass, kind, calibrate_labeled)
    return estimate_scores(scores, seed, split), scores


def estimate_scores(scores: FeatureScores, seed: int = 0, split: bool = SPLIT) -> ShareEstimate:
    """The share estimate of reference_scores' output: estimate_share_split (seeded) or
    estimate_share. Needs at least 5 reference scores (ValueError)."""
    if split:
        return estimate_share_split(scores.reference, scores.scores, seed=seed)
    return estimate_share(scores.reference, scores.scores)


# ---------------------------------------------------------------------------------------------
# Over a run: trust rule and smoothing (the state is checkpointed by the trainer)

def trust_set(n_valid_known: int) -> str:
    """The set whose accuracy decides trust: the validation images with a label when there are
    at least MIN_REFERENCE of them (held out), else the labeled images."""
    return "valid" if n_valid_known >= MIN_REFERENCE else "train_labeled"


def trust_accuracy(nclass: int) -> float:
    """Reference accuracy from which the model is trusted: half-way from chance to perfect."""
    return 0.5 * (1.0 + 1.0 / nclass)


@dataclasses.dataclass
class AutoGamma:
    """gamma chosen from the data. `update` once per report with the raw share estimate and
    the EMA model's accuracy on held-out images (`trust_set`); `gamma` is what the mask uses.

    - The estimate starts at 0 and stays 0 until the model is trusted: its accuracy has
      reached trust_accuracy(nclass) at `trust_reports` consecutive reports (once trusted,
      always trusted: a resumed run keeps it).
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
