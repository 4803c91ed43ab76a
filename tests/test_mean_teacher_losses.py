"""Mean Teacher's losses (realmix_tf/mean_teacher.py) on hand-computed values, eagerly, in tf.function and under XLA."""
import numpy as np
import pytest
import tensorflow as tf

from realmix_tf import mean_teacher as bl

MODES = ["eager", "function", "jit"]


def run(mode, fn, *args):
    args = [tf.convert_to_tensor(a) for a in args]
    if mode != "eager":
        fn = tf.function(fn, jit_compile=(mode == "jit"))
    return fn(*args).numpy()


# Student uniform over 3 classes, teacher [1/2, 1/4, 1/4]: differences [1/6, -1/12, -1/12],
# squares [4, 1, 1]/144, class mean 1/72. Second row: identical logits, 0.
STUDENT = np.float32([[0, 0, 0], [1, 2, 3]])
TEACHER = np.log(np.float32([[0.5, 0.25, 0.25], [np.e, np.e ** 2, np.e ** 3]]))


@pytest.mark.parametrize("mode", MODES)
def test_softmax_mse_and_consistency(mode):
    np.testing.assert_allclose(run(mode, bl.softmax_mse, STUDENT, TEACHER), [1 / 72, 0.0], atol=1e-7)
    np.testing.assert_allclose(run(mode, lambda s, t: tf.reduce_mean(bl.softmax_mse(s, t)), STUDENT, TEACHER), 1 / 144, atol=1e-7)


def test_consistency_gradient_flows_to_student_only():
    student, teacher = tf.Variable(STUDENT), tf.Variable(TEACHER)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(bl.softmax_mse(student, teacher))
    grad_student, grad_teacher = tape.gradient(loss, [student, teacher])
    assert grad_teacher is None
    assert np.abs(grad_student.numpy()[0]).sum() > 0
    np.testing.assert_allclose(grad_student.numpy()[1], 0.0, atol=1e-8)  # already agrees


@pytest.mark.parametrize("mode", MODES)
def test_linear_warmup(mode):
    train_images = 1 << 26  # train_kimg = 65536
    steps = np.int64([0, 1 << 24, 6710886, 26843546, 1 << 26])
    out = run(mode, lambda s: bl.linear_warmup(s, bl.WARMUP_POS, train_images), steps)
    np.testing.assert_allclose(out, [0.0, 0.625, 0.25, 1.0, 1.0], atol=1e-6)
    assert float(bl.linear_warmup(0, 0.0, train_images)) == 1.0


def test_mean_teacher_total_loss_at_mid_warmup():
    # xe 0.5 + 50 * warmup(0.625) * 1/144, the combination of M:mean_teacher.py.
    weight = bl.MEAN_TEACHER_CONSISTENCY_WEIGHT * bl.linear_warmup(1 << 24, bl.WARMUP_POS, 1 << 26)
    total = 0.5 + weight * tf.reduce_mean(bl.softmax_mse(STUDENT, TEACHER))
    np.testing.assert_allclose(float(total), 0.5 + 50 * 0.625 / 144, rtol=1e-6)
