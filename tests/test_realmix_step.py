"""SSLModel updates (Adam, decoupled WD, EMA) and the RealMix train step (spec §6, §12.8)."""
import numpy as np
import pytest
import tensorflow as tf

from libml.nn import ops
from libml.base.errors import UserError
from libml.train.algorithm import SSLModel
from realmix_tf.realmix import RealMix
from tests.reference import clone_network, softmax
from tests.two_devices import run_script, toy_mirrored

B, SIZE, NCLASS = 8, 16, 4
TINY = dict(filters=8, repeat=1)


def make(**kwargs):
    args = {**TINY, "warmup_kimg": 0, "w_match": 10.0, **kwargs}
    return RealMix(NCLASS, (SIZE, SIZE, 3), **args)


def batch(seed=0):
    rng = np.random.RandomState(seed)
    labeled = {"image": tf.constant(rng.uniform(-1, 1, (B, SIZE, SIZE, 3)), tf.float32),
               "label": tf.constant(rng.randint(0, NCLASS, B), tf.int64)}
    unlabeled = {"image": tf.constant(rng.uniform(-1, 1, (B, 2, SIZE, SIZE, 3)), tf.float32)}
    return labeled, unlabeled


def values(variables):
    return [v.numpy().copy() for v in variables]


def clone_net(model):
    return clone_network(model.net, model.image_shape)


def reference_step(model, data):
    """RealMix losses and the chunk-0 BN statistics computed independently: separate passes of a
    cloned network, numpy for the label guess, MixUp, interleave and losses (tsa none, gamma 0)."""
    labeled, unlabeled = data
    x, labels, u = labeled["image"].numpy(), labeled["label"].numpy(), unlabeled["image"].numpy()
    step = int(model.step.numpy())
    lam_seed, perm_seed = model.step_seeds(tf.constant(step, tf.int64))
    lam = ops.sample_mixup_lambda(3 * B, model.beta, lam_seed).numpy()
    index = ops.sample_permutation(3 * B, perm_seed).numpy()
    ref = clone_net(model)
    probs = [softmax(ref(u[:, k], training=True, update_bn_stats=False).numpy()) for k in (0, 1)]
    p = ((probs[0] + probs[1]) / 2) ** 2
    guess = p / p.sum(-1, keepdims=True)
    inputs = np.concatenate([x, u[:, 0], u[:, 1]])
    targets = np.concatenate([np.eye(NCLASS)[labels], guess, guess])
    lam = np.maximum(lam, 1 - lam)
    mixed = inputs * lam[:, None, None, None] + inputs[index] * (1 - lam[:, None, None, None])
    mixed_targets = targets * lam[:, None] + targets[index] * (1 - lam[:, None])
    # Interleave with B = 8: groups [2, 3, 3] -> offsets [0, 2, 5, 8].
    a, b, c = mixed[:B], mixed[B:2 * B], mixed[2 * B:]
    chunk0 = np.concatenate([a[:2], b[2:5], c[5:]])
    chunk1 = np.concatenate([b[:2], a[2:5], b[5:]])
    chunk2 = np.concatenate([c[:2], c[2:5], a[5:]])
    z0 = ref(chunk0, training=True, update_bn_stats=True).numpy()       # only chunk 0 updates
    z1 = ref(chunk1, training=True, update_bn_stats=False).numpy()
    z2 = ref(chunk2, training=True, update_bn_stats=False).numpy()
    logits_x = np.concatenate([z0[:2], z1[2:5], z2[5:]])
    logits_u = np.concatenate([np.concatenate([z1[:2], z0[2:5], z1[5:]]),
                               np.concatenate([z2[:2], z2[2:5], z0[5:]])])
    log_p = np.log(softmax(logits_x))
    xe = -(mixed_targets[:B] * log_p).sum(-1).mean()
    l2u = ((mixed_targets[B:] - softmax(logits_u)) ** 2).mean()
    return {"xe": xe, "l2u": l2u, "bn": values(ref.non_trainable_variables)}


@pytest.fixture(scope="module")
def data():
    return batch(0)


# ---------------------------------------------------------------------------------------------
# SSLModel: Adam, weight decay, EMA

def test_ema_update_value():
    model = SSLModel(NCLASS, (SIZE, SIZE, 3), **TINY)
    zeros = [tf.zeros_like(v) for v in model.net.trainable_variables]
    for v in model.net.trainable_variables:
        v.assign(tf.zeros_like(v))
    for s in model.ema_net.trainable_variables:
        s.assign(tf.ones_like(s))
    for _ in range(3):
        model.apply_update(zeros)            # Adam with a zero gradient leaves the zeros
    for s in model.ema_net.trainable_variables:
        np.testing.assert_allclose(s.numpy(), 0.997003, rtol=1e-6)   # 0.999 ** 3


def test_weight_decay_on_kernels_only_after_adam_then_ema():
    model = SSLModel(NCLASS, (SIZE, SIZE, 3), lr=0.1, wd=0.5, **TINY)
    for v in model.net.trainable_variables + model.ema_net.trainable_variables:
        v.assign(tf.ones_like(v))
    model.apply_update([tf.zeros_like(v) for v in model.net.trainable_variables])
    kernels = {id(k) for k in model.net.kernels()}
    for v, s in zip(model.net.trainable_variables, model.ema_net.trainable_variables):
        if id(v) in kernels:
            np.testing.assert_allclose(v.numpy(), 0.95, rtol=1e-6)   # 1 - wd * lr
            np.testing.assert_allclose(s.numpy(), 1 - 0.001 * 0.05, rtol=1e-6)  # EMA saw 0.95
        else:                                                         # biases, BN gamma/beta
            np.testing.assert_array_equal(v.numpy(), 1.0)
            np.testing.assert_array_equal(s.numpy(), 1.0)


def test_adam_first_step_and_epsilon():
    model = SSLModel(NCLASS, (SIZE, SIZE, 3), wd=0.0, **TINY)
    assert model.optimizer.epsilon == 1e-8 and model.optimizer.learning_rate.numpy() == \
        pytest.approx(0.002)
    before = values(model.net.trainable_variables)
    grads = [tf.fill(v.shape, 3.0) for v in model.net.trainable_variables]
    model.apply_update(grads)
    # First TF1/Keras Adam step: lr * sqrt(1 - b2) / (1 - b1) * m / sqrt(v) = lr * sign(g).
    for b, v in zip(before, model.net.trainable_variables):
        np.testing.assert_allclose(v.numpy(), b - 0.002, atol=1e-6)


def test_shadows_start_at_initial_weights_and_bn_stats_are_copied():
    model = make()
    for s, v in zip(model.ema_net.weights, model.net.weights):
        np.testing.assert_array_equal(s.numpy(), v.numpy())
    assert len(model.ema_net.trainable_variables) == len(model.net.trainable_variables)


# ---------------------------------------------------------------------------------------------
# RealMix step

@pytest.mark.parametrize("batched_passes", [True, False])
def test_step_matches_reference_and_only_chunk_0_moves_bn_stats(data, batched_passes):
    model = make(batched_passes=batched_passes, wd=0.0)
    step = tf.function(model.train_step)
    step(data)                                # step 0: move the weights away from the init
    bn_before = values(model.net.non_trainable_variables)
    expected = reference_step(model, data)
    out = step(data)
    assert out["losses/xe"].numpy() == pytest.approx(expected["xe"], rel=1e-4)
    assert out["losses/l2u"].numpy() == pytest.approx(expected["l2u"], rel=1e-3)
    assert out["losses/overall"].numpy() == pytest.approx(
        expected["xe"] + 10.0 * expected["l2u"], rel=1e-4)
    bn_after = values(model.net.non_trainable_variables)
    for got, want, old in zip(bn_after, expected["bn"], bn_before):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, old, rtol=0, atol=1e-7)    # chunk 0 did update them
    # The EMA model's BN statistics are the live ones.
    for s, v in zip(model.ema_net.non_trainable_variables, model.net.non_trainable_variables):
        np.testing.assert_array_equal(s.numpy(), v.numpy())


def test_ema_model_matches_hand_computed_update_and_differs_from_raw(data):
    model = make()
    step = tf.function(model.train_step)
    shadow = values(model.net.trainable_variables)      # shadows start at the initial weights
    for _ in range(3):
        step(data)
        shadow = [0.999 * s + 0.001 * v.numpy() for s, v in zip(shadow,
                                                                 model.net.trainable_variables)]
    for s, e in zip(shadow, model.ema_net.trainable_variables):
        np.testing.assert_allclose(e.numpy(), s, rtol=1e-5, atol=1e-7)
    images = data[0]["image"]
    raw, ema = model.classify(images, ema=False).numpy(), model.classify(images).numpy()
    assert raw.dtype == np.float32 and ema.shape == (B, NCLASS)
    np.testing.assert_allclose(ema.sum(-1), 1.0, rtol=1e-5)
    assert not np.allclose(raw, ema, atol=1e-4)
    # EMA prediction = the shadow weights with the live BN statistics, inference mode.
    ref = clone_net(model)
    for r, s in zip(ref.trainable_variables, model.ema_net.trainable_variables):
        r.assign(s)
    np.testing.assert_allclose(ema, tf.nn.softmax(ref(images)).numpy(), rtol=1e-4, atol=1e-6)


def test_few_steps_reduce_the_loss(data):
    model = make(lr=0.01, w_match=1.0)
    step = tf.function(model.train_step)
    losses = [float(step(data)["losses/overall"]) for _ in range(25)]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert int(model.step.numpy()) == 25 * B                 # the step counts images


def test_same_seed_and_step_give_the_same_step_and_seed_matters(data):
    runs = [tf.function(make(seed=s).train_step)(data)["losses/overall"].numpy()
            for s in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_schedules_tsa_and_ood_monitors(data):
    model = make(tsa="linear", gamma=0.5, train_kimg=1, warmup_kimg=1, w_match=75.0)
    step = tf.function(model.train_step)
    step(data)
    step(data)
    out = {k: float(v) for k, v in step(data).items()}       # read at step = 16 images
    assert out["monitors/w_match"] == pytest.approx(75 * 16 / 1024)
    assert out["monitors/tsa_threshold"] == pytest.approx(0.25 + 0.75 * 16 / 1024)
    assert 0.0 <= out["monitors/tsa_kept"] <= 1.0
    # 2B = 16 unlabeled rows, gamma 0.5: keep those above the 8th smallest -> 7 of 16.
    assert out["monitors/mask_ratio"] == pytest.approx(7 / 16)
    assert out["monitors/confidence_min"] <= out["monitors/mask_threshold"] \
        <= out["monitors/confidence_max"]
    assert set(out) >= {"losses/xe", "losses/l2u", "monitors/confidence_mean"}


def test_bfloat16_close_to_float32(data):
    out32 = tf.function(make().train_step)(data)
    out16 = tf.function(make(precision="mixed_bfloat16").train_step)(data)
    assert out16["losses/xe"].dtype == tf.float32
    for tag in ("losses/xe", "losses/overall"):
        assert float(out16[tag]) == pytest.approx(float(out32[tag]), rel=2e-2)


def test_jit_compile_gives_the_same_losses(data):
    eager = tf.function(make().train_step)
    jit = tf.function(make(jit_compile=True).train_step)
    for _ in range(2):
        a, b = eager(data), jit(data)
        for tag in ("losses/xe", "losses/l2u"):
            assert float(b[tag]) == pytest.approx(float(a[tag]), rel=1e-4)


@pytest.mark.parametrize("kwargs", [dict(tsa="cosine"), dict(gamma=1.0), dict(gamma=-0.1),
                                    dict(tsa_source="probs"), dict(precision="float8"),
                                    dict(beta=0.0), dict(ema=1.0)])
def test_bad_hyper_parameters_raise_user_error(kwargs):
    with pytest.raises(UserError):
        make(**kwargs)


def test_dynamic_batch_is_refused():
    model = make()
    step = tf.function(model.train_step, input_signature=[(
        {"image": tf.TensorSpec([None, SIZE, SIZE, 3]), "label": tf.TensorSpec([None], tf.int64)},
        {"image": tf.TensorSpec([None, 2, SIZE, SIZE, 3])})])
    with pytest.raises(ValueError, match="drop_remainder"):
        step.get_concrete_function()


MIRRORED_SCRIPT = """
for mode in ("per_replica", "global"):
    with strategy.scope():
        model = RealMix(4, (8, 8, 3), filters=4, repeat=1, warmup_kimg=0, gamma=0.5, tsa="linear",
                        replica_mode=mode)
    batches = iter(strategy.experimental_distribute_dataset(data))
    step = tf.function(lambda d: strategy.run(model.train_step, args=(d,)))
    for _ in range(2):
        out = step(next(batches))
    kernel = model.net.trainable_variables[0].value.values
    shadow = model.ema_net.trainable_variables[0].value.values
    bn = model.net.final_bn.moving_mean.value.values
    print("RESULT", int(model.step.numpy()), float(out["losses/xe"].values[0]),
          np.array_equal(kernel[0].numpy(), kernel[1].numpy()),
          np.array_equal(shadow[0].numpy(), shadow[1].numpy()),
          np.array_equal(bn[0].numpy(), bn[1].numpy()))
"""


def test_two_replica_mirrored_strategy(tmp_path):
    """Gradients summed over replicas, weights/EMA equal on both, the step counts the global
    batch (2 steps x 8 images); BN moving statistics per replica with --replica_mode=per_replica,
    the same on both (cross-replica batch statistics) by default."""
    stdout = run_script(toy_mirrored(8) + MIRRORED_SCRIPT)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT")]
    assert len(lines) == 2, stdout
    for line, bn_expected in zip(lines, ("False", "True")):
        _, images, xe, kernels_equal, shadows_equal, bn_equal = line.split()
        assert int(images) == 16 and np.isfinite(float(xe))
        assert kernels_equal == "True" and shadows_equal == "True"
        assert bn_equal == bn_expected    # per_replica: each replica normalised its own half
