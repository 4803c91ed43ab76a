"""Feature-space out-of-distribution scores computed inside the training step (issue 21): pure
TensorFlow functions, no Keras or model state. Higher = more in-distribution.

Prototype score (the one --gamma=auto's estimate uses too: its NumPy twin is
realmix_tf.ood_share.prototype_similarity):
  - the caller keeps `prototypes`, a float32 [nclass, D] non-trainable variable, zeros at start
    (a zero row = a class not seen yet); it is training state: checkpoint it with the model
    (a Keras variable tracked by the model) and an exact resume follows;
  - every step, from the EMA model's pooled features of the (un-augmented or weakly augmented)
    labeled batch: `prototype_update(prototypes, features, labels, momentum)` returns the new
    prototypes; assign them. For class k present in the batch,
        new_k = unit(momentum * p_k + (1 - momentum) * unit(sum_i unit(f_i) [y_i = k]))
    (from zeros: new_k = the batch's class direction); absent classes keep p_k;
  - `prototype_score(features, prototypes)` = (max_k cos(f, p_k), argmax_k): zero rows count
    as -1, the lowest cosine.

Replicas: the update's batch statistic is `class_sums(features, labels, nclass)` = (per-class
sums of the unit features [nclass, D], per-class counts [nclass]), additive over replicas.
Under a tf.distribute strategy, all-reduce both with SUM (libml.nn.replicas.all_sum) and call
`prototype_update_from_sums(prototypes, sums, counts, momentum)`: every replica then computes
the same new prototypes as one device on the global batch (create the variable with
aggregation="only_first_replica", as realmix_tf.gamma_auto.GammaState does). Without the all-reduce
(per_replica mode) each replica would average its own part only, and the replicas' copies
would differ.

Nearest-labeled-feature score (optional): `knn_score(features, bank, filled)` = max cosine to
the first `filled` rows of a bank [M, D] of labeled features; `bank_insert(bank, filled,
position, features)` writes a batch into the bank as a ring buffer (the caller keeps bank,
filled and position as variables and checkpoints them; under a strategy, gather the features
of every replica first, libml.nn.replicas.gather, so that every replica writes the same rows).

The mask ranks by the score as RealMix's ranks by the confidence: pass `score[:, None]` where
libml.nn.replicas.percentile_mask / libml.nn.ops.ood_mask take probabilities (they rank rows by
their maximum, which is then the score); the percentile is then over the global batch in
"global" replica mode.
"""
import tensorflow as tf

EPSILON = 1e-12


def unit_rows(x):
    """Rows of x [N, D] scaled to unit L2 norm, in float32 (zero rows stay zero)."""
    x = tf.cast(x, tf.float32)
    return x * tf.math.rsqrt(tf.maximum(tf.reduce_sum(tf.square(x), axis=-1, keepdims=True), EPSILON))


def class_sums(features, labels, nclass: int):
    """(sums [nclass, D] of the unit feature rows of each class, counts [nclass] float32):
    labels are class ids [N] (int) or one-hot / soft targets [N, nclass] (argmax taken).
    Additive over replicas: all-reduce both with SUM for the global batch's."""
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == 2:
        labels = tf.argmax(labels, axis=-1)
    onehot = tf.one_hot(tf.cast(labels, tf.int32), nclass, dtype=tf.float32)     # [N, K]
    return tf.matmul(onehot, unit_rows(features), transpose_a=True), tf.reduce_sum(onehot, axis=0)


def prototype_update_from_sums(prototypes, sums, counts, momentum):
    """New prototypes from the (all-reduced) class sums: a present class (count > 0) moves
    to unit(momentum * p_k + (1 - momentum) * unit(sum_k)); an absent class keeps p_k."""
    prototypes = tf.cast(prototypes, tf.float32)
    momentum = tf.cast(momentum, tf.float32)
    moved = unit_rows(momentum * prototypes + (1.0 - momentum) * unit_rows(sums))
    return tf.where(counts[:, None] > 0, moved, prototypes)


def prototype_update(prototypes, features, labels, momentum):
    """One device's update: prototype_update_from_sums of this batch's class_sums."""
    sums, counts = class_sums(features, labels, int(prototypes.shape[0]))
    return prototype_update_from_sums(prototypes, sums, counts, momentum)


def prototype_score(features, prototypes):
    """(similarity [N], nearest class [N] int32): the cosine of each feature row to its
    nearest prototype; zero prototype rows (unseen classes) count as -1."""
    protos = tf.cast(prototypes, tf.float32)
    present = tf.reduce_sum(tf.square(protos), axis=-1) > 0
    sim = tf.matmul(unit_rows(features), unit_rows(protos), transpose_b=True)
    sim = tf.where(present[None, :], sim, -1.0)
    return tf.reduce_max(sim, axis=-1), tf.argmax(sim, axis=-1, output_type=tf.int32)


def knn_score(features, bank, filled):
    """Cosine of each feature row to its nearest row among the first `filled` rows of `bank`
    [M, D]; -1 while the bank is empty."""
    sim = tf.matmul(unit_rows(features), unit_rows(bank), transpose_b=True)        # [N, M]
    rows = tf.range(tf.shape(bank)[0])
    sim = tf.where((rows < tf.cast(filled, tf.int32))[None, :], sim, -1.0)
    return tf.reduce_max(sim, axis=-1)


def bank_insert(bank, filled, position, features):
    """(bank, filled, position) after writing `features` [N, D] (N <= M) at rows position,
    position + 1, ... modulo M (a ring buffer: the oldest rows are replaced)."""
    size = tf.shape(bank)[0]
    n = tf.shape(features)[0]
    rows = tf.math.floormod(tf.cast(position, tf.int32) + tf.range(n), size)
    bank = tf.tensor_scatter_nd_update(tf.cast(bank, tf.float32), rows[:, None],
                                       tf.cast(features, tf.float32))
    filled = tf.minimum(tf.cast(filled, tf.int32) + n, size)
    return bank, filled, tf.math.floormod(tf.cast(position, tf.int32) + n, size)
