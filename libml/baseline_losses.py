"""Consistency losses and warm-ups of the libml baselines (Mean Teacher, Pi-model).

They follow the MixMatch repository's baselines (M:mean_teacher.py, M:pi_model.py), which the
RealMix paper compares against:
    loss = xe(labeled) + consistency_weight * warmup(step) * mean_{b,c} (softmax(teacher) - softmax(student))^2
with a LINEAR warm-up that ends at `warmup_pos` (0.4) of the training run:
    warmup(step) = clip(step_images / (warmup_pos * train_kimg * 1024), 0, 1).
Mean Teacher: teacher = EMA weights, consistency_weight 50; Pi-model: teacher = the same
weights on another augmentation, consistency_weight 10. Both stop the teacher's gradient.

(The original Mean Teacher / Pi-model papers ramp with exp(-5 (1 - t)^2) instead; the libml
baselines, and so these, do not.)
Everything is computed in float32 and runs eagerly, in tf.function and under XLA.
"""
import numbers

import tensorflow as tf

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


def mean_teacher_consistency(student_logits, teacher_logits):
    """Mean Teacher (and Pi-model) consistency loss: the mean over B * C entries of the squared
    difference between the softmaxes (M:mean_teacher.py). Scalar float32."""
    return tf.reduce_mean(softmax_mse(student_logits, teacher_logits))


def linear_warmup(step_images, warmup_pos, train_images):
    """clip(step_images / (warmup_pos * train_images), 0, 1): the libml baselines' warm-up.

    train_images = train_kimg * 1024; warmup_pos = 0.4 ends the ramp at 40 % of training.
    warmup_pos = 0 gives 1 from the start."""
    if isinstance(warmup_pos, numbers.Real) and warmup_pos <= 0:
        return tf.constant(1.0, tf.float32)
    ramp_images = _f32(warmup_pos) * _f32(train_images)
    return tf.clip_by_value(_f32(step_images) / ramp_images, 0.0, 1.0)
