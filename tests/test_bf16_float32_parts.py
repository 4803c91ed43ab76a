"""bf16 training keeps in float32 what needs the range or the precision (issue 23, item 2):
the weights and their EMA, the BN moving statistics, the label guess's softmax and sharpening,
and the losses. Checked on a real RealMix step under the mixed_bfloat16 policy."""
import numpy as np
import tensorflow as tf

from libml.nn import ops
from realmix_tf.realmix import RealMix


def test_realmix_bf16_step_keeps_weights_ema_bn_stats_and_losses_in_float32():
    model = RealMix(3, (8, 8, 3), filters=4, repeat=1, precision="mixed_bfloat16",
                    warmup_kimg=1)
    assert model.net.blocks[0].conv1.compute_dtype == "bfloat16"
    rng = np.random.RandomState(0)
    labeled = {"image": tf.constant(rng.uniform(-1, 1, (4, 8, 8, 3)), tf.float32),
               "label": tf.constant(rng.randint(0, 3, 4), tf.int64)}
    unlabeled = {"image": tf.constant(rng.uniform(-1, 1, (4, 2, 8, 8, 3)), tf.float32)}
    bn = model.net.blocks[0].bn1
    mean_before = bn.moving_mean.numpy().copy()
    outputs = tf.function(model.train_step)((labeled, unlabeled))
    assert outputs and all(v.dtype == tf.float32 for v in outputs.values())
    assert all(np.isfinite(v.numpy()).all() for v in outputs.values())
    for net in (model.net, model.ema_net):
        assert {v.dtype for v in net.weights} == {"float32"}      # weights, EMA, BN stats
    assert not np.array_equal(bn.moving_mean.numpy(), mean_before)   # updated, in float32
    ema_kernel = model.ema_net.stem.kernel.numpy()
    assert ema_kernel.dtype == np.float32
    assert not np.array_equal(ema_kernel, model.net.stem.kernel.numpy())   # a real EMA step


def test_label_guess_is_float32_from_bf16_logits():
    logits = tf.constant([[2.0, 0.0, -1.0], [0.5, 0.25, 0.0]], tf.bfloat16)
    guess = ops.guess_label([logits, logits], 0.5)
    assert guess.dtype == tf.float32
    p = tf.nn.softmax(tf.cast(logits, tf.float32)).numpy() ** 2
    np.testing.assert_allclose(guess.numpy(), p / p.sum(1, keepdims=True), rtol=1e-6)
