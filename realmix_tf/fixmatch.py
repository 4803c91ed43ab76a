"""FixMatch (Sohn et al., 2020) as google-research/fixmatch (F:fixmatch.py), the base of the
open-set methods (OpenMatch, IOMatch).

Its data, declared: `uratio` unlabeled images per labeled one (7), each as a weak view (flip +
translate) and a strong view (weak + RandAugment + Cutout; libml/data/augment.py "strong").
One step (`train_loss`; libml.train.algorithm.SSLModel.train_step does the rest):
  1. one training-mode pass over [x; weak views; strong views] (batch statistics over all the
     rows, which also update the moving statistics, as F:fixmatch.py's single classifier call);
  2. pseudo-labels: argmax of softmax(weak logits), no gradient; kept where its probability
     is >= confidence (0.95);
  3. L = mean xe(x) + wu * mean_u [max p >= confidence] * xe(pseudo-label, strong logits).
The optimizer is the shared one (Adam, decoupled weight decay, EMA: libml/train/algorithm.py), not F's
SGD with Nesterov momentum, cosine decay and L2 weight decay (docs/fidelity.md).

Command line:
    python -m realmix_tf.fixmatch --dataset=cifar10.3@250-5000 --uratio=7 --wu=1
"""
import tensorflow as tf

from libml.nn import ops
from libml.nn import replicas
from libml.train.config import non_negative, positive
from libml.data.pipeline import Unlabeled
from libml.base.errors import UserError
from libml.train.algorithm import SSLModel, hparam
from realmix_tf.supervised import labeled_cross_entropy


def check_confidence(name, value):
    if not 0.0 <= value <= 1.0:
        raise UserError(f"--{name}={value} is out of range: use a probability in [0, 1] "
                        f"(FixMatch: 0.95)")


class FixMatch(SSLModel):
    """FixMatch on a Wide ResNet. confidence: the pseudo-label threshold; wu: weight of the
    unlabeled loss (not ramped); uratio: unlabeled images per labeled one. Other arguments as
    SSLModel."""

    HPARAMS = dict(
        confidence=hparam(0.95, "Pseudo-labels kept where the weak view's top probability is "
                          "at least this.", check_confidence, float),
        wu=hparam(1.0, "Weight of the unlabeled (strong-view) loss.",
                  non_negative("use a weight >= 0 (FixMatch: 1)"), float),
        uratio=hparam(7, "Unlabeled images per labeled image in a batch.", positive, int),
    )
    unlabeled = Unlabeled(views=("weak", "strong"), ratio=7)

    def __init__(self, nclass, input_shape, name="fixmatch", **kwargs):
        super().__init__(nclass, input_shape, name=name, **kwargs)
        self.unlabeled = Unlabeled(views=("weak", "strong"), ratio=self.uratio)

    def hparams(self) -> dict:
        return dict(super().hparams(), confidence=self.confidence, wu=self.wu, uratio=self.uratio)

    def train_loss(self, labeled, unlabeled, step, draws):
        x, labels = labeled["image"], labeled["label"]
        weak, strong = unlabeled["image"][:, 0], unlabeled["image"][:, 1]
        # 1. One pass: BN statistics over every row; they update the moving statistics.
        logits = self.net(tf.concat([x, weak, strong], axis=0), training=True,
                          update_bn_stats=True)
        rows = [x.shape[0], weak.shape[0], strong.shape[0]]
        logits_x, logits_weak, logits_strong = tf.split(tf.cast(logits, tf.float32), rows)

        # 2. Pseudo-labels of the weak view, kept above the confidence threshold.
        probs = tf.stop_gradient(tf.nn.softmax(logits_weak))
        mask = tf.cast(tf.reduce_max(probs, axis=1) >= self.confidence, tf.float32)
        pseudo = tf.one_hot(tf.argmax(probs, axis=1), self.nclass)

        # 3. Losses, as this replica's shares of the means over the global batch.
        loss_xe = labeled_cross_entropy(logits_x, labels, self.nclass)
        loss_xeu = replicas.mean(ops.soft_cross_entropy(pseudo, logits_strong) * mask)
        loss = loss_xe + self.wu * loss_xeu
        return loss, {"losses/xe": loss_xe, "losses/xeu": loss_xeu, "losses/overall": loss,
                      "monitors/mask": replicas.mean(mask)}


if __name__ == "__main__":
    from realmix_tf import registry
    registry.cli("fixmatch")
