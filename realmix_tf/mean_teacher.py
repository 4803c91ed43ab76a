"""Mean Teacher (Tarvainen & Valpola, 2017) as the MixMatch repository's baseline
(M:mean_teacher.py), which the RealMix paper compares against (Table 2, Figure 2).

One step, with u = the two augmented views of the unlabeled batch:
  teacher = EMA weights (ema_net) on view 0, training-mode BN (batch statistics), no gradient;
  student = raw weights (net) on view 1, training-mode BN;
  loss = xe(labeled) + consistency_weight * warmup(step) * mean_{b,c} (softmax(teacher) - softmax(student))^2
  warmup(step) = clip(step_images / (warmup_pos * train_kimg * 1024), 0, 1), a linear ramp.

BN policy, made explicit: only the labeled pass updates the moving statistics, as the released
code (it keeps the update ops of the first classifier call, the labeled one). The labeled and
student passes run as one call with bn_groups=2 (each half normalised with its own batch
statistics, moving statistics from chunk 0 = the labeled half); the teacher pass updates
nothing. Its consistency target uses the EMA weights of the previous step, as released.

Command line:
    python -m realmix_tf.mean_teacher --dataset=cifar10.3@250-5000 [--consistency_weight=50]
"""
import numbers

import tensorflow as tf

from libml.nn import replicas
from libml.train.config import KIMG, fraction, non_negative
from libml.data.pipeline import Unlabeled
from libml.train.algorithm import LOSS_NCLASS, TRAIN_KIMG, SSLModel, hparam
from realmix_tf.supervised import SMOOTHING, labeled_cross_entropy, smoothing_hparams

# Flag defaults of the MixMatch-repo baselines (lr, wd, ema, batch as in RealMix).
MEAN_TEACHER_CONSISTENCY_WEIGHT = 50.0
PI_MODEL_CONSISTENCY_WEIGHT = 10.0
WARMUP_POS = 0.4


def _f32(x):
    return tf.cast(tf.convert_to_tensor(x), tf.float32)


def softmax_mse(student_logits, teacher_logits):
    """Per-example mean over classes of (softmax(teacher) - softmax(student))^2, float32 [B].

    The teacher's gradient is stopped: only the student is pulled towards the teacher."""
    teacher = tf.stop_gradient(tf.nn.softmax(_f32(teacher_logits), axis=-1))
    student = tf.nn.softmax(_f32(student_logits), axis=-1)
    return tf.reduce_mean(tf.square(teacher - student), axis=-1)


def linear_warmup(step_images, warmup_pos, train_images):
    """clip(step_images / (warmup_pos * train_images), 0, 1): the libml baselines' warm-up.

    train_images = train_kimg * 1024; warmup_pos = 0.4 ends the ramp at 40 % of training.
    warmup_pos = 0 gives 1 from the start."""
    if isinstance(warmup_pos, numbers.Real) and warmup_pos <= 0:
        return tf.constant(1.0, tf.float32)
    ramp_images = _f32(warmup_pos) * _f32(train_images)
    return tf.clip_by_value(_f32(step_images) / ramp_images, 0.0, 1.0)


WARMUP_POS_HPARAM = hparam(WARMUP_POS, "Fraction of --train_kimg over which the "
                    "unlabeled-loss weight ramps up linearly from 0.",
                    fraction("the released default is 0.4"), float)


class MeanTeacher(SSLModel):
    """Mean Teacher on a Wide ResNet. consistency_weight: weight of the consistency loss
    (the released default 50); warmup_pos: fraction of the run over which it ramps up linearly
    (0.4); train_kimg: run length in kimg, the ramp's unit; smoothing: label smoothing of the
    labeled targets (libml accepts --smoothing but never applies it: 0 is the released
    behaviour); loss_nclass: the class count the consistency loss divides by (0 = nclass).
    Other arguments as SSLModel."""

    HPARAMS = dict(
        consistency_weight=hparam(MEAN_TEACHER_CONSISTENCY_WEIGHT,
                                  "Weight of the teacher-student consistency loss (ramped over "
                                  "--warmup_pos).",
                                  non_negative("use a weight >= 0 (the released default is 50)"),
                                  float),
        warmup_pos=WARMUP_POS_HPARAM,
        train_kimg=TRAIN_KIMG,
        smoothing=SMOOTHING,
        loss_nclass=LOSS_NCLASS,
    )
    unlabeled = Unlabeled(views=("weak", "weak"))    # view 0: teacher, view 1: student
    CONSISTENCY_TAG = "losses/mt"

    def __init__(self, nclass, input_shape, name="mean_teacher", **kwargs):
        super().__init__(nclass, input_shape, name=name, **kwargs)

    def hparams(self) -> dict:
        return dict(super().hparams(), consistency_weight=self.consistency_weight,
                    warmup_pos=self.warmup_pos, train_kimg=self.train_kimg,
                    **smoothing_hparams(self.smoothing),
                    **({"loss_nclass": self.loss_nclass} if self.loss_nclass else {}))

    def teacher_net(self):
        """The network whose predictions on view 0 are the targets: the EMA weights."""
        return self.ema_net

    def consistency_ramp(self, step):
        """consistency_weight * linear warm-up at `step` images (float32 scalar)."""
        ramp = linear_warmup(step, self.warmup_pos, self.train_kimg * KIMG)
        return self.consistency_weight * ramp

    def train_loss(self, labeled, unlabeled, step, draws):
        x, labels = labeled["image"], labeled["label"]
        teacher_view, student_view = unlabeled["image"][:, 0], unlabeled["image"][:, 1]
        teacher_logits = tf.stop_gradient(
            self.teacher_net()(teacher_view, training=True, update_bn_stats=False))
        logits = self.net(tf.concat([x, student_view], axis=0), training=True,
                          update_bn_stats=True, bn_groups=2)   # moving stats: labeled half
        logits_x, student_logits = tf.split(logits, 2)
        loss_xe = labeled_cross_entropy(logits_x, labels, self.nclass, self.smoothing)
        loss_mt = replicas.mean(softmax_mse(student_logits, teacher_logits))
        if self.loss_nclass:
            loss_mt = loss_mt * (self.nclass / self.loss_nclass)
        weight = self.consistency_ramp(step)
        loss = loss_xe + weight * loss_mt
        return loss, {"losses/xe": loss_xe, self.CONSISTENCY_TAG: loss_mt, "losses/overall": loss,
                      "monitors/consistency_weight": replicas.share(weight)}


if __name__ == "__main__":
    from realmix_tf import registry
    registry.cli("mean_teacher")
