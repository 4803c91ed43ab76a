"""Cross-replica arithmetic (libml/nn/replicas.py) on 2 logical CPU devices against 1 device on
the global batch: BatchNorm statistics and gradients, MixUp rows and interleave, the OOD
percentile, loss shares; and the per-replica variant differs."""
import numpy as np

from tests.two_devices import run_script

SCRIPT = """
import json
import numpy as np
from libml.nn import ops
from libml.nn import replicas

R, b, C, NU, G = 2, 4, 3, 2, 3
B = R * b
rng = np.random.RandomState(0)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
out = {}

def per_replica(array, axis=0):
    # Replica r gets slice r of each of the `groups` equal chunks along axis 0.
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(np.concatenate([c[ctx.replica_id_in_sync_group * (len(c) // R):
                                                   (ctx.replica_id_in_sync_group + 1) * (len(c) // R)]
                                                 for c in array])))

def local(values):
    return [v.numpy() for v in strategy.experimental_local_results(values)]

# --- BatchNorm: G chunks of B rows, replica r holds rows r*b..(r+1)*b of each chunk.
x = rng.normal(1.5, 2.0, (G, B, 5, 5, C)).astype("f4")
w = rng.normal(size=(G, B, 5, 5, C)).astype("f4")
gamma = tf.Variable(rng.uniform(0.5, 1.5, C).astype("f4"))
beta = tf.Variable(rng.normal(size=C).astype("f4"))
ys, g_gamma, g_beta, g_x = [], 0, 0, []
for g in range(G):                       # one device: the fused kernel, chunk by chunk
    xg = tf.constant(x[g])
    with tf.GradientTape() as tape:
        tape.watch(xg)
        y, m, v = tf.compat.v1.nn.fused_batch_norm(xg, gamma, beta, epsilon=1e-3, is_training=True)
        loss = tf.reduce_sum(y * w[g])
    dg, db, dx = tape.gradient(loss, [gamma, beta, xg])
    g_gamma, g_beta = g_gamma + dg.numpy(), g_beta + db.numpy()
    ys.append(y.numpy()); g_x.append(dx.numpy())
    if g == 0:
        mean0, var0 = m.numpy(), v.numpy()
with strategy.scope():
    gamma2, beta2 = tf.Variable(gamma.numpy()), tf.Variable(beta.numpy())

def bn_step(xr, wr):
    with tf.GradientTape() as tape:
        tape.watch(xr)
        y, m, v = replicas.batch_norm(xr, gamma2, beta2, 1e-3, groups=G)
        loss = tf.reduce_sum(y * wr)
    return (y, m, v) + tuple(tape.gradient(loss, [gamma2, beta2, xr]))

res = tf.function(lambda a, c: strategy.run(bn_step, args=(a, c)))(per_replica(x), per_replica(w))
y_r, m_r, v_r, dg_r, db_r, dx_r = [local(t) for t in res]
for r in range(R):
    np.testing.assert_allclose(y_r[r].reshape(G, b, 5, 5, C), np.stack(ys)[:, r*b:(r+1)*b], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m_r[r], mean0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v_r[r], var0, rtol=1e-4)
    np.testing.assert_allclose(dx_r[r].reshape(G, b, 5, 5, C), np.stack(g_x)[:, r*b:(r+1)*b], rtol=1e-3, atol=1e-4)
np.testing.assert_allclose(dg_r[0] + dg_r[1], g_gamma, rtol=1e-4, atol=1e-3)
np.testing.assert_allclose(db_r[0] + db_r[1], g_beta, rtol=1e-4, atol=1e-3)
out["bn"] = "ok"

# --- MixPlan against ops.mixup + ops.interleave on the global rows.
images = rng.uniform(-1, 1, (NU + 1, B, 2, 2, 1)).astype("f4")      # [x; view_1; view_2]
targets = rng.uniform(0, 1, (NU + 1, B, C)).astype("f4")
total = (NU + 1) * B
lam = ops.sample_mixup_lambda(total, 0.75, tf.constant([1, 2], tf.int64))
index = ops.sample_permutation(total, tf.constant([3, 4], tf.int64))
mixed_x, mixed_t = ops.mixup(images.reshape(total, 2, 2, 1), targets.reshape(total, C), lam, index)
chunks = [c.numpy() for c in ops.interleave(tf.split(mixed_x, NU + 1), B)]
mixed_t = mixed_t.numpy()

def mix_step(imgs, tgts):
    plan = replicas.MixPlan(b, NU, "global")
    ch, tx, tu = plan.mix(imgs, tgts, lam, index)
    lx, lu = plan.restore(ch)           # restore the inputs themselves as "logits"
    return tf.stack(ch), tx, tu, lx, lu

res = tf.function(lambda a, c: strategy.run(mix_step, args=(a, c)))(
    per_replica(images.reshape(NU + 1, B, -1)), per_replica(targets))
ch_r, tx_r, tu_r, lx_r, lu_r = [local(t) for t in res]
mixed_rows = mixed_x.numpy().reshape(NU + 1, B, -1)
for r in range(R):
    rows = slice(r * b, (r + 1) * b)
    np.testing.assert_allclose(ch_r[r].reshape(NU + 1, b, -1), np.stack(chunks)[:, rows].reshape(NU + 1, b, -1), rtol=1e-6)
    np.testing.assert_allclose(tx_r[r], mixed_t[:B][rows], rtol=1e-6)
    np.testing.assert_allclose(tu_r[r], np.concatenate([mixed_t[B:2*B][rows], mixed_t[2*B:][rows]]), rtol=1e-6)
    np.testing.assert_allclose(lx_r[r].reshape(b, -1), mixed_rows[0, rows], rtol=1e-6)
    np.testing.assert_allclose(lu_r[r].reshape(2 * b, -1), np.concatenate([mixed_rows[1, rows], mixed_rows[2, rows]]), rtol=1e-6)
out["mix"] = "ok"

# --- OOD percentile, masked means and loss shares over 2 replicas vs the global rows.
probs = tf.nn.softmax(rng.normal(0, 2, (2 * B, C)).astype("f4")).numpy()
probs[:B] = tf.nn.softmax(rng.normal(0, 0.3, (B, C)).astype("f4")).numpy()   # replica 0: unsure
values = rng.uniform(0, 1, 2 * B).astype("f4")
mask_1, thr_1 = ops.ood_mask(probs, 0.5, return_threshold=True)
mask_1 = mask_1.numpy()
want_masked = (values * mask_1).sum() / max(mask_1.sum() * C, 1)

def share_step(p, v, mode):
    mask, thr = replicas.percentile_mask(p, 0.5, mode)
    shares = {"mean": replicas.mean(v), "masked": replicas.masked_mean(v, mask, mode, scale=C)}
    return mask, thr, replicas.totals(shares), replicas.confidence_stats(p, mode)

for mode in ("global", "per_replica"):
    res = tf.function(lambda a, c: strategy.run(share_step, args=(a, c, mode)))(
        per_replica(probs[None]), per_replica(values[None]))
    masks, thrs = np.concatenate(local(res[0])), local(res[1])
    tot = {k: local(v) for k, v in res[2].items()}
    conf = {k: local(v) for k, v in res[3].items()}
    out[mode] = dict(mask=masks.tolist(), thresholds=[float(t) for t in thrs],
                     mean=[float(t) for t in tot["mean"]], masked=[float(t) for t in tot["masked"]],
                     conf_max=[float(t) for t in conf["monitors/confidence_max"]])
out["want"] = dict(mask=mask_1.tolist(), threshold=float(thr_1), mean=float(values.mean()),
                   masked=float(want_masked), conf_max=float(probs.max()))
print("RESULT " + json.dumps(out))
"""


def test_cross_replica_helpers_equal_one_device_on_the_global_batch():
    lines = [l for l in run_script(SCRIPT, devices=2, timeout=300).splitlines()
             if l.startswith("RESULT ")]
    import json
    out = json.loads(lines[0][len("RESULT "):])
    assert out["bn"] == "ok" and out["mix"] == "ok"
    want, glob, local = out["want"], out["global"], out["per_replica"]
    assert glob["mask"] == want["mask"]                       # 16 rows, percentile over all
    assert glob["thresholds"] == [want["threshold"]] * 2
    np.testing.assert_allclose(glob["mean"], [want["mean"]] * 2, rtol=1e-6)
    np.testing.assert_allclose(glob["masked"], [want["masked"]] * 2, rtol=1e-6)
    np.testing.assert_allclose(glob["conf_max"], [want["conf_max"]] * 2, rtol=1e-6)
    # The released per-replica variant: each replica takes its own percentile, so the
    # unsure replica 0 keeps rows that the global percentile drops.
    assert local["mask"] != want["mask"]
    assert local["thresholds"][0] != local["thresholds"][1]
    assert sum(local["mask"][:8]) > sum(want["mask"][:8])
    np.testing.assert_allclose(local["mean"], [want["mean"]] * 2, rtol=1e-6)   # same rows count
    assert abs(local["masked"][0] - want["masked"]) > 1e-4
