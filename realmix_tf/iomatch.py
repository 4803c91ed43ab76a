"""IOMatch (Li et al., ICCV 2023: "IOMatch: Simplifying Open-Set Semi-Supervised Learning with
Joint Inliers and Outliers Utilization"), as its released code (I: nukezil/IOMatch, built on
USB: semilearn/algorithms/iomatch/iomatch.py and utils.py).

Its data, declared: `uratio` unlabeled images per labeled one (7), each as a weak and a strong
view, as FixMatch (realmix_tf/fixmatch.py). Its network: the Wide ResNet plus three heads on
the pooled features f (I: IOMatchNet), owned by the model beside `net` and trained, averaged
(EMA), decayed and checkpointed with it (SSLModel.build_heads); the export keeps the K-way
classifier of the net:
    projection   z = W2 relu(W1 f + b1) + b2          (128 wide)
    multi-binary logits_mb = V z, no bias, [B, 2K]: viewed as [B, 2, K], softmax over the pair:
                 r_neg[k] (image is not of class k), r_pos[k] = 1 - r_neg[k]
    open-set     logits_open = U z + c, K + 1 ways (the last: outlier)
One step (`train_loss`; SSLModel.train_step does the rest), one training-mode pass over
[x; weak; strong] (BN statistics over every row, as I's use_cat):
  1. closed-set targets p = softmax(weak logits), no gradient; p_mask = [max p >= p_cutoff];
  2. open-set targets (no gradient): outlier score s = sum_k p_k r_neg,k(weak);
     in_mask = [s < 0.5]; q = [p * r_pos(weak), s] (K + 1 entries summing to 1);
     q_mask = [max q >= q_cutoff];
  3. L = xe(x) + lambda_mb * L_mb(x)
         + wu * mean_u in_mask p_mask xe(p, strong logits)          (soft targets, as I)
         + lambda_op * [step >= op_start_kimg] * mean_u q_mask xe(q, strong open logits)
     with L_mb(x) = mean_x [-log r_pos,y - max_{k != y} log r_neg,k] (OpenMatch's one-vs-all
     loss, each log of r + 1e-8).
The optimizer is the shared one (Adam, decoupled weight decay, EMA), not I's SGD (docs/fidelity.md).

Command line (I's CIFAR-10 6/4 setting: config/openset_cv/iomatch/iomatch_cifar10_150_*.yaml):
    python -m realmix_tf.iomatch --dataset=cifar6_mismatch50.1@150-500 --uratio=7
"""
import math

import keras
import tensorflow as tf

from libml.base.errors import UserError
from libml.data.pipeline import Unlabeled
from libml.nn import ops
from libml.nn import replicas
from libml.train.algorithm import SSLModel, hparam
from libml.train.config import KIMG, non_negative, positive, whole_kimg
from realmix_tf.supervised import labeled_cross_entropy

LOG_EPSILON = 1e-8      # I: utils.mb_sup_loss, log(r + 1e-8)
INLIER_SCORE = 0.5      # I: in_mask = out_scores < 0.5


def check_probability(name, value):
    if not 0.0 <= value <= 1.0:
        raise UserError(f"--{name}={value} is out of range: use a probability in [0, 1] "
                        f"(IOMatch: p_cutoff 0.95, q_cutoff 0.5)")


def pair_probs(logits_mb, nclass: int):
    """(r_neg, r_pos) [N, K] of multi-binary logits [N, 2K]: I's view(N, 2, K), softmax over
    the pair (columns 0..K-1: 'not class k', K..2K-1: 'class k')."""
    pairs = tf.nn.softmax(tf.reshape(tf.cast(logits_mb, tf.float32), [-1, 2, nclass]), axis=1)
    return pairs[:, 0], pairs[:, 1]


def multi_binary_loss(logits_mb, labels, nclass: int):
    """Per-example one-vs-all loss of labeled rows [N]: -log(r_pos[y] + eps) plus the largest
    -log(r_neg[k] + eps) over the other classes (I: utils.mb_sup_loss)."""
    r_neg, r_pos = pair_probs(logits_mb, nclass)
    onehot = tf.one_hot(labels, nclass)
    positive_term = tf.reduce_sum(-tf.math.log(r_pos + LOG_EPSILON) * onehot, axis=1)
    negative_term = tf.reduce_max(-tf.math.log(r_neg + LOG_EPSILON) * (1.0 - onehot), axis=1)
    return positive_term + negative_term


def open_set_targets(probs, logits_mb, nclass: int):
    """(q [N, K+1], outlier score s [N], in_mask [N] float) of closed-set probabilities p and
    the multi-binary logits of the same (weak) views: s = sum_k p_k r_neg,k, in_mask = s < 0.5,
    q = [p * r_pos, s]."""
    r_neg, r_pos = pair_probs(logits_mb, nclass)
    score = tf.reduce_sum(probs * r_neg, axis=1)
    q = tf.concat([probs * r_pos, score[:, None]], axis=1)
    return q, score, tf.cast(score < INLIER_SCORE, tf.float32)


def threshold_mask(probs, cutoff: float):
    """[max_c probs >= cutoff] as float32 [N] (I: FixedThresholdingHook on probabilities)."""
    return tf.cast(tf.reduce_max(probs, axis=1) >= cutoff, tf.float32)


def _torch_linear(width: int, seed: int):
    """PyTorch's default nn.Linear initialisation (U(+-1/sqrt(fan_in)) for kernel and bias)."""
    bound = 1.0 / math.sqrt(width)
    return dict(kernel_initializer=keras.initializers.VarianceScaling(
                    1.0 / 3.0, mode="fan_in", distribution="uniform", seed=seed),
                bias_initializer=keras.initializers.RandomUniform(-bound, bound, seed=seed + 1))


def _xavier_normal(seed: int):
    """torch.nn.init.xavier_normal_: N(0, 2 / (fan_in + fan_out)), untruncated."""
    return keras.initializers.VarianceScaling(1.0, mode="fan_avg",
                                              distribution="untruncated_normal", seed=seed)


class OpenSetHeads(keras.layers.Layer):
    """I's IOMatchNet heads on pooled features [N, width] (float32 whatever the net's policy):
    call -> (open-set logits [N, K+1], multi-binary logits [N, 2K])."""

    def __init__(self, nclass: int, width: int, proj_size: int = 128, seed: int = 0, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.nclass, self.width, self.proj_size = int(nclass), int(width), int(proj_size)
        self.proj_hidden = keras.layers.Dense(width, activation="relu", dtype="float32",
                                              name="proj_hidden", **_torch_linear(width, seed))
        self.proj_out = keras.layers.Dense(proj_size, dtype="float32", name="proj_out",
                                           **_torch_linear(width, seed + 2))
        self.mb_classifiers = keras.layers.Dense(2 * nclass, use_bias=False, dtype="float32",
                                                 kernel_initializer=_xavier_normal(seed + 4),
                                                 name="mb_classifiers")
        self.openset_classifier = keras.layers.Dense(nclass + 1, dtype="float32",
                                                     kernel_initializer=_xavier_normal(seed + 5),
                                                     bias_initializer="zeros",
                                                     name="openset_classifier")

    def call(self, features):
        z = self.proj_out(self.proj_hidden(tf.cast(features, tf.float32)))
        return self.openset_classifier(z), self.mb_classifiers(z)

    def build_for(self):
        self(tf.zeros((1, self.width), tf.float32))
        return self


class IOMatch(SSLModel):
    """IOMatch on a Wide ResNet. p_cutoff / q_cutoff: the closed- / open-set thresholds; wu,
    lambda_mb, lambda_op: the weights of the closed-set unlabeled, multi-binary and open-set
    losses; op_start_kimg: the open-set loss is off before this many kimg (I: epoch 0);
    uratio: unlabeled images per labeled one; proj_size: the projection's width. Other
    arguments as SSLModel."""

    HPARAMS = dict(
        p_cutoff=hparam(0.95, "Closed-set pseudo-labels kept where the weak view's top "
                        "probability is at least this.", check_probability, float),
        q_cutoff=hparam(0.5, "Open-set (K+1-way) targets kept where their top probability is "
                        "at least this.", check_probability, float),
        wu=hparam(1.0, "Weight of the closed-set unlabeled loss (USB's ulb_loss_ratio).",
                  non_negative("use a weight >= 0 (IOMatch: 1)"), float),
        lambda_mb=hparam(1.0, "Weight of the multi-binary (one-vs-all) loss on labeled images.",
                         non_negative("use a weight >= 0 (IOMatch: 1)"), float),
        lambda_op=hparam(1.0, "Weight of the open-set loss on the strong views.",
                         non_negative("use a weight >= 0 (IOMatch: 1)"), float),
        op_start_kimg=hparam(64.0, "The open-set loss is off for the first kimg of training "
                             "(IOMatch: its first epoch, 1024 steps of 64 = 64 kimg).",
                             non_negative("use a kimg count >= 0 (IOMatch: 64)"), whole_kimg),
        uratio=hparam(7, "Unlabeled images per labeled image in a batch.", positive, int),
        proj_size=hparam(128, "Width of the projection the open-set and multi-binary heads "
                         "read.", positive, int),
    )
    unlabeled = Unlabeled(views=("weak", "strong"), ratio=7)

    def __init__(self, nclass, input_shape, name="iomatch", **kwargs):
        super().__init__(nclass, input_shape, name=name, **kwargs)
        self.unlabeled = Unlabeled(views=("weak", "strong"), ratio=self.uratio)

    def build_heads(self) -> list:
        width = self.filters << (self.scales - 1)      # the net's pooled features
        self.heads = OpenSetHeads(self.nclass, width, self.proj_size, self.seed * 1000 + 7,
                                  name="heads").build_for()
        self.ema_heads = OpenSetHeads(self.nclass, width, self.proj_size, self.seed * 1000 + 7,
                                      name="ema_heads").build_for()
        return [(self.heads, self.ema_heads)]

    def hparams(self) -> dict:
        return dict(super().hparams(), p_cutoff=self.p_cutoff, q_cutoff=self.q_cutoff,
                    wu=self.wu, lambda_mb=self.lambda_mb, lambda_op=self.lambda_op,
                    op_start_kimg=self.op_start_kimg, uratio=self.uratio,
                    proj_size=self.proj_size)

    def train_loss(self, labeled, unlabeled, step, draws):
        x, labels = labeled["image"], labeled["label"]
        weak, strong = unlabeled["image"][:, 0], unlabeled["image"][:, 1]
        pooled, logits = self.net.features_and_logits(tf.concat([x, weak, strong], axis=0),
                                                      training=True, update_bn_stats=True)
        logits_open, logits_mb = self.heads(pooled)
        rows = [x.shape[0], weak.shape[0], strong.shape[0]]
        logits_x, logits_weak, logits_strong = tf.split(tf.cast(logits, tf.float32), rows)
        mb_x, mb_weak, _ = tf.split(logits_mb, rows)
        _, _, open_strong = tf.split(logits_open, rows)

        # Supervised: closed-set cross-entropy and the multi-binary loss.
        loss_xe = labeled_cross_entropy(logits_x, labels, self.nclass)
        loss_mb = replicas.mean(multi_binary_loss(mb_x, labels, self.nclass))

        # Targets of the weak views (no gradient).
        probs = tf.stop_gradient(tf.nn.softmax(logits_weak))
        q, _, in_mask = open_set_targets(probs, tf.stop_gradient(mb_weak), self.nclass)
        p_mask, q_mask = threshold_mask(probs, self.p_cutoff), threshold_mask(q, self.q_cutoff)

        loss_ui = replicas.mean(ops.soft_cross_entropy(probs, logits_strong) * in_mask * p_mask)
        loss_op = replicas.mean(ops.soft_cross_entropy(q, open_strong) * q_mask)
        op_on = tf.cast(step >= round(self.op_start_kimg * KIMG), tf.float32)
        loss = (loss_xe + self.lambda_mb * loss_mb + self.wu * loss_ui
                + self.lambda_op * op_on * loss_op)
        return loss, {"losses/xe": loss_xe, "losses/mb": loss_mb, "losses/xeu": loss_ui,
                      "losses/open": loss_op, "losses/overall": loss,
                      "monitors/mask": replicas.mean(in_mask * p_mask),
                      "monitors/in_mask": replicas.mean(in_mask),
                      "monitors/p_mask": replicas.mean(p_mask),
                      "monitors/q_mask": replicas.mean(q_mask)}

    def open_set_probs(self, images, ema: bool = True):
        """Float32 (K+1)-way probabilities of the open-set head for images in [-1, 1]
        (inference-mode BN; the EMA weights unless ema=False); the last column: outlier."""
        net, heads = (self.ema_net, self.ema_heads) if ema else (self.net, self.heads)
        pooled, _ = net.features_and_logits(images, training=False)
        return tf.nn.softmax(heads(pooled)[0])

    def outlier_score(self, images, ema: bool = True):
        """IOMatch's outlier score [N]: the open-set head's (K+1)-th probability."""
        return self.open_set_probs(images, ema)[:, -1]


if __name__ == "__main__":
    from realmix_tf import registry
    registry.cli("iomatch")
