"""Wide ResNet and BatchNorm of libml/nn/wrn.py against spec §5 and §12.9."""
import math

import numpy as np
import pytest
import tensorflow as tf

from libml.nn.wrn import BatchNorm, WideResNet, scales_for_size


def n_params(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


@pytest.fixture(scope="module")
def wrn28_2():
    return WideResNet(10, seed=1).build_for((32, 32, 3))


def test_wrn28_2_parameter_count(wrn28_2):
    assert n_params(wrn28_2.trainable_variables) == 1_469_642
    assert n_params(WideResNet(6).build_for((32, 32, 3)).trainable_variables) == 1_469_126


def test_wrn28_2_layout(wrn28_2):
    kernels = wrn28_2.kernels()
    convs = [k for k in kernels if len(k.shape) == 4]
    assert len(convs) == 28                            # "28": stem + 12 blocks x 2 + 3 projections
    assert len(kernels) == 29                          # + the dense kernel: what weight decay sees
    assert all(v.path.endswith("kernel") for v in kernels)
    biases = [v for v in wrn28_2.trainable_variables if v.path.endswith("bias")]
    assert len(biases) == 29                           # convs have biases (TF1 conv2d default)
    assert [k.shape[-1] for k in convs if k.shape[0] == 1] == [32, 64, 128]
    assert len(wrn28_2.bn_layers()) == 25
    # Stride 2 at stages 1 and 2, 'same' padding: 32 -> 16 -> 8.
    assert wrn28_2.blocks[4].conv1.strides == (2, 2) and wrn28_2.blocks[0].conv1.strides == (1, 1)
    assert wrn28_2.blocks[0].activate_before_residual
    assert not any(b.activate_before_residual for b in wrn28_2.blocks[1:])


@pytest.mark.parametrize("name, k, filters", [
    ("stem", 3, 16), ("block0_1/conv1", 3, 32), ("block1_1/conv2", 3, 64),
    ("block2_3/conv2", 3, 128), ("block0_0/shortcut", 1, 32), ("block1_0/shortcut", 1, 64),
    ("block2_0/shortcut", 1, 128)])
def test_conv_init_is_untruncated_he_fan_out(wrn28_2, name, k, filters):
    expected = {16: 0.117851, 32: 0.083333, 64: 0.058926, 128: 0.041667}[filters] if k == 3 \
        else {32: 0.25, 64: 0.176777, 128: 0.125}[filters]
    assert math.isclose(expected, 1 / math.sqrt(0.5 * k * k * filters), rel_tol=1e-5)
    kernel = next(v for v in wrn28_2.kernels() if v.path.endswith(f"{name}/kernel")).numpy()
    # Sampling error of a std estimate from n normal draws is about std / sqrt(2n).
    assert kernel.std() == pytest.approx(expected, rel=5 / math.sqrt(2 * kernel.size))
    assert abs(kernel.mean()) < 5 * expected / math.sqrt(kernel.size)
    # Untruncated: a truncated normal (|x| <= 2 std) would never reach 2.5 std.
    if kernel.size > 10000:
        assert np.abs(kernel).max() > 2.5 * expected


def test_other_initial_values(wrn28_2):
    dense = wrn28_2.classifier.kernel.numpy()
    assert dense.std() == pytest.approx(math.sqrt(2 / (128 + 10)), rel=0.1)   # Glorot normal
    for v in wrn28_2.trainable_variables:
        if v.path.endswith("bias") or v.path.endswith("beta"):
            assert not v.numpy().any()
        if v.path.endswith("gamma"):
            assert (v.numpy() == 1).all()
    bn = wrn28_2.final_bn
    assert not bn.moving_mean.numpy().any() and (bn.moving_variance.numpy() == 1).all()
    assert (bn.momentum, bn.epsilon) == (0.999, 1e-3)


def test_scales_for_size():
    assert [scales_for_size(s) for s in (16, 28, 32, 96)] == [2, 3, 3, 5]


def test_seed_reproducible():
    a = WideResNet(3, filters=8, repeat=1, scales=2, seed=5).build_for((8, 8, 3))
    b = WideResNet(3, filters=8, repeat=1, scales=2, seed=5).build_for((8, 8, 3))
    c = WideResNet(3, filters=8, repeat=1, scales=2, seed=6).build_for((8, 8, 3))
    assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a.weights, b.weights))
    assert not np.array_equal(a.stem.kernel.numpy(), c.stem.kernel.numpy())
    # Layers do not share an initializer seed.
    assert not np.allclose(a.blocks[0].conv1.kernel.numpy().std(), 0)
    assert not np.array_equal(a.blocks[0].conv2.kernel.numpy()[..., :8, :],
                              a.blocks[1].conv1.kernel.numpy()[..., :8, :])


def test_logits_shape_and_float32_under_bf16():
    net = WideResNet(5, filters=8, repeat=1, scales=2, dtype="mixed_bfloat16").build_for((16, 16, 3))
    assert net.blocks[0].conv1.compute_dtype == "bfloat16"
    assert net.stem.kernel.dtype == "float32"
    logits = net(tf.random.uniform((4, 16, 16, 3), -1, 1), training=True)
    assert logits.shape == (4, 5) and logits.dtype == tf.float32


# ---------------------------------------------------------------------------------------------
# BatchNorm policy

def _bn(channels=3):
    bn = BatchNorm()
    bn.build((None, 4, 4, channels))
    bn.gamma.assign([1.5, 0.5, 2.0][:channels])
    bn.beta.assign([0.1, -0.2, 0.3][:channels])
    bn.moving_mean.assign([0.2, -0.1, 0.0][:channels])
    bn.moving_variance.assign([1.0, 2.0, 0.5][:channels])
    return bn


def _stats(bn):
    return bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()


def test_bn_training_normalises_with_batch_statistics_and_updates_moving_stats():
    x = np.random.RandomState(0).normal(2.0, 3.0, (6, 4, 4, 3)).astype(np.float32)
    bn = _bn()
    mean0, var0 = _stats(bn)
    y = bn(x, training=True, update_stats=True).numpy()
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    expected = (x - mean) / np.sqrt(var + 1e-3) * [1.5, 0.5, 2.0] + [0.1, -0.2, 0.3]
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    n = 6 * 4 * 4
    mean1, var1 = _stats(bn)
    np.testing.assert_allclose(mean1, 0.999 * mean0 + 0.001 * mean, rtol=1e-5)
    np.testing.assert_allclose(var1, 0.999 * var0 + 0.001 * var * n / (n - 1), rtol=1e-5)


def test_bn_without_update_leaves_moving_stats():
    x = np.random.RandomState(1).normal(size=(4, 4, 4, 3)).astype(np.float32)
    bn = _bn()
    before = _stats(bn)
    bn(x, training=True, update_stats=False)
    bn(x, training=True, update_stats=False, groups=2)
    after = _stats(bn)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


def test_bn_inference_uses_moving_stats():
    x = np.random.RandomState(2).normal(size=(2, 4, 4, 3)).astype(np.float32)
    bn = _bn()
    mean, var = _stats(bn)
    y = bn(x, training=False).numpy()
    expected = (x - mean) / np.sqrt(var + 1e-3) * [1.5, 0.5, 2.0] + [0.1, -0.2, 0.3]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mean, _stats(bn)[0])


def test_bn_groups_equal_separate_chunks_and_update_from_chunk_0():
    rng = np.random.RandomState(3)
    chunks = [rng.normal(i, 1 + i, (5, 4, 4, 3)).astype(np.float32) for i in range(3)]
    grouped, separate = _bn(), _bn()
    y = grouped(np.concatenate(chunks), training=True, update_stats=True, groups=3).numpy()
    parts = [separate(c, training=True, update_stats=(i == 0)).numpy()
             for i, c in enumerate(chunks)]
    np.testing.assert_allclose(y, np.concatenate(parts), rtol=1e-4, atol=1e-4)
    for a, b in zip(_stats(grouped), _stats(separate)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # Control: the statistics of the whole batch would give something else.
    whole = _bn()
    whole(np.concatenate(chunks), training=True, update_stats=True)
    assert not np.allclose(_stats(whole)[0], _stats(grouped)[0], rtol=1e-4)


def test_network_update_switch_and_groups():
    net = WideResNet(4, filters=8, repeat=1, scales=2, seed=2).build_for((8, 8, 3))
    x = tf.random.stateless_uniform((6, 8, 8, 3), [1, 2], -1, 1)
    snapshot = [v.numpy() for v in net.non_trainable_variables]
    net(x, training=True, update_bn_stats=False)
    net(x, training=True, bn_groups=3, update_bn_stats=False)
    net(x, training=False)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(snapshot, net.non_trainable_variables))
    net(x, training=True)                                      # default: update when training
    assert not np.array_equal(snapshot[0], net.non_trainable_variables[0].numpy())
    # One grouped pass gives the logits of separate passes.
    ref = WideResNet(4, filters=8, repeat=1, scales=2, seed=2).build_for((8, 8, 3))
    grouped = net(x, training=True, bn_groups=3).numpy()
    separate = np.concatenate([ref(x[0:2], training=True)] +
                              [ref(x[i:i + 2], training=True, update_bn_stats=False)
                               for i in (2, 4)])
    np.testing.assert_allclose(grouped, separate, rtol=1e-4, atol=1e-5)
