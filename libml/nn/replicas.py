"""Cross-replica arithmetic: with R replicas, the step computes what one device computes on
the global batch (issue 10).

Every function here is called inside `strategy.run` (replica context) and reduces to the plain
one-device computation when there is one replica. Two modes (`--replica_mode`):

- "global" (default): BatchNorm batch statistics of each chunk over every replica's part of it
  (`batch_norm`), MixUp partners and the permutation drawn over the global rows
  (`MixPlan`), the OOD percentile over all replicas' predictions (`percentile_mask`), and every
  loss normalised by global counts (`mean`, `masked_mean`).
- "per_replica": what the released libml did on several GPUs: each replica normalises, mixes
  and masks its own part; the losses are per-replica means averaged over replicas. No
  collective inside the forward pass, so it is cheaper.

Losses are returned as this replica's *share*: the shares of all replicas sum to the loss, so
the per-replica gradients (which the optimizer sums) sum to the gradient of the loss. The
collectives are differentiable (the gradient of an all-sum is an all-sum), and the gradient
through cross-replica BatchNorm statistics is written by hand (`_normalize`), so gradients are
exact. `totals` turns shares into reportable values.
"""
import numpy as np
import tensorflow as tf

from libml.nn import ops

GLOBAL, PER_REPLICA = "global", "per_replica"      # --replica_mode
REPLICA_MODES = (GLOBAL, PER_REPLICA)


def num_replicas() -> int:
    """Replicas running this code in sync: 1 outside `strategy.run` (cross-replica context,
    where the code runs once) and without a strategy."""
    ctx = tf.distribute.get_replica_context()
    return 1 if ctx is None else ctx.num_replicas_in_sync


def replica_id():
    """This replica's index (an int32 tensor under a strategy, 0 without one)."""
    ctx = tf.distribute.get_replica_context()
    return 0 if ctx is None else ctx.replica_id_in_sync_group


def all_sum(value):
    """Sum over replicas (differentiable); the value itself with one replica."""
    if num_replicas() == 1:
        return value
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, value)


def gather(value):
    """Every replica's `value` concatenated along axis 0, in replica order."""
    if num_replicas() == 1:
        return value
    return tf.distribute.get_replica_context().all_gather(value, axis=0)


def synced(mode: str) -> bool:
    """Whether the step must combine replicas (trace-time Python bool)."""
    if mode not in REPLICA_MODES:
        raise ValueError(f"replica mode must be one of {REPLICA_MODES}, got {mode!r}")
    return mode == GLOBAL and num_replicas() > 1


# ---------------------------------------------------------------------------------------------
# Losses as shares

def mean(values):
    """Share of the mean over every replica's rows (equal row counts): sum / (size * R). In
    both modes the shares sum to the mean (global) or to the mean of per-replica means."""
    values = tf.cast(values, tf.float32)
    return tf.reduce_sum(values) / tf.cast(tf.size(values) * num_replicas(), tf.float32)


def masked_mean(values, mask, mode: str, scale: float = 1.0):
    """Share of sum(values * mask) / max(scale * sum(mask), 1). "global": the kept count is
    summed over replicas; "per_replica": each replica's masked mean, averaged over replicas.
    values, mask: [N] (sum a row's entries first; `scale` is then the entries per row)."""
    values, mask = tf.cast(values, tf.float32), tf.stop_gradient(tf.cast(mask, tf.float32))
    kept = tf.reduce_sum(mask)
    total = tf.reduce_sum(values * mask)
    if synced(mode):
        return total / tf.maximum(all_sum(kept) * scale, 1.0)
    return total / tf.maximum(kept * scale, 1.0) / num_replicas()


def share(value):
    """Share of a value every replica computes alike (a threshold, a weight): value / R, so
    that `totals` gives it back (global mode) or averages it over replicas (per_replica)."""
    return tf.cast(value, tf.float32) / float(num_replicas())


def totals(shares: dict) -> dict:
    """{tag: sum over replicas} of scalar shares, in one collective and without gradient."""
    if num_replicas() == 1:
        return {k: tf.stop_gradient(tf.cast(v, tf.float32)) for k, v in shares.items()}
    keys = sorted(shares)
    stacked = tf.stop_gradient(tf.stack([tf.cast(shares[k], tf.float32) for k in keys]))
    return dict(zip(keys, tf.unstack(all_sum(stacked))))


def percentile_mask(probs, gamma: float, mode: str):
    """ops.ood_mask (mask, threshold) with the percentile taken over the predictions of
    every replica ("global") or of this replica alone ("per_replica")."""
    if not synced(mode) or (isinstance(gamma, (int, float)) and gamma == 0):
        return ops.ood_mask(probs, gamma, return_threshold=True)
    probs = tf.stop_gradient(tf.cast(probs, tf.float32))
    _, threshold = ops.ood_mask(gather(probs), gamma, return_threshold=True)
    mask = tf.cast(tf.reduce_max(probs, axis=-1) > threshold, tf.float32)
    return tf.stop_gradient(mask), threshold


def confidence_stats(probs, mode: str) -> dict:
    """Min / mean / max of the confidence max_c p over every replica's rows (global) or this
    replica's (per_replica; the trainer then averages them over replicas)."""
    confidence = tf.reduce_max(tf.stop_gradient(tf.cast(probs, tf.float32)), axis=-1)
    if synced(mode):
        confidence = gather(confidence)
    return {"monitors/confidence_min": tf.reduce_min(confidence),
            "monitors/confidence_mean": tf.reduce_mean(confidence),
            "monitors/confidence_max": tf.reduce_max(confidence)}


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics over replicas

def batch_norm(x, gamma, beta, epsilon: float, groups: int = 1):
    """Training-mode batch normalisation of x [N, H, W, C] (NHWC) made of `groups` equal chunks,
    each chunk normalised with the statistics of that chunk on every replica. Returns
    (y in x's dtype, mean of chunk 0, unbiased variance of chunk 0) like the fused kernel.

    Statistics in float32; equal row counts per replica, so the global variance is the mean of
    the replica variances plus the variance of the replica means (no E[x^2] - E[x]^2
    cancellation): one all-gather of [2, G, C] floats. The normalisation runs the fused kernel
    with these statistics, and its gradient is written by hand (`_normalize`): one all-sum of
    [2, G, C] floats in the backward pass instead of differentiating the unfused ops."""
    channels = x.shape[-1]
    rows = tf.size(x) // (groups * channels)
    local = [tf.compat.v1.nn.fused_batch_norm(tf.stop_gradient(c), tf.ones([channels]),
                                              tf.zeros([channels]), epsilon=epsilon,
                                              is_training=True)[1:]
             for c in (tf.split(x, groups) if groups > 1 else [x])]
    local_mean = tf.stack([m for m, _ in local])
    bessel = tf.cast(rows - 1, tf.float32) / tf.cast(rows, tf.float32)
    local_var = tf.stack([v for _, v in local]) * bessel
    stats = gather(tf.stack([local_mean, local_var])[None])                   # [R, 2, G, C]
    means, variances = stats[:, 0], stats[:, 1]
    mean_ = tf.reduce_mean(means, axis=0)
    variance = tf.reduce_mean(variances, axis=0) + tf.reduce_mean(tf.square(means - mean_), axis=0)
    mean_, variance = tf.stop_gradient(mean_), tf.stop_gradient(variance)   # _normalize's job
    count = tf.cast(rows * num_replicas(), tf.float32)                       # rows per chunk
    y = _normalize(x, tf.cast(gamma, tf.float32), tf.cast(beta, tf.float32), mean_, variance,
                   count, epsilon, groups)
    unbiased = variance[0] * count / tf.maximum(count - 1.0, 1.0)
    return y, mean_[0], unbiased


def _normalize(x, gamma, beta, mean, variance, count, epsilon, groups):
    """y = gamma * (x - mean) / sqrt(variance + epsilon) + beta per chunk, with the global
    statistics mean, variance [G, C] of x over `count` rows per chunk; the gradient includes their dependence on x over
    every replica (synchronised BatchNorm):
        dx = gamma * rstd * (dy - mean(dy) - xhat * mean(dy * xhat)),
    the means over the chunk's rows on all replicas. The fused kernel gives the local sums
    (d beta = sum dy, d gamma = sum dy * xhat) and the first term; one all-sum makes them global.
    """
    @tf.custom_gradient
    def forward(x, gamma, beta):
        chunks = tf.split(x, groups) if groups > 1 else [x]
        ys = [tf.compat.v1.nn.fused_batch_norm(c, gamma, beta, mean=mean[g], variance=variance[g],
                                               epsilon=epsilon, is_training=False)[0]
              for g, c in enumerate(chunks)]

        def backward(dy):
            parts = [tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=d, x=c, scale=gamma, reserve_space_1=mean[g],
                reserve_space_2=variance[g], reserve_space_3=tf.zeros([0], tf.float32),
                epsilon=epsilon, is_training=False)[:3]
                for g, (d, c) in enumerate(zip(tf.split(dy, groups) if groups > 1 else [dy],
                                               chunks))]
            dx_local = tf.concat([p[0] for p in parts], axis=0) if groups > 1 else parts[0][0]
            dgamma = tf.stack([p[1] for p in parts])                          # [G, C] local
            dbeta = tf.stack([p[2] for p in parts])
            sums = all_sum(tf.stack([dbeta, dgamma]))                          # [2, G, C] global
            rstd = tf.math.rsqrt(variance + epsilon)
            mean_dy, mean_dy_xhat = sums[0] / count, sums[1] / count
            slope = gamma * tf.square(rstd) * mean_dy_xhat                   # [G, C]
            intercept = gamma * rstd * mean_dy - slope * mean
            shape = [groups] + [1] * (len(x.shape) - 1) + [x.shape[-1]]
            grouped = tf.reshape(x, tf.concat([[groups, -1], tf.shape(x)[1:]], axis=0))
            correction = (grouped * tf.cast(tf.reshape(slope, shape), x.dtype)
                          + tf.cast(tf.reshape(intercept, shape), x.dtype))
            dx = dx_local - tf.reshape(correction, tf.shape(x))
            return dx, tf.reduce_sum(dgamma, 0), tf.reduce_sum(dbeta, 0)

        return (tf.concat(ys, axis=0) if groups > 1 else ys[0]), backward

    return forward(x, gamma, beta)


# ---------------------------------------------------------------------------------------------
# MixMatch rows: MixUp over the global rows, interleaved chunks split over replicas

class MixPlan:
    """Which rows of the global MixMatch batch this replica computes.

    One device mixes the (nu+1)*B rows [x; view_1; ...; view_nu] with a permutation of all of
    them, interleaves the nu+1 mixed tensors of B rows (ops.interleave) and runs the chunks.
    With R replicas of b = B/R rows, replica r computes rows r*b .. (r+1)*b of every interleaved
    chunk: these are rows r*b .. (r+1)*b of every mixed tensor, interleaved among themselves, so
    the losses of a replica only need its own rows. `MixPlan(b, nu, mode)` builds the index
    tables (numpy, at trace time); in per_replica mode each replica is its own "global batch".
    """

    def __init__(self, batch: int, nu: int, mode: str):
        self.batch, self.nu = int(batch), int(nu)
        self.synced = synced(mode)
        self.replicas = num_replicas() if self.synced else 1
        parts, b = self.nu + 1, self.batch
        global_batch = b * self.replicas
        with tf.init_scope():
            chunks = ops.interleave(np.split(np.arange(parts * global_batch), parts),
                                       global_batch)
            chunks = [c.numpy() for c in chunks]
        rows = np.arange(b)
        # Global mixed-row index of the gathered row (replica r, tensor t, row k).
        self.from_gathered = np.array([t * global_batch + r * b + rows for r in range(self.replicas)
                                       for t in range(parts)]).reshape(-1)
        self.to_global = np.argsort(self.from_gathered)
        mine, inter, back = [], [], []
        for r in range(self.replicas):
            rows_r = np.concatenate([t * global_batch + r * b + rows for t in range(parts)])
            order = np.concatenate([c[r * b:(r + 1) * b] for c in chunks])   # interleaved
            mine.append(rows_r)
            inter.append(order)
            back.append(np.argsort(order)[np.searchsorted(np.sort(order), rows_r)])
        self.mine, self.inter, self.back = np.stack(mine), np.stack(inter), np.stack(back)

    def _mine(self, table):
        rid = replica_id() if self.synced else 0
        return tf.gather(tf.constant(table, tf.int32), rid)

    @property
    def global_rows(self) -> int:
        return (self.nu + 1) * self.batch * self.replicas

    def mix(self, inputs, targets, lam, index):
        """inputs, targets: this replica's [(nu+1)*b, ...] rows ordered [x; views]; lam, index:
        the draws for the global rows. Returns (chunks: nu+1 interleaved input chunks of b rows,
        targets_x [b, C], targets_u [nu*b, C]) for this replica."""
        if self.synced:
            inputs = tf.gather(gather(inputs), self.to_global)
            targets = tf.gather(gather(targets), self.to_global)
        mixed_inputs, mixed_targets = ops.mixup(inputs, targets, lam, index)
        chunks = tf.split(tf.gather(mixed_inputs, self._mine(self.inter)), self.nu + 1)
        my_targets = tf.gather(mixed_targets, self._mine(self.mine))
        return chunks, my_targets[:self.batch], my_targets[self.batch:]

    def restore(self, logits_chunks):
        """The logits of the interleaved chunks back in row order: (logits_x, logits_u)."""
        logits = tf.gather(tf.concat(logits_chunks, axis=0), self._mine(self.back))
        return logits[:self.batch], logits[self.batch:]
