"""libml.nn.ood_score: the in-step prototype and nearest-labeled-feature scores against a NumPy
reference (realmix_tf.ood_share's twin), the moving-average update, replica sums, and a two-replica
MirroredStrategy update equal to one device's."""
import json

import numpy as np
import pytest
import tensorflow as tf

from libml.nn import ood_score

from realmix_tf import ood_share

from libml.nn import replicas
from tests.two_devices import run_script


def _batch(seed, n=24, d=8, nclass=4):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, nclass - 1, n)  # class 3 absent


def _numpy_update(protos, features, labels, momentum):
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    out = protos.copy()
    for k in range(len(protos)):
        if (labels == k).any():
            s = f[labels == k].sum(0)
            v = momentum * protos[k] + (1 - momentum) * s / np.linalg.norm(s)
            out[k] = v / np.linalg.norm(v)
    return out


def test_class_sums_with_ids_and_one_hot():
    f, y = _batch(0)
    sums, counts = ood_score.class_sums(f, y, 4)
    unit = f / np.linalg.norm(f, axis=1, keepdims=True)
    np.testing.assert_allclose(sums.numpy(), [unit[y == k].sum(0) for k in range(4)], atol=1e-5)
    np.testing.assert_array_equal(counts.numpy(), np.bincount(y, minlength=4))
    sums2, counts2 = ood_score.class_sums(f, tf.one_hot(y, 4), 4)
    np.testing.assert_allclose(sums2.numpy(), sums.numpy(), atol=1e-6)
    np.testing.assert_array_equal(counts2.numpy(), counts.numpy())


def test_first_update_from_zeros_is_the_numpy_prototypes_and_absent_classes_keep_theirs():
    f, y = _batch(1)
    first = ood_score.prototype_update(tf.zeros([4, 8]), f, y, 0.9).numpy()
    np.testing.assert_allclose(first, ood_share.prototypes(f, y, 4), atol=1e-6)
    assert np.all(first[3] == 0)                                   # class 3 not seen yet
    f2, y2 = _batch(2)
    second = ood_score.prototype_update(tf.constant(first), f2, y2, 0.9).numpy()
    np.testing.assert_allclose(second, _numpy_update(first, f2, y2, 0.9), atol=1e-6)
    # a batch of class 0 only: the other rows stay exactly as they were
    third = ood_score.prototype_update(tf.constant(second), f2[:3], np.zeros(3, np.int64), 0.5).numpy()
    np.testing.assert_array_equal(third[1:], second[1:])
    assert not np.allclose(third[0], second[0])
    np.testing.assert_allclose(np.linalg.norm(third[:3], axis=1), 1.0, atol=1e-6)


def test_prototype_score_matches_the_numpy_twin():
    f, y = _batch(3)
    protos = ood_share.prototypes(f, y, 4)                        # row 3 zero: counts -1
    queries = np.random.default_rng(4).normal(size=(30, 8)).astype(np.float32)
    sim, nearest = ood_score.prototype_score(queries, protos)
    want_sim, want_nearest = ood_share.prototype_similarity(queries, protos)
    np.testing.assert_allclose(sim.numpy(), want_sim, atol=1e-5)
    np.testing.assert_array_equal(nearest.numpy(), want_nearest)
    assert sim.dtype == tf.float32 and np.all(nearest.numpy() != 3)
    # bfloat16 features (mixed precision) are scored in float32
    sim16, _ = ood_score.prototype_score(tf.cast(queries, tf.bfloat16), protos)
    np.testing.assert_allclose(sim16.numpy(), want_sim, atol=2e-2)
    empty, _ = ood_score.prototype_score(queries, np.zeros((4, 8), np.float32))
    assert np.all(empty.numpy() == -1.0)


def test_sums_of_two_halves_give_the_whole_batch_update():
    """What an all-reduce of the replicas' class_sums does: the update equals one device's."""
    f, y = _batch(5)
    protos = ood_share.prototypes(*_batch(6), 4).astype(np.float32)
    parts = [ood_score.class_sums(f[s], y[s], 4) for s in (slice(0, 12), slice(12, 24))]
    sums, counts = parts[0][0] + parts[1][0], parts[0][1] + parts[1][1]
    got = ood_score.prototype_update_from_sums(protos, sums, counts, 0.7)
    np.testing.assert_allclose(got.numpy(), ood_score.prototype_update(protos, f, y, 0.7).numpy(), atol=1e-6)


def test_score_ranks_like_the_mask_through_percentile_mask():
    """score[:, None] in place of probabilities: the mask keeps the rows above the
    gamma-quantile of the score."""
    score = tf.constant([0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6])
    keep, threshold = replicas.percentile_mask(score[:, None], 0.25, replicas.GLOBAL)
    assert float(threshold) == pytest.approx(0.3)                  # floor(0.25 * 8) = 2nd smallest
    np.testing.assert_array_equal(keep.numpy(), (score.numpy() > 0.3).astype(np.float32))


def test_knn_score_and_ring_bank():
    bank = tf.zeros([4, 2])
    filled, position = 0, 0
    queries = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    assert np.all(ood_score.knn_score(queries, bank, filled).numpy() == -1.0)
    rows = [[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]]
    bank, filled, position = ood_score.bank_insert(bank, filled, position, rows)
    assert (int(filled), int(position)) == (3, 3)
    np.testing.assert_allclose(ood_score.knn_score(queries, bank, filled).numpy(), [1.0, 1.0], atol=1e-6)
    bank, filled, position = ood_score.bank_insert(bank, filled, position, [[1.0, -1.0], [-1.0, 0.0]])
    assert (int(filled), int(position)) == (4, 1)                  # row 0 (2, 0) overwritten
    np.testing.assert_allclose(bank.numpy(), [[-1, 0], [1, 1], [0, 3], [1, -1]])
    want = ood_share.knn_similarity(queries, bank.numpy())
    np.testing.assert_allclose(ood_score.knn_score(queries, bank, filled).numpy(), want, atol=1e-6)


MIRRORED = """
import json
import numpy as np
from libml.nn import ood_score
from libml.nn import replicas

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
rng = np.random.default_rng(0)
f = rng.normal(size=(16, 8)).astype("f4"); y = rng.integers(0, 3, 16)
with strategy.scope():
    protos = tf.Variable(tf.zeros([4, 8]), trainable=False,
                         aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
data = tf.data.Dataset.from_tensor_slices((f, y)).batch(16)
def step(batch):
    features, labels = batch
    sums, counts = ood_score.class_sums(features, labels, 4)
    new = ood_score.prototype_update_from_sums(protos, replicas.all_sum(sums), replicas.all_sum(counts), 0.9)
    protos.assign(new)
    return new
for batch in strategy.experimental_distribute_dataset(data):
    per = strategy.run(tf.function(step), args=(batch,))
one = ood_score.prototype_update(tf.zeros([4, 8]), f, y, 0.9)
print("RESULT", json.dumps(dict(replicas=[v.numpy().tolist() for v in per.values],
      variable=protos.numpy().tolist(), one=one.numpy().tolist())))
"""


def test_two_replicas_all_reduced_update_equals_one_device():
    stdout = run_script(MIRRORED, timeout=240)
    out = json.loads([l for l in stdout.splitlines() if l.startswith("RESULT")][0].split(" ", 1)[1])
    assert len(out["replicas"]) == 2
    for values in out["replicas"] + [out["variable"]]:
        np.testing.assert_allclose(values, out["one"], atol=1e-5)
