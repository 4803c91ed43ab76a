"""OpenMatch (realmix_tf/openmatch.py): each loss term against an independent numpy computation
of OP_Match's formulas on small fixed logits (the OVA loss with its hardest negative, SOCR, OEM,
the outlier score and the inlier selection, the start_fix gate), the whole step's loss against
numpy on the network's own outputs, and the one-vs-all head trained, averaged and checkpointed."""
import numpy as np
import pytest
import tensorflow as tf

from libml.run.checkpoints import model_variables
from realmix_tf import openmatch as om

K = 3
EPS = 1e-8


def np_probs(logits_open):
    """OP_Match: view(N, 2, K), softmax over dim 1 (written here without TensorFlow)."""
    z = np.asarray(logits_open, np.float64).reshape(len(logits_open), 2, K)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_ova_loss(logits_open, labels):
    p = np_probs(logits_open)
    pos = [-np.log(p[n, 1, y] + EPS) for n, y in enumerate(labels)]
    neg = [max(-np.log(p[n, 0, k] + EPS) for k in range(K) if k != y) for n, y in enumerate(labels)]
    return np.array(pos), np.array(neg)


def np_entropy(logits_open):
    p = np_probs(logits_open)
    return np.mean(np.sum(-p * np.log(p + EPS), axis=1), axis=1)


def np_socr(a, b):
    return np.sum((np_probs(a) - np_probs(b)) ** 2, axis=(1, 2))


def np_outlier(logits, logits_open):
    p = np_probs(logits_open)
    return np.array([1.0 - p[n, 1, int(np.argmax(row))] for n, row in enumerate(logits)])


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


# Row 0 worked by hand: outlier logits 0, inlier logits [0, ln 3, -ln 3] -> p_in = [1/2, 3/4,
# 1/4], p_out = [1/2, 1/4, 3/4]. Label 0: positive -ln(1/2); hardest negative = max(-ln 1/4,
# -ln 3/4) = ln 4 (not their sum).
OPEN = np.float32([[0, 0, 0, 0, np.log(3), -np.log(3)],
                   [1.5, -0.5, 0.2, -1.0, 2.0, 0.3],
                   [-2.0, 0.7, 1.1, 0.4, -0.3, -1.2]])
OPEN_2 = np.float32([[0.3, -0.1, 0.0, 0.2, 0.9, -1.0],
                     [1.0, 0.5, -0.2, -0.4, 1.0, 0.8],
                     [-1.0, 0.0, 2.0, 1.0, -0.5, -0.7]])
LABELS = np.int64([0, 2, 1])
CLOSED = np.float32([[2.0, 0.1, -1.0], [0.0, 0.5, 0.4], [-0.3, -0.2, 1.5]])


def test_ova_loss_positive_and_hardest_negative():
    pos, neg = (t.numpy() for t in om.ova_loss_terms(OPEN, LABELS, K))
    np.testing.assert_allclose(pos[0], np.log(2), rtol=1e-6)
    np.testing.assert_allclose(neg[0], np.log(4), rtol=1e-6)
    ref_pos, ref_neg = np_ova_loss(OPEN, LABELS)
    np.testing.assert_allclose(pos, ref_pos, rtol=1e-5)
    np.testing.assert_allclose(neg, ref_neg, rtol=1e-5)


def test_entropy_and_soft_consistency():
    np.testing.assert_allclose(om.ova_entropy(OPEN, K).numpy(), np_entropy(OPEN), rtol=1e-5)
    # Row 0 of OPEN: entropies ln 2, H(1/4) twice -> their mean.
    h = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    np.testing.assert_allclose(om.ova_entropy(OPEN, K).numpy()[0], (np.log(2) + 2 * h) / 3,
                               rtol=1e-5)
    np.testing.assert_allclose(om.soft_consistency(OPEN, OPEN_2, K).numpy(),
                               np_socr(OPEN, OPEN_2), rtol=1e-5)
    np.testing.assert_allclose(om.soft_consistency(OPEN, OPEN, K).numpy(), 0.0, atol=1e-7)


def test_outlier_score_and_inlier_selection():
    scores = om.outlier_scores(CLOSED, OPEN, K).numpy()
    np.testing.assert_allclose(scores, np_outlier(CLOSED, OPEN), rtol=1e-5)
    np.testing.assert_allclose(scores[0], 0.5, rtol=1e-6)      # class 0 predicted, p_in = 1/2
    # Predicted class 1 -> p_in(1) of row 1 = sigmoid(2.0 - (-0.5)).
    np.testing.assert_allclose(scores[1], 1 - 1 / (1 + np.exp(-2.5)), rtol=1e-5)
    # Inliers: score strictly below 0.5 (row 0 sits at 0.5: an outlier, as O:exclude_dataset).
    np.testing.assert_array_equal(om.inlier_mask(CLOSED, OPEN, K).numpy(),
                                  (np_outlier(CLOSED, OPEN) < 0.5).astype("f4"))
    assert om.inlier_mask(CLOSED, OPEN, K).numpy()[0] == 0.0


def test_start_fix_gate_in_images():
    assert float(om.fix_gate(640 * 1024 - 1, 640)) == 0.0
    assert float(om.fix_gate(640 * 1024, 640)) == 1.0
    assert float(om.fix_gate(511, 0.5)) == 0.0 and float(om.fix_gate(512, 0.5)) == 1.0
    assert om.OpenMatch.hparam_defaults()["start_fix_kimg"] == 640   # 10 epochs x 64 kimg


# ---------------------------------------------------------------------------------------------
# The whole step on a tiny network

B, SIZE = 4, 8


def tiny_model(**hparams):
    return om.OpenMatch(K, (SIZE, SIZE, 3), filters=4, repeat=1, lr=0.01, seed=3, **hparams)


def batch():
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (B, SIZE, SIZE, 3)).astype("f4")
    y = rng.randint(0, K, B).astype("i8")
    u = rng.uniform(-1, 1, (2 * B, 3, SIZE, SIZE, 3)).astype("f4")
    return {"image": tf.constant(x), "label": tf.constant(y)}, {"image": tf.constant(u)}


def np_step_loss(model, labeled, unlabeled, gate):
    """The step's loss in numpy from the network's outputs: the training pass (features and
    closed-set logits), the heads applied in numpy, the EMA model's inference pass on weak1."""
    x, y = labeled["image"].numpy(), labeled["label"].numpy()
    u = unlabeled["image"].numpy()
    rows = np.concatenate([x, u[:, 0], u[:, 1], u[:, 2]])
    pooled, logits = (t.numpy().astype(np.float64) for t in model.net.features_and_logits(
        tf.constant(rows), training=True, update_bn_stats=False))
    opened = pooled @ model.ova_head.kernel.numpy()
    n = 2 * B
    lx, lw, ls = logits[:B], logits[B:B + n], logits[B + 2 * n:]
    ox, o1, o2 = opened[:B], opened[B:B + n], opened[B + n:B + 2 * n]
    xe = -np.mean(np_log_softmax(lx)[np.arange(B), y])
    pos, neg = np_ova_loss(ox, y)
    oem = 0.5 * (np_entropy(o1).mean() + np_entropy(o2).mean())
    socr = np_socr(o1, o2).mean()
    e_pooled, e_logits = (t.numpy() for t in model.ema_net.features_and_logits(
        tf.constant(u[:, 0]), training=False))
    inliers = np_outlier(e_logits, e_pooled @ model.ema_ova_head.kernel.numpy()) < 0.5
    probs = np.exp(np_log_softmax(lw / model.temperature))
    confident = probs.max(axis=1) >= model.threshold
    ce = -np_log_softmax(ls)[np.arange(n), probs.argmax(axis=1)]
    fix = gate * np.sum(ce * confident * inliers) / max(inliers.sum(), 1)
    return xe + pos.mean() + neg.mean() + 0.1 * oem + 0.5 * socr + fix, fix, inliers


@pytest.mark.parametrize("start_fix_kimg, gate", [(0, 1.0), (640, 0.0)])
def test_step_loss_matches_numpy(start_fix_kimg, gate):
    model = tiny_model(start_fix_kimg=start_fix_kimg, threshold=0.4, temperature=0.5)
    # The EMA head calls an image an inlier where pooled feature 2 is > 0 (a mix on this batch;
    # at initialisation every score is ~0.6); the live head differs: the inliers must come
    # from the EMA model.
    kernel = np.zeros((4, 2 * K), "f4")
    kernel[2, K:] = 100.0
    model.ema_ova_head.kernel.assign(kernel)
    model.ova_head.kernel.assign(model.ova_head.kernel * -3.0)
    labeled, unlabeled = batch()
    want, want_fix, inliers = np_step_loss(model, labeled, unlabeled, gate)
    loss, scalars = model.train_loss(labeled, unlabeled, tf.convert_to_tensor(model.step), {})
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    np.testing.assert_allclose(float(scalars["losses/fix"]), want_fix, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(scalars["monitors/inliers"]), inliers.mean(), atol=1e-6)
    assert float(scalars["monitors/fix_on"]) == gate
    assert 0 < inliers.sum() < len(inliers)
    if gate:
        assert want_fix > 0


def test_head_trains_is_averaged_and_checkpointed():
    model = tiny_model(start_fix_kimg=0)
    before = model.ova_head.kernel.numpy().copy()
    np.testing.assert_array_equal(model.ema_ova_head.kernel.numpy(), before)
    model.train_step(batch())
    after = model.ova_head.kernel.numpy()
    assert np.abs(after - before).max() > 1e-4                  # its gradient reached Adam
    # EMA: shadow <- shadow - (1 - 0.999) (shadow - var), from the initial weights.
    np.testing.assert_allclose(model.ema_ova_head.kernel.numpy(),
                               before - 0.001 * (before - after), rtol=1e-5, atol=1e-7)
    stored = model_variables(model)
    assert {"ova_head/kernel", "ema_ova_head/kernel"} <= set(stored)
    # The exported classifier stays the K-way head; the score is the OVA one of the EMA model.
    images = batch()[1]["image"][:, 0]
    assert model(images).shape == (2 * B, K)
    pooled, logits = model.ema_net.features_and_logits(images, training=False)
    want = np_outlier(logits.numpy(), pooled.numpy() @ model.ema_ova_head.kernel.numpy())
    np.testing.assert_allclose(model.outlier_score(images).numpy(), want, rtol=1e-5)
