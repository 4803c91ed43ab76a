"""One training step on 2 logical CPU devices with B rows each equals one device on the global
batch 2B (issues 10, 20): losses, gradients and weights after 3 steps, for every algorithm of
the registry (RealMix with gamma > 0 and TSA), each fed the data it declares; the released
per-replica variant differs."""
import json

import numpy as np
import pytest

from realmix_tf import registry
from tests.two_devices import run_script

# Hyper-parameters a short test needs, by name, for whichever algorithm declares them (ramps
# at full weight, the OOD mask and TSA on, OpenMatch's FixMatch loss from the start; VAT's
# finite-difference step above float32 rounding: at libml's 1e-6 the power iteration's
# direction is rounding noise, different for any two summation orders, as test_pi_vat
# explains): every registered algorithm is built from the registry.
TEST_HPARAMS = dict(warmup_kimg=0, w_match=10.0, gamma=0.5, tsa="linear", train_kimg=0.0625,
                    warmup_pos=0.5, vat_xi=1e-1, start_fix_kimg=0,    # OpenMatch: L_fix on
                    op_start_kimg=0, p_cutoff=0.0, q_cutoff=0.0)   # IOMatch: every term on
# Settings of a registered algorithm that change its step, checked too.
VARIANTS = {"realmix_prototype": ("realmix", dict(ood_score="prototype"))}

SCRIPT = """
import json, threading
import numpy as np
from realmix_tf import registry

R, b, SIZE, NCLASS = 2, 4, 8, 4
B = R * b
TEST_HPARAMS = {test_hparams!r}
VARIANTS = {variants!r}
rng = np.random.RandomState(0)
x = rng.uniform(-1, 1, (B, SIZE, SIZE, 3)).astype("f4")
y = rng.randint(0, NCLASS, B).astype("i8")
probe_x = rng.uniform(-1, 1, (B, SIZE, SIZE, 3)).astype("f4")
CLASSES = {{}}
for name in registry.REGISTRY:
    cls = registry.get(name).model_class()
    table = cls.hparam_table()
    CLASSES[name] = (cls, {{k: v for k, v in TEST_HPARAMS.items() if k in table}})
for name, (base, extra) in VARIANTS.items():
    CLASSES[name] = (CLASSES[base][0], dict(CLASSES[base][1], **extra))
captured = {{}}

def make(algorithm, mode):
    cls, kwargs = CLASSES[algorithm]

    class Probe(cls):
        def apply_update(self, grads):           # keeps each replica's gradients
            captured[threading.get_ident()] = list(grads)
            return super().apply_update(grads)

    return Probe(NCLASS, (SIZE, SIZE, 3), filters=4, repeat=1, lr=0.01, replica_mode=mode, **kwargs)

def step_and_grads(model, data):
    out = model.train_step(data)
    return out, captured.pop(threading.get_ident())

def summary(model, outs):
    net = model.net
    return dict(
        scalars=[{{k: float(v) for k, v in o.items()}} for o, _ in outs],
        grads=[[g.numpy().tolist() for g in gs] for _, gs in outs],
        names=[v.path for v in model._trained],          # the net's, then any heads' (IOMatch)
        weights=[v.numpy().tolist() for v in model._trained + [s for s, _ in model._ema_pairs]],
        logits=net(tf.constant(probe_x), training=True, update_bn_stats=False).numpy().tolist(),
        step=int(model.step.numpy()))

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
def part(a):
    n = len(a) // R
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(a[ctx.replica_id_in_sync_group * n:(ctx.replica_id_in_sync_group + 1) * n]))
results = {{}}
for algorithm in CLASSES:
    one = make(algorithm, "global")
    spec = one.unlabeled                         # the declared data: [B*ratio, V, ...] or none
    u = None if spec is None else rng.uniform(
        -1, 1, (spec.rows(B), len(spec.views), SIZE, SIZE, 3)).astype("f4")
    data = ({{"image": tf.constant(x), "label": tf.constant(y)}},
            None if u is None else {{"image": tf.constant(u)}})
    parts = ({{"image": part(x), "label": part(y)}}, None if u is None else {{"image": part(u)}})
    fn = tf.function(lambda d: step_and_grads(one, d))
    result = dict(one=summary(one, [fn(data) for _ in range(3)]))
    for mode in ("global", "per_replica"):
        with strategy.scope():
            model = make(algorithm, mode)
        @tf.function
        def run(d):
            out, grads = strategy.run(step_and_grads, args=(model, d))
            return ({{k: strategy.reduce("MEAN", v, axis=None) for k, v in out.items()}},
                    [strategy.reduce("SUM", g, axis=None) for g in grads])
        outs = [run(parts) for _ in range(3)]
        with strategy.scope():
            result[mode] = summary(model, outs)
    results[algorithm] = result
print("RESULT " + json.dumps(results))
"""


def conv_bias(name):
    # Conv biases feed a BatchNorm, which removes them: their true gradient is 0 and Adam turns
    # the float32 noise of that 0 into +-lr steps, different on each device layout. They change
    # neither the logits nor the losses (checked below).
    return name.endswith("bias") and "classifier" not in name


@pytest.fixture(scope="module")
def results():
    """Every registered algorithm in one process (TensorFlow starts once): ~2 min on 2 cores."""
    out = run_script(SCRIPT.format(test_hparams=TEST_HPARAMS, variants=VARIANTS), devices=2, timeout=900)
    return json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])


@pytest.mark.parametrize("algorithm", sorted(registry.REGISTRY) + sorted(VARIANTS))
def test_two_replicas_equal_one_device_on_the_global_batch(results, algorithm):
    result = results[algorithm]
    one, two, per_replica = result["one"], result["global"], result["per_replica"]
    assert one["step"] == two["step"] == 3 * 8
    names = one["names"]
    for s1, s2 in zip(one["scalars"], two["scalars"]):
        assert set(s1) == set(s2)
        for tag in s1:
            # VAT's power iteration divides float32 rounding by xi: its loss agrees to 1e-4.
            rel = 1e-4 if tag == "losses/vat" else 1e-5
            assert s2[tag] == pytest.approx(s1[tag], rel=rel, abs=1e-6), tag
    for g1, g2 in zip(one["grads"], two["grads"]):          # summed over the 2 replicas
        for name, a, c in zip(names, g1, g2):
            a, c = np.asarray(a), np.asarray(c)
            # A conv bias's true gradient is 0 (conv_bias): float32 noise, ~1e-6 with OpenMatch's
            # five loss terms.
            atol = 1e-5 if conv_bias(name) else 1e-6
            np.testing.assert_allclose(c, a, rtol=1e-4, atol=atol, err_msg=name)
    n = len(names)
    for i, (w1, w2) in enumerate(zip(one["weights"], two["weights"])):
        if not conv_bias(names[i % n]):
            # Adam divides by sqrt(v): float32 noise of small gradients grows to ~1e-6.
            np.testing.assert_allclose(w2, w1, rtol=1e-4, atol=2e-5, err_msg=names[i % n])
    np.testing.assert_allclose(two["logits"], one["logits"], rtol=1e-4, atol=1e-5)
    # The released per-replica variant (BN, MixUp partners, percentile within each replica)
    # computes something else on the same data.
    first = one["scalars"][0]
    differs = [t for t in first if abs(per_replica["scalars"][0][t] - first[t]) > 1e-4]
    assert differs, "per_replica mode gave the one-device numbers"
    assert not np.allclose(per_replica["logits"], one["logits"], rtol=1e-3, atol=1e-4)
