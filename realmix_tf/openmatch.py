"""OpenMatch (Saito, Kim, Saenko, NeurIPS 2021) as VisionLearningGroup/OP_Match (O:trainer.py,
O:utils/misc.py, O:models/wideresnet.py WideResNet_Open), on FixMatch's data and step.

The model: the Wide ResNet plus a one-vs-all (OVA) head, K binary classifiers on the pooled
features (one bias-free Dense layer of 2K outputs, Glorot-normal init, O: fc_open), read as
[N, 2, K]: softmax over axis 1 gives per class k p(outlier | k) (row 0) and p(inlier | k)
(row 1). The head is a layer of the model beside `net` (SSLModel.build_heads): trained,
weight-decayed, averaged into its EMA copy and checkpointed with the net. The exported
classifier stays the K-way head of `ema_net`; `outlier_score` gives the OVA score.

Its data, declared: `uratio` (2) unlabeled images per labeled one, each as two weak views
(SOCR, OEM; the first is also FixMatch's weak view) and one strong view (FixMatch).
One step (`train_loss`; libml.train.algorithm.SSLModel.train_step does the rest):
  1. one training-mode pass over [x; weak1; weak2; strong] -> closed-set and OVA logits;
  2. L_x = xe(x), L_ova = mean_x -log p_in(label) + mean_x max_{k != label} -log p_out(k)
     (the hardest negative class only, O:ova_loss);
  3. L_oem = mean over weak1, weak2 of the OVA entropy averaged over classes (O:ova_ent);
  4. L_socr = mean_u sum_{k, j} (p_j(k | weak1) - p_j(k | weak2))^2, no stop-gradient;
  5. from start_fix_kimg on: pseudo-labels argmax softmax(weak1 logits / temperature), kept
     where the top probability >= threshold (0: all), on the unlabeled images the EMA model
     (inference mode) calls inliers (OVA outlier probability of its predicted class < 0.5);
     L_fix = mean over those inliers of xe(pseudo, strong logits);
  L = L_x + L_ova + lambda_oem L_oem + lambda_socr L_socr + L_fix.
Differences from O: (the optimizer, one labeled view, the inliers chosen per batch instead of
once per epoch, one BN pass): docs/fidelity.md.

Epochs -> kimg: an O: epoch is eval_step 1024 steps of batch 64 labeled images = 65,536 images
= 64 kimg (1 kimg = 1024 images), so start_fix 10 epochs = 640 kimg and O:'s 512 epochs = 32768
kimg (runs.paper_commands' --train_kimg).

Command line:
    python -m realmix_tf.openmatch --dataset=cifar6_mismatch50.1@2400-500 --uratio=2
"""
import keras
import tensorflow as tf

from libml.base.errors import UserError
from libml.data.pipeline import Unlabeled
from libml.nn import ops
from libml.nn import replicas
from libml.train.algorithm import SSLModel, hparam
from libml.train.config import non_negative, positive, whole_kimg
from realmix_tf.supervised import labeled_cross_entropy

KIMG_PER_EPOCH = 64           # O: epoch = 1024 steps x 64 labeled images = 64 kimg
START_FIX_EPOCHS = 10         # O: --start_fix
EPS = 1e-8                    # O: log(p + 1e-8)
INLIER_BELOW = 0.5            # O: exclude_dataset keeps unk_score < 0.5


def check_threshold(name, value):
    if not 0.0 <= value <= 1.0:
        raise UserError(f"--{name}={value} is out of range: use a probability in [0, 1] "
                        f"(OpenMatch: 0, every selected inlier)")


def ova_probs(logits_open, nclass: int):
    """[N, 2K] OVA logits -> float32 [N, 2, K]: softmax over axis 1; [:, 0] = p(outlier | k),
    [:, 1] = p(inlier | k) (O: view(N, 2, -1))."""
    logits = tf.reshape(tf.cast(logits_open, tf.float32), [-1, 2, nclass])
    return tf.nn.softmax(logits, axis=1)


def ova_loss_terms(logits_open, labels, nclass: int):
    """Per-row OVA loss on labeled rows, (positive [N], hardest negative [N]): -log p_in of the
    label, and the largest -log p_out over the other classes (O:ova_loss)."""
    probs = ova_probs(logits_open, nclass)
    onehot = tf.one_hot(labels, nclass)
    positive_term = tf.reduce_sum(-tf.math.log(probs[:, 1] + EPS) * onehot, axis=1)
    negative_term = tf.reduce_max(-tf.math.log(probs[:, 0] + EPS) * (1.0 - onehot), axis=1)
    return positive_term, negative_term


def ova_entropy(logits_open, nclass: int):
    """Per-row entropy of the K binary OVA outputs, averaged over the classes [N] (O:ova_ent)."""
    probs = ova_probs(logits_open, nclass)
    return tf.reduce_mean(tf.reduce_sum(-probs * tf.math.log(probs + EPS), axis=1), axis=1)


def soft_consistency(logits_open_1, logits_open_2, nclass: int):
    """Per-row SOCR: sum over classes and both outputs of the squared difference of the OVA
    probabilities of two views [N] (O:trainer.py L_socr)."""
    diff = ova_probs(logits_open_1, nclass) - ova_probs(logits_open_2, nclass)
    return tf.reduce_sum(tf.square(diff), axis=[1, 2])


def outlier_scores(logits, logits_open, nclass: int):
    """1 - p(inlier | predicted class) per row [N]: the predicted class = argmax of the closed-set
    logits (O: unk_score = out_open[:, 0, pred_close])."""
    predicted = tf.argmax(logits, axis=1, output_type=tf.int32)
    inlier = tf.gather(ova_probs(logits_open, nclass)[:, 1], predicted, axis=1, batch_dims=1)
    return 1.0 - inlier


def inlier_mask(logits, logits_open, nclass: int):
    """1.0 where the outlier score is below 0.5 (O:exclude_dataset's pseudo-inliers)."""
    return tf.cast(outlier_scores(logits, logits_open, nclass) < INLIER_BELOW, tf.float32)


def fix_gate(step, start_fix_kimg) -> tf.Tensor:
    """1.0 once `step` (labeled images seen) reaches start_fix_kimg * 1024, else 0.0."""
    start = tf.constant(int(round(float(start_fix_kimg) * 1024)), tf.int64)
    return tf.cast(tf.cast(step, tf.int64) >= start, tf.float32)


class OpenMatch(SSLModel):
    """OpenMatch on a Wide ResNet with a one-vs-all head. threshold, temperature: FixMatch's
    pseudo-label threshold and softmax temperature; lambda_oem, lambda_socr: weights of the OVA
    entropy and soft consistency; start_fix_kimg: FixMatch's loss starts there; uratio:
    unlabeled images per labeled one. Other arguments as SSLModel."""

    HPARAMS = dict(
        threshold=hparam(0.0, "FixMatch pseudo-labels kept where the weak view's top probability "
                         "is at least this (OpenMatch: 0, every selected inlier).",
                         check_threshold, float),
        temperature=hparam(1.0, "Softmax temperature of the FixMatch pseudo-labels (O: --T).",
                           positive, float),
        lambda_oem=hparam(0.1, "Weight of the OVA entropy minimisation on unlabeled images.",
                          non_negative("use a weight >= 0 (OpenMatch: 0.1)"), float),
        lambda_socr=hparam(0.5, "Weight of the soft open-set consistency (OpenMatch: 0.5 "
                           "CIFAR-10, 1.0 CIFAR-100).",
                           non_negative("use a weight >= 0 (OpenMatch: 0.5)"), float),
        start_fix_kimg=hparam(float(START_FIX_EPOCHS * KIMG_PER_EPOCH),
                              "FixMatch's loss on the selected inliers starts after this many "
                              "kimg (OpenMatch: 10 epochs of 64 kimg = 640).",
                              non_negative("use a start >= 0 kimg"), whole_kimg),
        uratio=hparam(2, "Unlabeled images per labeled image in a batch (OpenMatch's mu).",
                      positive, int),
    )
    unlabeled = Unlabeled(views=("weak", "weak", "strong"), ratio=2)

    def __init__(self, nclass, input_shape, name="openmatch", **kwargs):
        super().__init__(nclass, input_shape, name=name, **kwargs)
        self.unlabeled = Unlabeled(views=("weak", "weak", "strong"), ratio=self.uratio)

    def build_heads(self) -> list:
        """The OVA head (2K outputs, no bias, float32 as the classifier) and its EMA copy."""
        width = self.filters << (self.scales - 1)

        def head(name):
            layer = keras.layers.Dense(
                2 * self.nclass, use_bias=False, dtype="float32", name=name,
                kernel_initializer=keras.initializers.GlorotNormal(seed=self.seed * 1000 + 999))
            layer.build((None, width))
            return layer

        self.ova_head, self.ema_ova_head = head("ova_head"), head("ema_ova_head")
        return [(self.ova_head, self.ema_ova_head)]

    def hparams(self) -> dict:
        return dict(super().hparams(), threshold=self.threshold, temperature=self.temperature,
                    lambda_oem=self.lambda_oem, lambda_socr=self.lambda_socr,
                    start_fix_kimg=self.start_fix_kimg, uratio=self.uratio)

    def logits_and_ova(self, images, ema: bool = True, training: bool = False):
        """(closed-set logits, OVA logits [N, 2K]) of the EMA (or raw) model, float32."""
        net, head = (self.ema_net, self.ema_ova_head) if ema else (self.net, self.ova_head)
        pooled, logits = net.features_and_logits(images, training=training)
        return tf.cast(logits, tf.float32), head(pooled)

    def outlier_score(self, images, ema: bool = True):
        """Float32 [N] OVA outlier score of images in [-1, 1]: 1 - p(inlier) of the predicted
        class, inference mode, EMA weights unless ema=False (higher = more likely an outlier)."""
        logits, logits_open = self.logits_and_ova(images, ema=ema)
        return outlier_scores(logits, logits_open, self.nclass)

    def train_loss(self, labeled, unlabeled, step, draws):
        x, labels = labeled["image"], labeled["label"]
        weak1, weak2, strong = (unlabeled["image"][:, i] for i in range(3))
        k = self.nclass
        # 1. One pass: BN statistics over every row; they update the moving statistics.
        pooled, logits = self.net.features_and_logits(
            tf.concat([x, weak1, weak2, strong], axis=0), training=True, update_bn_stats=True)
        logits_open = self.ova_head(pooled)
        rows = [x.shape[0], weak1.shape[0], weak2.shape[0], strong.shape[0]]
        logits_x, logits_weak, _, logits_strong = tf.split(tf.cast(logits, tf.float32), rows)
        open_x, open_1, open_2, _ = tf.split(logits_open, rows)

        # 2. Labeled: cross-entropy and the OVA loss with the hardest negative.
        loss_xe = labeled_cross_entropy(logits_x, labels, k)
        positive_term, negative_term = ova_loss_terms(open_x, labels, k)
        loss_ova = replicas.mean(positive_term) + replicas.mean(negative_term)
        # 3-4. Unlabeled, every image: OVA entropy and soft open-set consistency.
        loss_oem = 0.5 * (replicas.mean(ova_entropy(open_1, k))
                          + replicas.mean(ova_entropy(open_2, k)))
        loss_socr = replicas.mean(soft_consistency(open_1, open_2, k))

        # 5. FixMatch on the inliers the EMA model selects, from start_fix_kimg on.
        ema_logits, ema_open = self.logits_and_ova(weak1, ema=True)
        inliers = tf.stop_gradient(inlier_mask(ema_logits, ema_open, k))
        probs = tf.stop_gradient(tf.nn.softmax(logits_weak / self.temperature))
        confident = tf.cast(tf.reduce_max(probs, axis=1) >= self.threshold, tf.float32)
        pseudo = tf.one_hot(tf.argmax(probs, axis=1), k)
        gate = fix_gate(step, self.start_fix_kimg)
        loss_fix = gate * replicas.masked_mean(
            ops.soft_cross_entropy(pseudo, logits_strong) * confident, inliers, self.replica_mode)

        loss = (loss_xe + loss_ova + self.lambda_oem * loss_oem + self.lambda_socr * loss_socr
                + loss_fix)
        return loss, {"losses/xe": loss_xe, "losses/ova": loss_ova, "losses/oem": loss_oem,
                      "losses/socr": loss_socr, "losses/fix": loss_fix, "losses/overall": loss,
                      "monitors/inliers": replicas.mean(inliers),
                      "monitors/mask": replicas.mean(confident * inliers),
                      "monitors/fix_on": replicas.share(gate)}


if __name__ == "__main__":
    from realmix_tf import registry
    registry.cli("openmatch")
