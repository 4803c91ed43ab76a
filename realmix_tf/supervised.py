"""Supervised baseline: the labeled images only, with RealMix's network, augmentation, Adam,
decoupled weight decay and EMA (libml.train.algorithm.SSLModel). It is the paper's "supervised baseline"
(e.g. 20.32 % error with the 2400 labels of the mismatch experiment, section 4.2.2).

One step: logits of the augmented labeled batch (training-mode BN, which updates the moving
statistics), loss = mean cross-entropy against the labels, then SSLModel.apply_update.
It declares no unlabeled data (`unlabeled = None`): the trainer reads none.

Command line:
    python -m realmix_tf.supervised --dataset=cifar10.3@250-5000
"""
import tensorflow as tf

from libml.nn import ops
from libml.nn import replicas
from libml.base.errors import UserError
from libml.train.algorithm import SSLModel, hparam


def labeled_cross_entropy(logits, labels, nclass, smoothing=0.0):
    """Mean cross-entropy (float32 scalar) of logits [B, C] against integer labels [B], the
    one-hot targets smoothed as libml: y - smoothing * (y - 1/C) (M:libml/nn/wrn.py augment);
    as this replica's share of the mean over every replica's rows (libml/nn/replicas.py)."""
    targets = tf.one_hot(labels, nclass)
    if smoothing:
        targets = targets - smoothing * (targets - 1.0 / nclass)
    return replicas.mean(ops.soft_cross_entropy(targets, logits))


def check_smoothing(name, smoothing) -> None:
    """Label smoothing in [0, 1) (UserError naming --smoothing otherwise)."""
    if not 0.0 <= smoothing < 1.0:
        raise UserError(f"--{name}={smoothing} is out of range: use a value in [0, 1) "
                        f"(libml's fully supervised runs: 0.001 on CIFAR, 0.01 on SVHN)")


SMOOTHING = hparam(0.0, "Label smoothing of the labeled targets: y - s (y - 1/C) (libml's fully "
                   "supervised runs: 0.001 CIFAR, 0.01 SVHN; 0 = none).", check_smoothing, float)


def smoothing_hparams(smoothing) -> dict:
    """{'smoothing': s} when s != 0, else {}: run folders without smoothing keep their name."""
    return {"smoothing": smoothing} if smoothing else {}


class Supervised(SSLModel):
    """Cross-entropy on the labeled batch only; smoothing: label smoothing of its targets
    (0 = none). Other keyword arguments as SSLModel."""

    HPARAMS = dict(smoothing=SMOOTHING)
    unlabeled = None     # no unlabeled data: the trainer reads none (and refuses --extend)

    def __init__(self, nclass, input_shape, name="supervised", **kwargs):
        super().__init__(nclass, input_shape, name=name, **kwargs)

    def hparams(self) -> dict:
        return dict(super().hparams(), **smoothing_hparams(self.smoothing))

    def train_loss(self, labeled, unlabeled, step, draws):
        """Mean cross-entropy of the labeled batch (training-mode BN updates the moving
        statistics)."""
        logits = self.net(labeled["image"], training=True, update_bn_stats=True)
        loss = labeled_cross_entropy(logits, labeled["label"], self.nclass, self.smoothing)
        return loss, {"losses/xe": loss}


if __name__ == "__main__":
    from realmix_tf import registry
    registry.cli("supervised")
