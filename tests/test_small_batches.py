"""Evaluation of sets of every size on every device count (issue 26): a short last batch used
to leave a device 0 rows (`Incompatible shapes: [8] vs. [0,32,32,16]` under oneDNN) or 1 row
(a segfault under oneDNN); batches are now padded so each device gets at least 2 rows, and
the padding is neither counted nor returned. A training batch of 1 row per CPU device is
refused in one line."""
import json

import pytest

from libml.train import devices as distribute
from libml.base.errors import UserError
from tests.two_devices import run_script

SCRIPT = """
import json, tempfile
import numpy as np
from libml.train import devices as distribute
from libml.run.checkpoints import make_checkpoint, read_model
from libml.train.evaluate import Evaluator
from libml.base.machine import onednn_enabled
from realmix_tf.realmix import RealMix

SIZE, NCLASS, BATCH = 8, 3, 4
rng = np.random.RandomState(0)
SETS = {f"n{n}": (rng.uniform(-1, 1, (n, SIZE, SIZE, 3)).astype("f4"),
                  rng.randint(0, NCLASS, n).astype("i8")) for n in (1, 2, 3, 5, 9)}
SETS["n3"][1][0] = SETS["n9"][1][5] = -1       # unknown classes: not scored, but returned

def build():
    return RealMix(NCLASS, (SIZE, SIZE, 3), filters=4, repeat=1)

plain = build()
plain.classify(tf.zeros([2, SIZE, SIZE, 3]))
path = make_checkpoint(plain).write(tempfile.mkdtemp() + "/ckpt")
# The reference: every set in one pass of 16 rows (the set, then zeros), no strategy.
reference = {}
for name, (x, y) in SETS.items():
    rows = np.concatenate([x, np.zeros((16 - len(x), SIZE, SIZE, 3), "f4")])
    probs, features = plain.classify(tf.constant(rows), ema=True, features=True)
    probs, features = probs.numpy()[:len(x)], features.numpy()[:len(x)]
    known = y >= 0
    reference[name] = dict(accuracy=100.0 * float(np.mean(probs.argmax(1)[known] == y[known])),
                           probs=probs.tolist(), features=features.tolist())

result = dict(onednn=onednn_enabled())
for label, strategy in (("two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])),
                        ("one", tf.distribute.get_strategy())):
    with strategy.scope():
        model = build()
    read_model(model, path)
    def datasets():
        return {name: distribute.distribute_eval(strategy, tf.data.Dataset.from_tensor_slices(
                    {"image": x, "label": y}).batch(BATCH)) for name, (x, y) in SETS.items()}
    evaluator = Evaluator(strategy, model, datasets, NCLASS)
    accuracy, kept = evaluator.evaluate(ema=True, sets=tuple(SETS), keep=tuple(SETS))
    result[label] = {name: dict(accuracy=accuracy[name], probs=kept[name]["probs"].tolist(),
                                features=kept[name]["features"].tolist(),
                                labels=kept[name]["labels"].tolist()) for name in SETS}
result["reference"] = reference
result["labels"] = {name: y.tolist() for name, (x, y) in SETS.items()}
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def evaluated():
    return json.loads(run_script(SCRIPT, devices=2, timeout=400).strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("devices", ["two", "one"])
def test_sets_of_every_size_evaluate_as_one_pass(evaluated, devices):
    import numpy as np
    assert evaluated["onednn"]             # the kernels that failed on 0 and 1 rows
    for name, want in evaluated["reference"].items():
        got = evaluated[devices][name]
        assert got["labels"] == evaluated["labels"][name], name    # padding dropped, order kept
        assert got["accuracy"] == pytest.approx(want["accuracy"]), name
        np.testing.assert_allclose(got["probs"], want["probs"], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(got["features"], want["features"], atol=1e-4, err_msg=name)


def test_pad_batches_gives_every_device_two_rows_or_more():
    import tensorflow as tf
    data = tf.data.Dataset.from_tensor_slices({"image": tf.ones([5, 2]),
                                               "label": tf.constant([0, 1, 2, 0, 1], tf.int64)})
    batches = list(distribute.pad_batches(data.batch(4), 3).as_numpy_iterator())
    assert [len(b["label"]) for b in batches] == [6, 6]
    assert batches[1]["label"].tolist() == [1, -1, -1, -1, -1, -1]
    assert batches[1]["real"].tolist() == [True] + [False] * 5
    assert batches[1]["image"][1:].sum() == 0 and batches[0]["image"][:4].sum() == 8


def test_training_batch_of_one_row_per_cpu_device_is_refused():
    distribute.check_train_batch(4, 2, on_cpu=True, onednn=True)
    distribute.check_train_batch(2, 2, on_cpu=False, onednn=True)      # GPUs: no oneDNN
    distribute.check_train_batch(2, 2, on_cpu=True, onednn=False)
    with pytest.raises(UserError, match=r"--batch=2 gives 1 row per device on 2 CPU device\(s\), "
                                        r"which crashes .* use --batch=4 or more"):
        distribute.check_train_batch(2, 2, on_cpu=True, onednn=True)
    with pytest.raises(UserError, match="--batch=8 does not split over 3 devices"):
        distribute.check_train_batch(8, 3, on_cpu=True, onednn=True)
