"""Π-model (Laine & Aila, 2017) as the MixMatch repository's baseline (M:pi_model.py), which
the RealMix paper quotes in Tables 2-3 and Figure 3.

Mean Teacher with the teacher replaced by the same raw weights: with u = the two augmented
views of the unlabeled batch,
  teacher = net on view 0, training-mode BN (its own batch statistics), no gradient;
  student = net on view 1, training-mode BN;
  loss = xe(labeled) + consistency_weight * warmup(step) * mean_{b,c} (softmax(teacher) - softmax(student))^2
  warmup(step) = clip(step_images / (warmup_pos * train_kimg * 1024), 0, 1).
Only the labeled pass updates the BN moving statistics (as released). Defaults as M:pi_model.py:
consistency_weight 10, warmup_pos 0.4; the MixMatch tables ran it with --consistency_weight=20
on CIFAR-10 (M:runs/table5.sh) and 5 with --wd=0.2 on SVHN (M:runs/table6.sh).

Command line:
    python -m realmix_tf.pi_model --dataset=cifar10.3@250-5000 --consistency_weight=20
"""
import dataclasses

from realmix_tf.mean_teacher import PI_MODEL_CONSISTENCY_WEIGHT, MeanTeacher


class PiModel(MeanTeacher):
    """Π-model on a Wide ResNet. Arguments as MeanTeacher (consistency_weight default 10)."""

    HPARAMS = dict(consistency_weight=dataclasses.replace(
        MeanTeacher.HPARAMS["consistency_weight"],
        default=PI_MODEL_CONSISTENCY_WEIGHT))
    CONSISTENCY_TAG = "losses/pm"

    def __init__(self, nclass, input_shape, name="pi_model", **kwargs):
        super().__init__(nclass, input_shape, name=name, **kwargs)

    def teacher_net(self):
        """The targets come from the raw weights (no EMA), on the other view."""
        return self.net


if __name__ == "__main__":
    from realmix_tf import registry
    registry.cli("pi_model")
