"""Pure ops of virtual adversarial training (Miyato et al., 2018) as the MixMatch repository's
VAT baseline uses them (M:vat.py, M:third_party/vat_utils.py, M:libml/layers.py):

    d     = xi * normalize(noise)                      noise ~ N(0, 1), one power iteration
    g     = d/dd mean_b KL(softmax(logits) || softmax(forward(x + d)))
    delta = epsilon * normalize(g)                     (no gradient)
    normalize(v) = v / (1e-12 + max|v|) / sqrt(1e-6 + sum (v / (1e-12 + max|v|))^2), per example

The VAT loss is KL(student || teacher) with the student = logits of x + delta and the teacher =
the (stopped) logits of x, in that order, as M:vat.py calls `kl_divergence_from_logits(student,
teacher)`; the entropy term is the mean entropy of the unperturbed predictions.

The functions work in the dtype of their inputs (float32 in training; the tests also use
float64). ξ = 1e-6 moves each pixel by ~1e-8: below bfloat16 / float16 resolution, so the
perturbation needs a float32 network (realmix_tf/vat.py refuses mixed precision).
"""
import tensorflow as tf

VAT_XI = 1e-6          # M:third_party/vat_utils.py generate_perturbation(xi=1e-6)
VAT_EPSILON = 6.0      # M:vat.py --vat_eps
VAT_WEIGHT = 0.3       # M:vat.py --vat
ENTMIN_WEIGHT = 0.06   # M:vat.py --entmin_weight


def normalize_perturbation(d):
    """Each example of d [B, ...] divided by its max |entry| (+1e-12), then by its L2 norm
    (sqrt(1e-6 + sum of squares)), as the released VAT code: unit L2 norm up to the 1e-6."""
    axes = list(range(1, d.shape.rank))
    d = d / (1e-12 + tf.reduce_max(tf.abs(d), axis=axes, keepdims=True))
    return d / tf.sqrt(1e-6 + tf.reduce_sum(tf.square(d), axis=axes, keepdims=True))


def kl_divergence_from_logits(logits_p, logits_q):
    """Per-example KL(softmax(logits_p) || softmax(logits_q)) = sum_c p_c (log p_c - log q_c), [B]."""
    log_p = tf.nn.log_softmax(logits_p, axis=-1)
    log_q = tf.nn.log_softmax(logits_q, axis=-1)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def entropy_from_logits(logits):
    """Per-example entropy -sum_c p_c log p_c of softmax(logits), [B]."""
    log_p = tf.nn.log_softmax(logits, axis=-1)
    return -tf.reduce_sum(tf.exp(log_p) * log_p, axis=-1)


def virtual_adversarial_perturbation(x, logits, forward, epsilon, noise, xi=VAT_XI,
                                     mean=tf.reduce_mean):
    """The adversarial direction of x found by one power iteration, scaled to L2 norm epsilon
    per example; no gradient flows through it.

    x: inputs [B, ...]; logits: forward(x) [B, C] (its gradient is not used); forward: callable
    x -> logits; noise: the random start [B, ...] (the caller draws it, N(0, 1)); xi: the
    finite-difference step of the power iteration; mean: how the per-example divergences are
    averaged (several replicas: libml.replicas.mean, this replica's share of the global mean,
    so that the direction's scale is one device's)."""
    target = tf.stop_gradient(logits)
    d = xi * normalize_perturbation(tf.cast(noise, x.dtype))
    with tf.GradientTape() as tape:
        tape.watch(d)
        distance = mean(kl_divergence_from_logits(target, forward(x + d)))
    grad = tf.stop_gradient(tape.gradient(distance, d))
    return epsilon * normalize_perturbation(grad)


def vat_loss(student_logits, teacher_logits):
    """Mean over the batch of KL(student || teacher), the teacher's gradient stopped (M:vat.py)."""
    return tf.reduce_mean(kl_divergence_from_logits(student_logits,
                                                    tf.stop_gradient(teacher_logits)))
