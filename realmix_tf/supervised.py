"""Supervised baseline: the labeled images only, with RealMix's network, augmentation, Adam,
decoupled weight decay and EMA (libml.ssl.SSLModel). It is the paper's "supervised baseline"
(e.g. 20.32 % error with the 2400 labels of the mismatch experiment, section 4.2.2).

One step: logits of the augmented labeled batch (training-mode BN, which updates the moving
statistics), loss = mean cross-entropy against the labels, then SSLModel.apply_update.
The unlabeled batch the trainer passes is ignored (`uses_unlabeled = False`).

Command line:
    python -m realmix_tf.supervised --dataset=cifar10.3@250-5000
"""
import tensorflow as tf
from absl import flags

from libml import layers, replicas
from libml.errors import UserError
from libml.ssl import SSLModel


def labeled_cross_entropy(logits, labels, nclass, smoothing=0.0):
    """Mean cross-entropy (float32 scalar) of logits [B, C] against integer labels [B], the
    one-hot targets smoothed as libml: y - smoothing * (y - 1/C) (M:libml/models.py augment);
    as this replica's share of the mean over every replica's rows (libml/replicas.py)."""
    targets = tf.one_hot(labels, nclass)
    if smoothing:
        targets = targets - smoothing * (targets - 1.0 / nclass)
    return replicas.mean(layers.soft_cross_entropy(targets, logits))


def check_smoothing(smoothing) -> float:
    """Label smoothing in [0, 1) (UserError naming --smoothing otherwise), as a float."""
    if not 0.0 <= smoothing < 1.0:
        raise UserError(f"--smoothing={smoothing} is out of range: use a value in [0, 1) "
                        f"(libml's fully supervised runs: 0.001 on CIFAR, 0.01 on SVHN)")
    return float(smoothing)


def smoothing_hparams(smoothing) -> dict:
    """{'smoothing': s} when s != 0, else {}: run folders without smoothing keep their name."""
    return {"smoothing": smoothing} if smoothing else {}


class Supervised(SSLModel):
    """Cross-entropy on the labeled batch only; smoothing: label smoothing of its targets
    (0 = none). Other keyword arguments as SSLModel."""

    uses_unlabeled = False   # the trainer may feed any (even empty) unlabeled stream

    def __init__(self, nclass, input_shape, smoothing=0.0, name="supervised", **kwargs):
        super().__init__(nclass, input_shape, name=name, **kwargs)
        self.smoothing = check_smoothing(smoothing)
        self._losses_and_gradients = self.maybe_jit(self._losses_and_gradients_eager)

    @classmethod
    def check_hparams(cls, smoothing=0.0, **others):
        check_smoothing(smoothing)
        super().check_hparams(**others)

    def hparams(self) -> dict:
        return dict(super().hparams(), **smoothing_hparams(self.smoothing))

    def train_step(self, data):
        """data = (labeled, unlabeled); labeled['image'] f32[B,H,W,C], labeled['label'] int[B].
        Returns {'losses/xe': mean cross-entropy before the update}."""
        labeled = data[0]
        x = labeled["image"]
        grads, scalars = self._losses_and_gradients(x, labeled["label"])
        self.apply_update(grads)
        self.count_images(x.shape[0] if x.shape[0] is not None else tf.shape(x)[0])
        return replicas.totals(scalars)

    def _losses_and_gradients_eager(self, x, labels):
        with tf.GradientTape() as tape:
            logits = self.net(x, training=True, update_bn_stats=True)
            loss = labeled_cross_entropy(logits, labels, self.nclass, self.smoothing)
            scaled_loss = self.scale_loss(loss)
        return self.gradients(tape, scaled_loss), {"losses/xe": loss}


# ---------------------------------------------------------------------------------------------
# Command line: the shared main is realmix_tf.registry.

REFUSED_FLAGS = ("extend",)    # trainer flags this command refuses when set


def define_smoothing_flag(flag_values=flags.FLAGS) -> None:
    """--smoothing, shared by the supervised, fully supervised, Mean Teacher, Π-model and VAT
    commands (idempotent)."""
    if "smoothing" not in flag_values:
        flags.DEFINE_float("smoothing", 0.0, "Label smoothing of the labeled targets: y - s (y - 1/C) "
                           "(libml's fully supervised runs: 0.001 CIFAR, 0.01 SVHN; 0 = none).",
                           flag_values=flag_values)


def define_flags(flag_values=flags.FLAGS) -> None:
    """--smoothing; the rest are the trainer's."""
    define_smoothing_flag(flag_values)


def hparams_from_flags(flag_values=flags.FLAGS) -> dict:
    if flag_values.extend:
        raise UserError("--extend is set but supervised training does not read unlabeled "
                        "images: drop --extend")
    return dict(smoothing=flag_values.smoothing)


if __name__ == "__main__":
    from realmix_tf import registry
    registry.cli("supervised")
