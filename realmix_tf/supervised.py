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

from libml import layers
from libml.errors import UserError
from libml.ssl import SSLModel


def labeled_cross_entropy(logits, labels, nclass):
    """Mean cross-entropy (float32 scalar) of logits [B, C] against integer labels [B]."""
    return tf.reduce_mean(layers.soft_cross_entropy(tf.one_hot(labels, nclass), logits))


class Supervised(SSLModel):
    """Cross-entropy on the labeled batch only. Keyword arguments as SSLModel."""

    uses_unlabeled = False   # the trainer may feed any (even empty) unlabeled stream

    def __init__(self, nclass, input_shape, name="supervised", **kwargs):
        super().__init__(nclass, input_shape, name=name, **kwargs)
        self._losses_and_gradients = tf.function(self._losses_and_gradients_eager,
                                                 jit_compile=self.use_jit)

    def train_step(self, data):
        """data = (labeled, unlabeled); labeled['image'] f32[B,H,W,C], labeled['label'] int[B].
        Returns {'losses/xe': mean cross-entropy before the update}."""
        labeled = data[0]
        x = labeled["image"]
        grads, scalars = self._losses_and_gradients(x, labeled["label"])
        self.apply_update(grads)
        self.count_images(x.shape[0] if x.shape[0] is not None else tf.shape(x)[0])
        return scalars

    def _losses_and_gradients_eager(self, x, labels):
        with tf.GradientTape() as tape:
            logits = self.net(x, training=True, update_bn_stats=True)
            loss = labeled_cross_entropy(logits, labels, self.nclass)
            scaled_loss = self.scale_loss(loss)
        return self.gradients(tape, scaled_loss), {"losses/xe": loss}


# ---------------------------------------------------------------------------------------------
# Command line: the shared main is realmix_tf.registry.

REFUSED_FLAGS = ("extend",)    # trainer flags this command refuses when set


def define_flags(flag_values=flags.FLAGS) -> None:
    """No flags of its own: the trainer's."""


def hparams_from_flags(flag_values=flags.FLAGS) -> dict:
    if flag_values.extend:
        raise UserError("--extend is set but the supervised baseline does not read unlabeled "
                        "images: drop --extend")
    return {}


if __name__ == "__main__":
    from realmix_tf import registry
    registry.cli("supervised")
