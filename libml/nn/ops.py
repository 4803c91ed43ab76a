"""Pure TensorFlow ops of RealMix / MixMatch (paper sections 3.1-3.4, spec section 6).

Every op is a plain function of tensors: no variables, no global state. All of them run
eagerly, inside `tf.function` (dynamic batch sizes except `interleave`) and under XLA
(`jit_compile=True`), except the two samplers noted below.

Dtypes: probabilities, losses and their reductions are computed in float32. Callers that run
the network in mixed precision pass logits as they come; they are cast to float32 here.
`mixup` keeps the dtype of the images it mixes.

Hyper-parameters that choose a code path (`schedule`, `source`, `gamma`, `temperature`) are
Python values and are validated with a ValueError; numbers that change every step
(`progress`, `threshold`, `lam`, `index`, `step_images`) may be tensors.
"""
import math
import numbers

import tensorflow as tf

TSA_SCHEDULES = ("linear", "exp", "log")
TSA_SOURCES = ("labels", "logits")
TSA_SCALE = 5.0  # UDA's scale of the exp/log schedules.


def _f32(x):
    return tf.cast(tf.convert_to_tensor(x), tf.float32)


def _check_positive(name, value):
    if isinstance(value, numbers.Real) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


# --------------------------------------------------------------------------------------------
# Label guessing (paper eq. 2-3, spec 6.2)

def sharpen(p, temperature):
    """Sharpen a distribution over the last axis: p^(1/T) / sum p^(1/T) (paper eq. 3).

    p: [..., C] probabilities. Returns float32 [..., C]; T -> 0 tends to one-hot, T = 1 is the
    identity. A uniform p stays uniform.
    """
    _check_positive("temperature", temperature)
    powered = tf.pow(_f32(p), 1.0 / _f32(temperature))
    return powered / tf.reduce_sum(powered, axis=-1, keepdims=True)


def guess_label(logits_list, temperature):
    """Guessed label of unlabeled images from K augmented views (paper eq. 2-3).

    logits_list: K tensors [B, C] (one per view). The softmax of each view is averaged, then
    sharpened. Returns float32 [B, C] with the gradient stopped: the guess is a target.
    """
    if not logits_list:
        raise ValueError("guess_label needs at least one logits tensor")
    probs = [tf.nn.softmax(_f32(logits), axis=-1) for logits in logits_list]
    mean_probs = tf.add_n(probs) / float(len(probs))
    return tf.stop_gradient(sharpen(mean_probs, temperature))


# --------------------------------------------------------------------------------------------
# MixUp (paper eq. 8-11, spec 6.3)

def sample_mixup_lambda(n, alpha, seed):
    """Raw MixUp weights lam ~ Beta(alpha, alpha), one per example, float32 [n].

    Beta is drawn as g1 / (g1 + g2) with g1, g2 ~ Gamma(alpha) from two stateless streams split
    from `seed` (an int32/int64 tensor of shape [2]). `mixup` applies max(lam, 1 - lam).
    Not XLA-compilable: StatelessRandomGammaV3 has no XLA kernel (checked on CPU, TF 2.21), so
    draw lam outside the jit-compiled step and pass it in.
    """
    _check_positive("alpha", alpha)
    seed_a, seed_b = tf.unstack(tf.random.experimental.stateless_split(seed, 2, alg="philox"))
    gamma_a = tf.random.stateless_gamma([n], seed_a, alpha=alpha, dtype=tf.float32)
    gamma_b = tf.random.stateless_gamma([n], seed_b, alpha=alpha, dtype=tf.float32)
    total = gamma_a + gamma_b
    # Both gammas underflow to 0 only for tiny alpha; fall back to an even mix there.
    return tf.where(total > 0, gamma_a / tf.maximum(total, 1e-30), 0.5)


def sample_permutation(n, seed):
    """A random permutation of range(n) (int32 [n]) from a stateless seed; XLA-compilable.

    Sorts full-range int64 Philox keys: unlike float uniforms (whose bits-to-float conversion
    differs between the XLA and the TF kernels), integer draws are identical eagerly and under
    jit_compile, so the permutation does not depend on whether the step is compiled.
    """
    keys = tf.random.stateless_uniform([n], seed, minval=None, maxval=None, dtype=tf.int64, alg="philox")
    return tf.argsort(keys, stable=True)


def mixup(x, labels, lam, index):
    """MixUp of each example with the partner `index[i]`, one weight per example (spec 6.3).

    x: [N, ...] inputs; labels: [N, C]; lam: [N] raw Beta draws; index: [N] a permutation.
    With lam' = max(lam, 1 - lam) >= 0.5 (the example keeps the larger share):
        x_mix[i] = lam'_i x[i] + (1 - lam'_i) x[index[i]], the same for labels.
    Returns (x_mix in x's dtype, labels_mix in labels' dtype).
    """
    lam = tf.convert_to_tensor(lam)
    lam = tf.maximum(lam, 1 - lam)

    def mix(values):
        weight = tf.reshape(tf.cast(lam, values.dtype), [-1] + [1] * (values.shape.rank - 1))
        return values * weight + tf.gather(values, index) * (1 - weight)

    return mix(tf.convert_to_tensor(x)), mix(tf.convert_to_tensor(labels))


# --------------------------------------------------------------------------------------------
# Interleave (spec 6.4): swap row groups so that batch 0 holds a share of every input, which is
# the batch whose BatchNorm moving statistics are updated.

def interleave_offsets(batch, nu):
    """Row offsets of the nu + 1 groups of a batch: near-equal sizes, the remainder going to
    the last groups. interleave_offsets(64, 2) == [0, 21, 42, 64]."""
    groups = [batch // (nu + 1)] * (nu + 1)
    for extra in range(batch - sum(groups)):
        groups[-extra - 1] += 1
    offsets = [0]
    for size in groups:
        offsets.append(offsets[-1] + size)
    return offsets


def interleave(xy, batch):
    """Exchange group p of tensor 0 with group p of tensor p, for p = 1..nu.

    xy: nu + 1 tensors of exactly `batch` rows (batch is a Python int: the static batch size).
    Returns a list of nu + 1 tensors. Applying it twice gives back the input (involution), so
    the same call restores the order of the logits.
    """
    xy = list(xy)
    nu = len(xy) - 1
    for v in xy:
        rows = v.shape[0]
        if rows is not None and rows != batch:
            raise ValueError(f"interleave: every tensor needs exactly batch={batch} rows, got {rows}")
    offsets = interleave_offsets(batch, nu)
    groups = [[v[offsets[p]:offsets[p + 1]] for p in range(nu + 1)] for v in xy]
    for i in range(1, nu + 1):
        groups[0][i], groups[i][i] = groups[i][i], groups[0][i]
    return [tf.concat(g, axis=0) for g in groups]


# --------------------------------------------------------------------------------------------
# Losses and masked means (spec 6.5)

def soft_cross_entropy(labels, logits):
    """Per-example cross-entropy against soft labels: -sum_c y_c log softmax(z)_c. float32 [N]."""
    return tf.nn.softmax_cross_entropy_with_logits(labels=_f32(labels), logits=_f32(logits))


def l2_consistency(labels, logits):
    """Per-entry squared error between soft labels and the softmax: (y - softmax(z))^2, [N, C]."""
    return tf.square(_f32(labels) - tf.nn.softmax(_f32(logits), axis=-1))


def masked_mean(values, mask):
    """sum(values * mask) / max(sum(mask), 1): the mean over kept examples (0 if none kept)."""
    mask = _f32(mask)
    return tf.reduce_sum(_f32(values) * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)


def masked_l2_mean(sq_err, mask, nclass):
    """sum over kept rows of sq_err / max(kept * nclass, 1) (the released OOD-mask normalisation).

    sq_err: [N, C] squared errors; mask: [N] 0/1. With an all-ones mask and nclass == C this is
    the plain mean over N * C entries (MixMatch's L2 loss).
    """
    mask = _f32(mask)
    total = tf.reduce_sum(_f32(sq_err) * mask[:, None])
    return total / tf.maximum(tf.reduce_sum(mask) * float(nclass), 1.0)


# --------------------------------------------------------------------------------------------
# Schedules and updates (spec 6.1, 6.8)

def unlabeled_weight(step_images, w_match, warmup_images):
    """lambda_U(step) = w_match * clip(step_images / warmup_images, 0, 1): a linear ramp in images
    seen (warmup_images = warmup_kimg * 1024). A warm-up of 0 images gives w_match at once."""
    if isinstance(warmup_images, numbers.Real) and warmup_images <= 0:
        return _f32(w_match)
    ramp = tf.clip_by_value(_f32(step_images) / _f32(warmup_images), 0.0, 1.0)
    return _f32(w_match) * ramp


# --------------------------------------------------------------------------------------------
# Training-signal annealing (UDA's TSA adapted to MixUp labels, spec 6.6)

def tsa_progress(step_images, total_images, clip=True):
    """Training progress r = step_images / total_images, clipped to [0, 1] unless clip=False.

    realmix_tf passes the true run length (train_kimg * 1024); the released code divided by
    train_kimg * epochs without clipping (see docs/fidelity.md)."""
    progress = _f32(step_images) / _f32(total_images)
    return tf.clip_by_value(progress, 0.0, 1.0) if clip else progress


def tsa_threshold(schedule, progress, nclass):
    """TSA threshold tau(r) = coeff(r) * (1 - 1/nclass) + 1/nclass, float32 scalar.

    coeff: linear r; exp exp(5 (r - 1)); log 1 - exp(-5 r). So tau goes from about 1/nclass to
    1 as progress r goes from 0 to 1 (exactly, for linear). r is used as given (not clipped).
    """
    if schedule not in TSA_SCHEDULES:
        raise ValueError(f"TSA schedule must be one of {TSA_SCHEDULES}, got {schedule!r}")
    if not (isinstance(nclass, numbers.Integral) and nclass >= 1):
        raise ValueError(f"nclass must be a positive int, got {nclass!r}")
    r = _f32(progress)
    if schedule == "linear":
        coeff = r
    elif schedule == "exp":
        coeff = tf.exp((r - 1.0) * TSA_SCALE)
    else:
        coeff = 1.0 - tf.exp(-r * TSA_SCALE)
    start = 1.0 / nclass
    return coeff * (1.0 - start) + start


def tsa_mask(logits, labels, threshold, source="labels"):
    """Which examples of a (mixed) labeled batch stay in the supervised loss. float32 [B] of 0/1.

    Keep example i iff some class c with label mass y_ic > 0 satisfies p_ic < threshold * s_ic,
    where p = softmax(logits) and s is:
      source='labels': s = y (intended rule: a class is still under-fitted relative to its
                       label mass; with one-hot labels this is UDA's p(y*) < tau);
      source='logits': s = the logits (the released code's rule, R:realmix.py:107-113). A class
                       with y_ic = 0 then counts when z_ic > 0, so an example with a positive
                       logit on a non-label class is always kept.
    The released code ran the test with a mean over classes against FLAGS.nclass; with
    nclass == C that is exactly "some class" as here.
    Average the per-example loss with masked_mean(loss, mask).
    """
    if source not in TSA_SOURCES:
        raise ValueError(f"TSA source must be one of {TSA_SOURCES}, got {source!r}")
    logits = _f32(logits)
    labels = _f32(labels)
    probs = tf.nn.softmax(logits, axis=-1)
    label_probs = probs * tf.cast(labels > 0, tf.float32)
    scale = labels if source == "labels" else logits
    below = label_probs < scale * _f32(threshold)
    return tf.stop_gradient(tf.cast(tf.reduce_any(below, axis=-1), tf.float32))


# --------------------------------------------------------------------------------------------
# Out-of-distribution masking (gamma = --percent_mask, spec 6.7)

def ood_mask(probs, gamma, return_threshold=False):
    """Per-batch percentile mask on the confidence max_c probs[i, c]. float32 [N] of 0/1.

    probs: [N, C] softmax predictions on the (mixed) unlabeled inputs. Keeps the entries whose
    confidence is strictly above the floor(gamma * N)-th smallest (0-based; the index is
    computed in float32 as in the released code), so ties at the threshold are masked and about
    a fraction gamma (plus one) is dropped. gamma = 0 keeps everything (threshold 0).
    gamma: a Python float in [0, 1), or a float32 scalar tensor (--gamma=auto: a variable read
    at each step, same rule). With return_threshold, returns (mask, threshold).
    """
    tensor = tf.is_tensor(gamma) or isinstance(gamma, tf.Variable)
    if not tensor and (not isinstance(gamma, numbers.Real) or not 0 <= gamma < 1):
        raise ValueError(f"OOD mask gamma must be a float in [0, 1), got {gamma!r}")
    confidence = tf.reduce_max(_f32(probs), axis=-1)
    if not tensor and gamma == 0:
        mask = tf.ones_like(confidence)
        threshold = tf.constant(0.0, tf.float32)
    else:
        n = tf.shape(confidence)[0]
        index = tf.cast(tf.cast(n, tf.float32) * _f32(gamma), tf.int32)
        # The +inf sentinel makes an empty batch (or index == N by float32 rounding) mask all.
        sorted_conf = tf.concat([tf.sort(confidence), [math.inf]], axis=0)
        threshold = tf.gather(sorted_conf, tf.minimum(index, n))
        mask = tf.stop_gradient(tf.cast(confidence > threshold, tf.float32))
        if tensor:      # gamma 0 keeps every row, as the Python-float rule
            off = _f32(gamma) <= 0
            mask = tf.where(off, tf.ones_like(mask), mask)
            threshold = tf.where(off, tf.constant(0.0, tf.float32), threshold)
    return (mask, threshold) if return_threshold else mask
