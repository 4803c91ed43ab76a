"""libml/export/plain_keras.py: the exported model is plain Keras and predicts what the in-memory EMA
model predicts (the fresh-process load of a real export: tests/test_predict_export.py)."""
import numpy as np
import pytest

from libml.export import plain_keras
from libml.train.algorithm import SSLModel

SHAPE = (12, 10, 3)


@pytest.fixture(scope="module")
def model():
    """A tiny SSLModel whose EMA net has its own weights and non-trivial BN statistics."""
    m = SSLModel(nclass=3, input_shape=SHAPE, filters=8, repeat=1, scales=2, seed=3)
    rng = np.random.RandomState(0)
    for v in m.ema_net.weights:
        shape = tuple(v.shape)
        if v.path.endswith("moving_variance"):
            v.assign(rng.uniform(0.5, 2.0, shape).astype(np.float32))
        else:
            v.assign((np.asarray(v.numpy()) + rng.normal(0, 0.3, shape)).astype(np.float32))
    return m


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(1).randint(0, 256, (6, *SHAPE)).astype(np.uint8)


def ema_probabilities(model, images):
    x = images.astype(np.float32) * (2.0 / 255) - 1.0
    return np.asarray(model.classify(x, ema=True))


def test_standard_layers_and_same_predictions(model, images):
    plain = plain_keras.build(model.ema_net, SHAPE)
    modules = {type(layer).__module__.split(".")[0] for layer in plain.layers}
    assert modules == {"keras"}
    kinds = {type(layer).__name__ for layer in plain.layers}
    assert {"Rescaling", "BatchNormalization", "Conv2D", "Dense", "Softmax"} <= kinds
    expected = ema_probabilities(model, images)
    assert not np.allclose(expected, np.asarray(model.classify(
        images.astype(np.float32) * (2.0 / 255) - 1.0, ema=False)), atol=1e-4)   # EMA differs
    np.testing.assert_allclose(plain.predict(images, verbose=0), expected, rtol=0, atol=2e-6)
    variables = [v for v, _ in plain_keras.weights_for(model.ema_net, plain)]
    assert len(variables) == len(model.ema_net.weights)


def test_weights_for_round_trip_and_mismatch(model):
    plain = plain_keras.build(model.ema_net, SHAPE)
    other = SSLModel(nclass=3, input_shape=SHAPE, filters=8, repeat=1, scales=2, seed=9)
    for variable, array in plain_keras.weights_for(other.net, plain):
        variable.assign(array)
    for a, b in zip(other.net.weights, model.ema_net.weights):
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()))
    wider = SSLModel(nclass=3, input_shape=SHAPE, filters=16, repeat=1, scales=2)
    with pytest.raises(ValueError, match=r"block0_0_conv1 is \(3, 3, 16, 8\), this model needs"):
        plain_keras.weights_for(wider.net, plain)


def test_logits_net_is_the_trainer_convention(model, images):
    x = images.astype(np.float32) * (2.0 / 255) - 1.0
    net = plain_keras.LogitsNet(plain_keras.build(model.ema_net, SHAPE))
    assert net.nclass == 3
    np.testing.assert_allclose(np.asarray(net(x)), np.asarray(model.ema_net(x, training=False)),
                               rtol=0, atol=1e-4)
