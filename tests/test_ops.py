"""libml.nn.ops against the worked values of the spec (section 12), in eager, tf.function and XLA."""
import numpy as np
import pytest
import tensorflow as tf

from libml.nn import ops as layers

MODES = ["eager", "function", "jit"]


def run(mode, fn, *args):
    """fn(*args) eagerly, traced by tf.function, or XLA-compiled; numpy results."""
    args = [tf.convert_to_tensor(a) for a in args]
    if mode == "function":
        fn = tf.function(fn)
    elif mode == "jit":
        fn = tf.function(fn, jit_compile=True)
    return tf.nest.map_structure(lambda t: t.numpy(), fn(*args))


def f32(x):
    return np.asarray(x, np.float32)


# ---------------------------------------------------------------------------------------- 12.1

@pytest.mark.parametrize("mode", MODES)
def test_sharpen_worked_value(mode):
    out = run(mode, lambda p: layers.sharpen(p, 0.5), f32([[0.2, 0.3, 0.5], [0.25, 0.25, 0.5]]))
    np.testing.assert_allclose(out[0], [0.105263, 0.236842, 0.657895], atol=1e-6)
    np.testing.assert_allclose(out[1], [1 / 6, 1 / 6, 4 / 6], atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sharpen_keeps_uniform_and_t1_is_identity(temperature):
    np.testing.assert_allclose(layers.sharpen(f32([[0.25] * 4]), temperature).numpy(), [[0.25] * 4], atol=1e-7)
    p = f32([[0.1, 0.6, 0.3]])
    np.testing.assert_allclose(layers.sharpen(p, 1.0).numpy(), p, atol=1e-7)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_sharpen_rejects_non_positive_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        layers.sharpen(f32([[0.5, 0.5]]), temperature)


@pytest.mark.parametrize("mode", MODES)
def test_guess_label_averages_views_then_sharpens(mode):
    # softmax(log p) == p, so the views predict exactly these distributions.
    view1 = np.log(f32([[0.2, 0.3, 0.5]]))
    view2 = np.log(f32([[0.4, 0.4, 0.2]]))
    out = run(mode, lambda a, b: layers.guess_label([a, b], 0.5), view1, view2)
    np.testing.assert_allclose(out, [[0.268657, 0.365672, 0.365672]], atol=1e-6)


def test_guess_label_stops_the_gradient():
    logits = tf.Variable([[1.0, 2.0, 0.5]])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layers.guess_label([logits, logits * 2], 0.5))
    assert tape.gradient(loss, logits) is None


# ---------------------------------------------------------------------------------------- 12.2

@pytest.mark.parametrize("mode", MODES)
def test_mixup_worked_value_and_images(mode, rng):
    labels = f32([[1, 0, 0], [0.2, 0.3, 0.5]])
    images = rng.uniform(-1, 1, size=(2, 4, 4, 3)).astype(np.float32)
    lam = f32([0.3, 0.6])  # max(lam, 1 - lam) = [0.7, 0.6]
    index = np.int32([1, 0])
    x_mix, y_mix = run(mode, layers.mixup, images, labels, lam, index)
    np.testing.assert_allclose(y_mix[0], [0.76, 0.09, 0.15], atol=1e-6)
    np.testing.assert_allclose(y_mix[1], [0.52, 0.18, 0.30], atol=1e-6)
    np.testing.assert_allclose(x_mix[0], 0.7 * images[0] + 0.3 * images[1], atol=1e-6)
    np.testing.assert_allclose(x_mix[1], 0.6 * images[1] + 0.4 * images[0], atol=1e-6)


def test_mixup_dynamic_batch_and_dtype(rng):
    fn = tf.function(layers.mixup, input_signature=[
        tf.TensorSpec([None, 2, 2, 1], tf.bfloat16), tf.TensorSpec([None, 3], tf.float32),
        tf.TensorSpec([None], tf.float32), tf.TensorSpec([None], tf.int32)])
    for n in (3, 7):
        x = rng.uniform(-1, 1, (n, 2, 2, 1)).astype(np.float32)
        lam = rng.uniform(0, 1, n).astype(np.float32)
        index = rng.permutation(n).astype(np.int32)
        labels = np.eye(3, dtype=np.float32)[rng.randint(0, 3, n)]
        x_mix, y_mix = fn(tf.cast(x, tf.bfloat16), labels, lam, index)
        assert x_mix.dtype == tf.bfloat16 and y_mix.dtype == tf.float32
        w = np.maximum(lam, 1 - lam)
        np.testing.assert_allclose(y_mix.numpy(), w[:, None] * labels + (1 - w[:, None]) * labels[index], atol=1e-6)
        np.testing.assert_allclose(x_mix.numpy().astype(np.float32),
                                   w[:, None, None, None] * x + (1 - w[:, None, None, None]) * x[index], atol=2e-2)


@pytest.mark.parametrize("mode", MODES)
def test_soft_cross_entropy_worked_value(mode):
    out = run(mode, layers.soft_cross_entropy, f32([[0.76, 0.09, 0.15]]), f32([[2, 1, -1]]))
    np.testing.assert_allclose(out, [0.889012], atol=1e-6)


# ---------------------------------------------------------------------------------------- 12.3

@pytest.mark.parametrize("mode", MODES)
def test_l2_loss_and_total_worked_values(mode):
    labels_y = f32([[0.76, 0.09, 0.15], [0.1, 0.2, 0.7]])
    logits_y = f32([[2, 1, -1], [0, 0, 1]])

    def total(labels_x, logits_x, labels_y, logits_y):
        sq_err = layers.l2_consistency(labels_y, logits_y)
        l2u = tf.reduce_mean(sq_err)
        xe = tf.reduce_mean(layers.soft_cross_entropy(labels_x, logits_x))
        w = layers.unlabeled_weight(tf.constant(1 << 20, tf.int64), 75.0, 1024 << 10)
        return l2u, xe + w * l2u, layers.masked_l2_mean(sq_err, tf.ones([2]), 3)

    l2u, loss, all_kept = run(mode, total, f32([[0.76, 0.09, 0.15]]), f32([[2, 1, -1]]), labels_y, logits_y)
    np.testing.assert_allclose(l2u, 0.012155, atol=1e-6)
    np.testing.assert_allclose(loss, 1.800638, atol=2e-5)
    np.testing.assert_allclose(all_kept, l2u, rtol=1e-6)  # all-ones mask == plain mean


@pytest.mark.parametrize("mode", MODES)
def test_masked_means(mode):
    sq_err = f32([[0.04, 0.01, 0.01], [0.04, 0.04, 0.16]])
    out = run(mode, lambda e, m: (layers.masked_l2_mean(e, m, 3), layers.masked_mean(tf.reduce_sum(e, 1), m)),
              sq_err, f32([1, 0]))
    np.testing.assert_allclose(out, [0.02, 0.06], atol=1e-7)
    nothing_kept = layers.masked_l2_mean(sq_err, f32([0, 0]), 3), layers.masked_mean(f32([1.0, 2.0]), f32([0, 0]))
    assert [float(v) for v in nothing_kept] == [0.0, 0.0]
    np.testing.assert_allclose(layers.masked_l2_mean(sq_err, f32([1, 1]), 3).numpy(), 0.05, atol=1e-7)


# ---------------------------------------------------------------------------------------- 12.4

TSA_TABLE = [
    (10, "linear", [0.1, 0.325, 0.55, 0.775, 1.0]),
    (10, "exp", [0.106064, 0.121166, 0.173876, 0.357854, 1.0]),
    (10, "log", [0.1, 0.742146, 0.926124, 0.978834, 0.993936]),
    (6, "linear", [0.166667, 0.375, 0.583333, 0.791667, 1.0]),
    (6, "exp", [0.172282, 0.186265, 0.235071, 0.405421, 1.0]),
    (6, "log", [0.166667, 0.761246, 0.931596, 0.980402, 0.994385]),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("nclass,schedule,expected", TSA_TABLE)
def test_tsa_threshold_table(mode, nclass, schedule, expected):
    progress = f32([0, 0.25, 0.5, 0.75, 1.0])
    out = run(mode, lambda r: layers.tsa_threshold(schedule, r, nclass), progress)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_tsa_progress_from_images():
    assert float(layers.tsa_progress(33554432, 65536 * 1024)) == 0.5
    assert float(layers.tsa_progress(2 * 65536 * 1024, 65536 * 1024)) == 1.0
    assert float(layers.tsa_progress(2 * 1024, 1024, clip=False)) == 2.0


@pytest.mark.parametrize("schedule,nclass", [("none", 10), ("sigmoid", 10), ("linear", 0), ("linear", 2.5)])
def test_tsa_threshold_rejects_bad_arguments(schedule, nclass):
    with pytest.raises(ValueError):
        layers.tsa_threshold(schedule, 0.5, nclass)


# ---------------------------------------------------------------------------------------- 12.5

TSA_LOGITS = f32([[2, 1, -1], [-0.5, -1, -2], [0.2, 3, 0.1]])
TSA_LABELS = f32([[0.7, 0.3, 0], [1, 0, 0], [0, 0.9, 0.1]])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("source,mask,loss", [("logits", [1, 0, 1], 0.524307), ("labels", [0, 1, 1], 0.501866)])
def test_tsa_mask_worked_values(mode, source, mask, loss):
    def masked_xe(logits, labels, progress):
        threshold = layers.tsa_threshold("linear", progress, 3)
        keep = layers.tsa_mask(logits, labels, threshold, source=source)
        return keep, layers.masked_mean(layers.soft_cross_entropy(labels, logits), keep), threshold

    keep, avg, threshold = run(mode, masked_xe, TSA_LOGITS, TSA_LABELS, f32(0.5))
    np.testing.assert_allclose(threshold, 2 / 3, atol=1e-7)
    np.testing.assert_array_equal(keep, mask)
    np.testing.assert_allclose(avg, loss, atol=1e-6)


def test_tsa_mask_released_rule_consequences():
    confident_negative = f32([[-0.1, -5.0, -6.0]])  # p(y*) ~ 0.99 yet all logits <= 0
    unsure_positive = f32([[0.1, 0.2, 0.3]])       # positive logit on a non-label class
    one_hot = f32([[1, 0, 0]])
    for logits, released, intended in [(confident_negative, 0, 0), (unsure_positive, 1, 1)]:
        assert float(layers.tsa_mask(logits, one_hot, 0.5, source="logits")[0]) == released
        assert float(layers.tsa_mask(logits, one_hot, 0.5, source="labels")[0]) == intended
    # Released rule drops even an unsure example whose logits are all negative.
    unsure_negative = f32([[-1.0, -1.0, -1.0]])
    assert float(layers.tsa_mask(unsure_negative, one_hot, 0.5, source="logits")[0]) == 0
    assert float(layers.tsa_mask(unsure_negative, one_hot, 0.5, source="labels")[0]) == 1


def test_tsa_mask_dynamic_batch_and_half_precision(rng):
    fn = tf.function(lambda z, y, t: layers.tsa_mask(z, y, t), input_signature=[
        tf.TensorSpec([None, 4], tf.float16), tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([], tf.float32)])
    for n in (2, 9):
        logits = rng.normal(size=(n, 4)).astype(np.float32)
        labels = np.eye(4, dtype=np.float32)[rng.randint(0, 4, n)]
        mask = fn(tf.cast(logits, tf.float16), labels, 0.4)
        assert mask.dtype == tf.float32
        p = tf.nn.softmax(tf.cast(tf.cast(logits, tf.float16), tf.float32)).numpy()
        np.testing.assert_array_equal(mask.numpy(), (p[labels > 0] < 0.4).astype(np.float32))


def test_tsa_mask_rejects_unknown_source():
    with pytest.raises(ValueError, match="TSA source"):
        layers.tsa_mask(TSA_LOGITS, TSA_LABELS, 0.5, source="probs")


# ---------------------------------------------------------------------------------------- 12.6

CONFIDENCE = f32([0.9, 0.35, 0.6, 0.2, 0.75, 0.5, 0.95, 0.4, 0.3, 0.8])


def probs_with_confidence(confidence, nclass=10):
    """Rows whose max is `confidence` (>= 1/nclass), the rest spread evenly."""
    confidence = f32(confidence)
    rest = (1 - confidence) / (nclass - 1)
    probs = np.repeat(rest[:, None], nclass, axis=1)
    probs[:, 0] = confidence
    return probs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gamma,threshold,mask", [
    (0.2, 0.35, [1, 0, 1, 0, 1, 1, 1, 1, 0, 1]),
    (0.4, 0.5, [1, 0, 1, 0, 1, 0, 1, 0, 0, 1]),
    (0.6, 0.75, [1, 0, 0, 0, 0, 0, 1, 0, 0, 1]),
    (0.85, 0.9, [0, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
    (0.0, 0.0, [1] * 10),
])
def test_ood_mask_worked_values(mode, gamma, threshold, mask):
    out_mask, out_threshold = run(mode, lambda p: layers.ood_mask(p, gamma, return_threshold=True),
                                  probs_with_confidence(CONFIDENCE))
    np.testing.assert_array_equal(out_mask, mask)
    np.testing.assert_allclose(out_threshold, threshold, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_ood_mask_two_examples_half_masks_both(mode):
    def masked_loss(probs, sq_err):
        mask = layers.ood_mask(probs, 0.5)
        return mask, layers.masked_l2_mean(sq_err, mask, 10)

    mask, loss = run(mode, masked_loss, probs_with_confidence([0.3, 0.8]), np.full((2, 10), 0.1, np.float32))
    np.testing.assert_array_equal(mask, [0, 0])
    assert loss == 0.0


def test_ood_mask_ties_at_threshold_are_masked():
    mask = layers.ood_mask(probs_with_confidence([0.5, 0.5, 0.5, 0.9]), 0.25)  # index 1 -> threshold 0.5
    np.testing.assert_array_equal(mask.numpy(), [0, 0, 0, 1])


@pytest.mark.parametrize("gamma,kept", [(0.2, 102), (0.4, 76), (0.6, 51), (0.85, 19)])
def test_ood_mask_kept_counts_dynamic_batch(gamma, kept, rng):
    fn = tf.function(lambda p: layers.ood_mask(p, gamma), input_signature=[tf.TensorSpec([None, 10], tf.float32)])
    assert int(tf.reduce_sum(fn(probs_with_confidence(rng.permutation(128) / 200 + 0.2)))) == kept
    assert int(tf.reduce_sum(fn(probs_with_confidence(CONFIDENCE)))) == {0.2: 7, 0.4: 5, 0.6: 3, 0.85: 1}[gamma]


@pytest.mark.parametrize("gamma", [1.0, 1.5, -0.1, "0.5"])
def test_ood_mask_rejects_gamma_outside_unit_interval(gamma):
    with pytest.raises(ValueError, match=r"gamma must be a float in \[0, 1\)"):
        layers.ood_mask(probs_with_confidence(CONFIDENCE), gamma)


# ---------------------------------------------------------------------------------------- 12.7

@pytest.mark.parametrize("batch,nu,offsets", [
    (64, 2, [0, 21, 42, 64]), (5, 2, [0, 1, 3, 5]), (100, 2, [0, 33, 66, 100]), (64, 1, [0, 32, 64])])
def test_interleave_offsets(batch, nu, offsets):
    assert layers.interleave_offsets(batch, nu) == offsets


@pytest.mark.parametrize("mode", MODES)
def test_interleave_worked_example_and_involution(mode):
    x, u, v = (np.arange(5, dtype=np.float32) + base for base in (0, 100, 200))  # x0..x4, u0..u4, v0..v4
    batches = run(mode, lambda a, b, c: layers.interleave([a, b, c], 5), x, u, v)
    np.testing.assert_array_equal(batches[0], [0, 101, 102, 203, 204])
    np.testing.assert_array_equal(batches[1], [100, 1, 2, 103, 104])
    np.testing.assert_array_equal(batches[2], [200, 201, 202, 3, 4])
    restored = run(mode, lambda a, b, c: layers.interleave([a, b, c], 5), *batches)
    for got, want in zip(restored, (x, u, v)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("batch,nu", [(64, 2), (7, 3), (4, 1), (3, 0)])
def test_interleave_is_an_involution(batch, nu, rng):
    xy = [rng.normal(size=(batch, 2, 3)).astype(np.float32) for _ in range(nu + 1)]
    twice = layers.interleave(layers.interleave(xy, batch), batch)
    for got, want in zip(twice, xy):
        np.testing.assert_array_equal(got.numpy(), want)


def test_interleave_rejects_wrong_row_count():
    with pytest.raises(ValueError, match="exactly batch=4 rows"):
        layers.interleave([np.zeros((4, 2), np.float32), np.zeros((3, 2), np.float32)], 4)


# ---------------------------------------------------------------------------------------- 12.8

@pytest.mark.parametrize("mode", MODES)
def test_unlabeled_weight_ramp(mode):
    steps = np.int64([0, 524288, 1 << 20, 1 << 26])
    out = run(mode, lambda s: layers.unlabeled_weight(s, 75.0, 1024 << 10), steps)
    np.testing.assert_allclose(out, [0.0, 37.5, 75.0, 75.0])
    assert float(layers.unlabeled_weight(0, 75.0, 0)) == 75.0


# ---------------------------------------------------------------------------------------- samplers

def test_sample_mixup_lambda_reproducible_and_beta_distributed():
    seed = tf.constant([3, 7], tf.int64)
    lam = layers.sample_mixup_lambda(20000, 0.75, seed).numpy()
    np.testing.assert_array_equal(lam, layers.sample_mixup_lambda(20000, 0.75, seed).numpy())
    assert not np.array_equal(lam[:100], layers.sample_mixup_lambda(100, 0.75, tf.constant([3, 8], tf.int64)).numpy())
    assert lam.min() >= 0 and lam.max() <= 1
    assert abs(lam.mean() - 0.5) < 0.01
    # E[max(lam, 1 - lam)] for Beta(0.75, 0.75) is about 0.778 (spec 6.3).
    assert abs(np.maximum(lam, 1 - lam).mean() - 0.778) < 0.01
    traced = tf.function(lambda s: layers.sample_mixup_lambda(20000, 0.75, s))(seed).numpy()
    np.testing.assert_array_equal(traced, lam)


def test_sample_mixup_lambda_rejects_bad_alpha():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        layers.sample_mixup_lambda(4, 0.0, tf.constant([0, 0], tf.int64))


@pytest.mark.parametrize("mode", MODES)
def test_sample_permutation(mode):
    seed = np.int64([5, 1])
    perm = run(mode, lambda s: layers.sample_permutation(192, s), seed)
    np.testing.assert_array_equal(np.sort(perm), np.arange(192))
    assert not np.array_equal(perm, np.arange(192))
    np.testing.assert_array_equal(perm, layers.sample_permutation(192, tf.constant(seed)).numpy())
