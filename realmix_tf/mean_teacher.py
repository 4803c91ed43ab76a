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
import tensorflow as tf
from absl import flags

from libml import baseline_losses, replicas
from libml.config import KIMG, finite, fraction, positive, whole_kimg
from libml.errors import UserError
from libml.ssl import SSLModel, check_loss_nclass, define_loss_nclass_flag
from realmix_tf.supervised import (check_smoothing, define_smoothing_flag, labeled_cross_entropy,
                                   smoothing_hparams)


def check_mean_teacher(consistency_weight, warmup_pos, train_kimg):
    """Mean Teacher's arguments, checked once (UserError naming the flag and the fix)."""
    finite("consistency_weight", consistency_weight)
    if consistency_weight < 0:
        raise UserError(f"--consistency_weight={consistency_weight} is negative: use a "
                        f"weight >= 0 (the released default is 50)")
    fraction("the released default is 0.4")("warmup_pos", warmup_pos)
    positive("train_kimg", train_kimg)


class MeanTeacher(SSLModel):
    """Mean Teacher on a Wide ResNet. consistency_weight: weight of the consistency loss
    (the released default 50); warmup_pos: fraction of the run over which it ramps up linearly
    (0.4); train_kimg: run length in kimg, the ramp's unit; smoothing: label smoothing of the
    labeled targets (libml accepts --smoothing but never applies it: 0 is the released
    behaviour); loss_nclass: the class count the consistency loss divides by (0 = nclass).
    Other arguments as SSLModel."""

    CONSISTENCY_TAG = "losses/mt"

    def __init__(self, nclass, input_shape,
                 consistency_weight=baseline_losses.MEAN_TEACHER_CONSISTENCY_WEIGHT,
                 warmup_pos=baseline_losses.WARMUP_POS, train_kimg=65536, smoothing=0.0,
                 loss_nclass=0, name="mean_teacher", **kwargs):
        check_mean_teacher(consistency_weight, warmup_pos, train_kimg)
        loss_nclass = check_loss_nclass(loss_nclass, nclass)
        super().__init__(nclass, input_shape, name=name, **kwargs)
        self.smoothing, self.loss_nclass = check_smoothing(smoothing), loss_nclass
        self.consistency_weight = float(consistency_weight)
        self.warmup_pos = float(warmup_pos)
        self.train_kimg = whole_kimg(train_kimg)
        self._losses_and_gradients = self.maybe_jit(self._losses_and_gradients_eager)

    @classmethod
    def check_hparams(cls, consistency_weight=baseline_losses.MEAN_TEACHER_CONSISTENCY_WEIGHT,
                      warmup_pos=baseline_losses.WARMUP_POS, train_kimg=65536, smoothing=0.0,
                      loss_nclass=0, **others):
        check_mean_teacher(consistency_weight, warmup_pos, train_kimg)
        check_smoothing(smoothing)
        check_loss_nclass(loss_nclass)
        super().check_hparams(**others)

    @classmethod
    def from_config(cls, info, config, **kwargs):
        return super().from_config(info, config, train_kimg=config.train_kimg, **kwargs)

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
        ramp = baseline_losses.linear_warmup(step, self.warmup_pos, self.train_kimg * KIMG)
        return self.consistency_weight * ramp

    def train_step(self, data):
        """data = (labeled, unlabeled): labeled['image'] f32[B,H,W,C], labeled['label'] int[B],
        unlabeled['image'] f32[B,2,H,W,C]. Returns scalar float32 tensors keyed by tag."""
        labeled, unlabeled = data
        x, u = labeled["image"], unlabeled["image"]
        if x.shape[0] is None or u.shape[0] != x.shape[0] or u.shape[1] != 2:
            raise ValueError(f"MeanTeacher needs static, equal batch sizes and 2 unlabeled views: "
                             f"got labeled {x.shape}, unlabeled {u.shape} (batch the datasets "
                             f"with drop_remainder=True)")
        step = tf.convert_to_tensor(self.step)
        grads, scalars = self._losses_and_gradients(x, labeled["label"], u, step)
        self.apply_update(grads)
        self.count_images(x.shape[0])
        return replicas.totals(scalars)

    def _losses_and_gradients_eager(self, x, labels, u, step):
        teacher_view, student_view = u[:, 0], u[:, 1]
        teacher_logits = self.teacher_net()(teacher_view, training=True, update_bn_stats=False)
        with tf.GradientTape() as tape:
            logits = self.net(tf.concat([x, student_view], axis=0), training=True,
                              update_bn_stats=True, bn_groups=2)   # moving stats: labeled half
            logits_x, student_logits = tf.split(logits, 2)
            loss_xe = labeled_cross_entropy(logits_x, labels, self.nclass, self.smoothing)
            loss_mt = replicas.mean(baseline_losses.softmax_mse(student_logits, teacher_logits))
            if self.loss_nclass:
                loss_mt = loss_mt * (self.nclass / self.loss_nclass)
            weight = self.consistency_ramp(step)
            loss = loss_xe + weight * loss_mt
            scaled_loss = self.scale_loss(loss)
        grads = self.gradients(tape, scaled_loss)
        return grads, {"losses/xe": loss_xe, self.CONSISTENCY_TAG: loss_mt, "losses/overall": loss,
                       "monitors/consistency_weight": replicas.share(weight)}


# ---------------------------------------------------------------------------------------------
# Command line: the shared main is realmix_tf.registry.

def define_warmup_pos_flag(flag_values=flags.FLAGS) -> None:
    """--warmup_pos (idempotent), shared with realmix_tf.vat."""
    if "warmup_pos" not in flag_values:
        flags.DEFINE_float("warmup_pos", baseline_losses.WARMUP_POS,
                           "Fraction of --train_kimg over which the unlabeled-loss weight ramps "
                           "up linearly from 0.", flag_values=flag_values)


def define_flags(flag_values=flags.FLAGS,
                 consistency_weight=baseline_losses.MEAN_TEACHER_CONSISTENCY_WEIGHT) -> None:
    """Mean Teacher's flags (defaults: M:mean_teacher.py; the Π-model passes its weight)."""
    if "consistency_weight" in flag_values:
        return
    flags.DEFINE_float("consistency_weight", consistency_weight,
                       "Weight of the teacher-student consistency loss (ramped over --warmup_pos).",
                       flag_values=flag_values)
    define_warmup_pos_flag(flag_values)
    define_smoothing_flag(flag_values)
    define_loss_nclass_flag(flag_values)


def hparams_from_flags(flag_values=flags.FLAGS) -> dict:
    return dict(consistency_weight=flag_values.consistency_weight,
                warmup_pos=flag_values.warmup_pos, smoothing=flag_values.smoothing,
                loss_nclass=flag_values.loss_nclass)


if __name__ == "__main__":
    from realmix_tf import registry
    registry.cli("mean_teacher")
