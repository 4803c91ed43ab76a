"""IOMatch (realmix_tf/iomatch.py): each loss term against an independent numpy computation
(the open-set targets, the multi-binary loss, the thresholds, the whole step's loss with its
open-set warm-up), and its heads: trained, weight-decayed, averaged into the EMA copy,
checkpointed, and the open-set head's outlier score beside the K-way classifier."""
import numpy as np
import pytest
import tensorflow as tf

from libml.run.checkpoints import model_variables
from realmix_tf import iomatch

K = 3
# Multi-binary logits [N, 2K]: columns 0..K-1 'not class k', K..2K-1 'class k' (I's view(N, 2, K)).
MB = np.float32([[2.0, -1.0, 0.0, -2.0, 1.0, 0.0],
                 [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                 [-3.0, 1.0, 2.0, 3.0, 0.5, -1.0]])
LABELS = np.int64([1, 0, 2])
PROBS = np.float32([[1.0, 0.0, 0.0], [0.25, 0.25, 0.5], [0.7, 0.2, 0.1]])


def np_pairs(mb):
    neg, pos = mb[:, :K].astype(np.float64), mb[:, K:].astype(np.float64)
    r_neg = np.exp(neg) / (np.exp(neg) + np.exp(pos))
    return r_neg, 1.0 - r_neg


def np_multi_binary(mb, labels):
    r_neg, r_pos = np_pairs(mb)
    out = []
    for i, y in enumerate(labels):
        others = [-np.log(r_neg[i, k] + 1e-8) for k in range(K) if k != y]
        out.append(-np.log(r_pos[i, y] + 1e-8) + max(others))
    return np.array(out)


def np_open_targets(probs, mb):
    r_neg, r_pos = np_pairs(mb)
    score = (probs * r_neg).sum(1)
    return np.concatenate([probs * r_pos, score[:, None]], 1), score, (score < 0.5).astype(float)


def np_soft_ce(targets, logits):
    logits = logits.astype(np.float64)
    log_softmax = logits - logits.max(1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
    return -(targets * log_softmax).sum(1)


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_multi_binary_loss_against_numpy():
    got = iomatch.multi_binary_loss(tf.constant(MB), tf.constant(LABELS), K).numpy()
    np.testing.assert_allclose(got, np_multi_binary(MB, LABELS), rtol=1e-5)
    # Worked value: every pair at 1/2 -> -log(1/2) for the positive plus the largest negative.
    assert got[1] == pytest.approx(2 * np.log(2.0), rel=1e-6)


def test_open_set_targets_against_numpy():
    q, score, in_mask = [t.numpy() for t in iomatch.open_set_targets(
        tf.constant(PROBS), tf.constant(MB), K)]
    want_q, want_score, want_in = np_open_targets(PROBS, MB)
    np.testing.assert_allclose(q, want_q, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(score, want_score, rtol=1e-5)
    np.testing.assert_array_equal(in_mask, want_in)
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-6)         # a (K+1)-way distribution
    # Worked row 0: p = class 0, whose 'not class 0' probability is sigmoid(2 - (-2)).
    outlier = 1.0 / (1.0 + np.exp(-4.0))
    np.testing.assert_allclose(q[0], [1 - outlier, 0, 0, outlier], rtol=1e-5, atol=1e-7)
    # Row 1: score exactly 1/2, not below it: not an inlier (I: out_scores < 0.5).
    assert score[1] == 0.5 and in_mask[0] == 0.0 and in_mask[1] == 0.0 and in_mask[2] == 1.0


def test_thresholds_keep_at_or_above_the_cutoff():
    probs = tf.constant(np.float32([[0.75, 0.25], [0.5, 0.5], [0.7421875, 0.2578125]]))
    np.testing.assert_array_equal(iomatch.threshold_mask(probs, 0.75).numpy(), [1, 0, 0])
    np.testing.assert_array_equal(iomatch.threshold_mask(probs, 0.5).numpy(), [1, 1, 1])


SIZE, B, RATIO = 8, 4, 2


def make_model(**kwargs):
    return iomatch.IOMatch(K, (SIZE, SIZE, 3), filters=4, repeat=1, uratio=RATIO, lr=0.01,
                           **kwargs)


def batch(seed=0):
    rng = np.random.RandomState(seed)
    labeled = {"image": tf.constant(rng.uniform(-1, 1, (B, SIZE, SIZE, 3)).astype("f4")),
               "label": tf.constant(rng.randint(0, K, B).astype("i8"))}
    unlabeled = {"image": tf.constant(rng.uniform(-1, 1, (B * RATIO, 2, SIZE, SIZE, 3)).astype("f4"))}
    return labeled, unlabeled


def reference_loss(model, labeled, unlabeled, op_on, p_cutoff, q_cutoff):
    """The step's loss from the same forward pass, every term in numpy."""
    x, y = labeled["image"], labeled["label"].numpy()
    weak, strong = unlabeled["image"][:, 0], unlabeled["image"][:, 1]
    pooled, logits = model.net.features_and_logits(tf.concat([x, weak, strong], 0), training=True,
                                                   update_bn_stats=False)
    logits_open, logits_mb = [t.numpy() for t in model.heads(pooled)]
    logits = logits.numpy()
    n, u = B, B * RATIO
    xe = np_soft_ce(np.eye(K)[y], logits[:n]).mean()
    mb = np_multi_binary(logits_mb[:n], y).mean()
    p = softmax(logits[n:n + u].astype(np.float64))
    q, _, in_mask = np_open_targets(p, logits_mb[n:n + u])
    p_mask, q_mask = (p.max(1) >= p_cutoff), (q.max(1) >= q_cutoff)
    ui = (np_soft_ce(p, logits[n + u:]) * in_mask * p_mask).mean()
    op = (np_soft_ce(q, logits_open[n + u:]) * q_mask).mean()
    return (xe + model.lambda_mb * mb + model.wu * ui + model.lambda_op * op_on * op,
            dict(xe=xe, mb=mb, ui=ui, op=op))


@pytest.mark.parametrize("cutoffs", [(0.0, 0.0), (1.0, 1.0), (0.4, 0.3)])
def test_step_loss_against_numpy_with_the_open_set_warmup(cutoffs):
    p_cutoff, q_cutoff = cutoffs
    # Seed 4: its initial heads call the unlabeled rows inliers (outlier score ~0.45; the rows
    # of an untrained net are alike, so all are on one side of 0.5, which side by seed).
    model = make_model(p_cutoff=p_cutoff, q_cutoff=q_cutoff, wu=2.0, lambda_mb=0.5,
                       lambda_op=3.0, op_start_kimg=0.0625, seed=4)   # open-set loss from 64 images
    labeled, unlabeled = batch()
    for step, op_on in ((0, 0.0), (63, 0.0), (64, 1.0)):
        want, terms = reference_loss(model, labeled, unlabeled, op_on, p_cutoff, q_cutoff)
        loss, scalars = model.train_loss(labeled, unlabeled, tf.constant(step, tf.int64), {})
        assert float(loss) == pytest.approx(want, rel=1e-4), step
        assert float(scalars["losses/open"]) == pytest.approx(terms["op"], rel=1e-4, abs=1e-7)
        assert float(scalars["losses/mb"]) == pytest.approx(terms["mb"], rel=1e-4)
        assert float(scalars["losses/xeu"]) == pytest.approx(terms["ui"], rel=1e-4, abs=1e-7)
    if cutoffs == (1.0, 1.0):       # nothing reaches probability 1: both unlabeled losses off
        assert terms["ui"] == 0.0 and terms["op"] == 0.0
    if cutoffs == (0.0, 0.0):       # every term contributes
        assert terms["op"] > 0.0 and terms["ui"] > 0.0


def weights(layer):
    return [v.numpy() for v in layer.trainable_variables]


def test_heads_train_decay_and_their_ema_follows():
    model = make_model(p_cutoff=0.0, q_cutoff=0.0, op_start_kimg=0)
    start = weights(model.heads)
    for a, b in zip(start, weights(model.ema_heads)):
        np.testing.assert_array_equal(a, b)                     # the EMA starts at the weights
    model.train_step(batch())
    after = weights(model.heads)
    assert all(np.abs(a - b).max() > 0 for a, b in zip(after, start))    # every head weight trained
    for s, a, e in zip(start, after, weights(model.ema_heads)):
        np.testing.assert_allclose(e, s + (1 - model.ema_decay) * (a - s), rtol=1e-5, atol=1e-8)

    # A zero-gradient update (fresh Adam moments: no step) leaves only the decoupled weight
    # decay, applied to the heads' kernels and not to their biases.
    fresh = make_model()
    before = {v.path: v.numpy() for v in fresh.heads.trainable_variables}
    fresh.apply_update([tf.zeros_like(v) for v in fresh._trained])
    for v in fresh.heads.trainable_variables:
        factor = 1 - fresh.wd * fresh.lr if v.path.endswith("kernel") else 1.0
        np.testing.assert_allclose(v.numpy(), before[v.path] * factor, rtol=1e-6)


def test_heads_are_checkpointed_and_the_export_stays_k_way(tmp_path):
    model = make_model(p_cutoff=0.0, q_cutoff=0.0, op_start_kimg=0)
    model.train_step(batch())
    keys = model_variables(model)
    for layer in (model.heads, model.ema_heads):
        for v in layer.weights:
            assert keys[v.path] is v
    prefix = tf.train.Checkpoint(variables=keys).write(str(tmp_path / "ckpt"))
    other = make_model(seed=5)
    images = batch(1)[0]["image"]
    assert not np.allclose(other.outlier_score(images), model.outlier_score(images))
    tf.train.Checkpoint(variables=model_variables(other)).read(prefix).assert_consumed()
    for a, b in zip(weights(model.heads) + weights(model.ema_heads),
                    weights(other.heads) + weights(other.ema_heads)):
        np.testing.assert_array_equal(a, b)

    # The outlier score: the EMA open-set head's last probability; the model's output: K ways.
    score = model.outlier_score(images).numpy()
    pooled, _ = model.ema_net.features_and_logits(images, training=False)
    want = softmax(model.ema_heads(pooled)[0].numpy().astype(np.float64))[:, -1]
    np.testing.assert_allclose(score, want, rtol=1e-5)
    assert score.shape == (B,) and ((score > 0) & (score < 1)).all()
    assert model(images).shape == (B, K)
