"""Virtual adversarial training (Miyato et al., 2018) as the MixMatch repository's baseline
(M:vat.py, M:third_party/vat_utils.py), which the RealMix paper quotes in Tables 2-3 and Figure 3.

One step, with y = view 0 of the unlabeled batch (declared as two weak views, of which view 1
is unused, so the augmentation draws stay those of the released feeding):
  logits_x, logits_y = net(labeled), net(y)        training-mode BN, each its own batch
                                                   statistics; only the labeled pass updates
                                                   the moving statistics (as released);
  delta   = vat_eps * normalize(grad_d KL(p(y) || p(y + d))), d = xi * normalize(N(0, 1))
            (one power iteration, below; p(y) and p(y + d) are two passes of the
            same shape, as libml's separate calls; they update nothing, no gradient);
  loss    = xe(labeled) + vat * warmup(step) * mean KL(p(y + delta) || stop_grad(p_y))
            + entmin_weight * mean entropy(p_y)
  warmup(step) = clip(step_images / (warmup_pos * train_kimg * 1024), 0, 1).
Defaults as M:vat.py: vat 0.3, vat_eps 6, entmin_weight 0.06 (not ramped), warmup_pos 0.4,
xi 1e-6; the MixMatch tables ran it with these and --wd=0.02 on CIFAR-10 and SVHN.

The random start d is drawn for the rows of the global batch from (seed, step) and each replica
takes its rows, so R replicas draw what one device draws (libml.train.algorithm.SSLModel.global_rows). ξ = 1e-6 is below the
resolution of bfloat16/float16 inputs, so VAT trains in float32 only: --mixed_precision=auto
(the default) gives float32 for VAT, an explicit bf16 / fp16 is refused.

Command line:
    python -m realmix_tf.vat --dataset=cifar10.3@250-5000
"""
import tensorflow as tf

from libml.nn import replicas
from libml.train.config import positive, non_negative
from libml.data.pipeline import Unlabeled
from libml.base.errors import UserError
from libml.train.algorithm import TRAIN_KIMG, SSLModel, hparam
from realmix_tf.mean_teacher import WARMUP_POS_HPARAM, linear_warmup
from realmix_tf.supervised import SMOOTHING, labeled_cross_entropy, smoothing_hparams


# -- VAT's ops -------------------------------------------------------------------------------
# Pure ops of virtual adversarial training (Miyato et al., 2018) as the MixMatch repository's
# VAT baseline uses them (M:vat.py, M:third_party/vat_utils.py, M:libml/nn/ops.py):
# 
#     d     = xi * normalize(noise)                      noise ~ N(0, 1), one power iteration
#     g     = d/dd mean_b KL(softmax(logits) || softmax(forward(x + d)))
#     delta = epsilon * normalize(g)                     (no gradient)
#     normalize(v) = v / (1e-12 + max|v|) / sqrt(1e-6 + sum (v / (1e-12 + max|v|))^2), per example
# 
# The VAT loss is KL(student || teacher) with the student = logits of x + delta and the teacher =
# the (stopped) logits of x, in that order, as M:vat.py calls `kl_divergence_from_logits(student,
# teacher)`; the entropy term is the mean entropy of the unperturbed predictions.
# 
# The functions work in the dtype of their inputs (float32 in training; the tests also use
# float64). ξ = 1e-6 moves each pixel by ~1e-8: below bfloat16 / float16 resolution, so the
# perturbation needs a float32 network (realmix_tf/vat.py refuses mixed precision).

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
    averaged (several replicas: libml.nn.replicas.mean, this replica's share of the global mean,
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


class VAT(SSLModel):
    """VAT + entropy minimisation on a Wide ResNet. vat: weight of the VAT loss (ramped over
    warmup_pos of train_kimg); vat_eps: perturbation norm; vat_xi: power-iteration step;
    entmin_weight: weight of the entropy term; smoothing: label smoothing of the labeled
    targets (libml accepts --smoothing but never applies it). Other arguments as SSLModel."""

    HPARAMS = dict(
        vat=hparam(VAT_WEIGHT, "Weight of the VAT loss (ramped over --warmup_pos).",
                   non_negative("use a weight >= 0 (libml: 0.3)"), float),
        vat_eps=hparam(VAT_EPSILON, "L2 norm of the adversarial perturbation of each "
                       "image.", positive, float),
        vat_xi=hparam(VAT_XI, "Finite-difference step of the power iteration (VAT runs "
                      "in float32: --mixed_precision auto or none).", positive, float),
        entmin_weight=hparam(ENTMIN_WEIGHT, "Weight of the entropy of the unlabeled "
                             "predictions (not ramped).",
                             non_negative("use a weight >= 0 (libml: 0.06)"), float),
        warmup_pos=WARMUP_POS_HPARAM,
        train_kimg=TRAIN_KIMG,
        smoothing=SMOOTHING,
    )
    unlabeled = Unlabeled(views=("weak", "weak"))    # view 0 is used

    def __init__(self, nclass, input_shape, precision="float32", name="vat", **kwargs):
        if precision != "float32":
            raise UserError(f"VAT with precision {precision}: its power iteration moves pixels "
                            f"by ~xi/50, below bfloat16/float16 resolution: use "
                            f"--mixed_precision=none")
        super().__init__(nclass, input_shape, precision=precision, name=name, **kwargs)

    @classmethod
    def from_config(cls, info, config, **kwargs):
        """--mixed_precision=auto gives float32 (the fastest precision VAT supports); an explicit
        bf16 / fp16 is refused by the constructor."""
        if config.mixed_precision == "auto":
            kwargs["precision"] = "float32"
        return super().from_config(info, config, **kwargs)

    def hparams(self) -> dict:
        return dict(super().hparams(), vat=self.vat, vat_eps=self.vat_eps, vat_xi=self.vat_xi,
                    entmin_weight=self.entmin_weight, warmup_pos=self.warmup_pos,
                    train_kimg=self.train_kimg, **smoothing_hparams(self.smoothing))

    def vat_ramp(self, step):
        """vat * linear warm-up at `step` images (float32 scalar)."""
        return self.vat * linear_warmup(step, self.warmup_pos,
                                                        self.train_kimg * 1024)

    def draws(self, step, batch):
        """The power iteration's random start, N(0, 1) for this replica's rows of the global
        batch (stateless in (seed, step))."""
        shape = [*self.image_shape]
        seed = self.step_seed(step)
        return dict(noise=self.global_rows(
            lambda rows: tf.random.stateless_normal([rows, *shape], seed), batch))

    def train_loss(self, labeled, unlabeled, step, draws):
        x, labels, y = labeled["image"], labeled["label"], unlabeled["image"][:, 0]

        def forward(images):          # batch statistics of its own, moving statistics untouched
            return self.net(images, training=True, update_bn_stats=False)

        logits = self.net(tf.concat([x, y], axis=0), training=True, update_bn_stats=True,
                          bn_groups=2)                           # moving stats: labeled half
        logits_x, logits_y = tf.split(logits, 2)
        # The finite difference compares forward(y + d) with forward(y) computed the same way
        # (libml: two separate classifier calls), not with the batched pass; no gradient.
        delta = tf.stop_gradient(virtual_adversarial_perturbation(
            y, forward(y), forward, self.vat_eps, tf.cast(draws["noise"], y.dtype), self.vat_xi,
            mean=replicas.mean if replicas.synced(self.replica_mode) else tf.reduce_mean))
        loss_xe = labeled_cross_entropy(logits_x, labels, self.nclass, self.smoothing)
        # Means over this replica's rows, as shares of the mean over all replicas' rows.
        loss_vat = replicas.share(vat_loss(forward(y + delta), logits_y))
        loss_entmin = replicas.mean(entropy_from_logits(logits_y))
        weight = self.vat_ramp(step)
        loss = loss_xe + weight * loss_vat + self.entmin_weight * loss_entmin
        return loss, {"losses/xe": loss_xe, "losses/vat": loss_vat, "losses/entmin": loss_entmin,
                      "losses/overall": loss, "monitors/vat_weight": replicas.share(weight)}


if __name__ == "__main__":
    from realmix_tf import registry
    registry.cli("vat")
