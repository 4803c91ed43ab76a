"""--gamma=auto in training: the tensor-gamma mask, the flag, TensorBoard and stats/ records,
exact resume of the estimate, and a two-replica MirroredStrategy run without retracing."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from realmix_tf import gamma_auto

from libml.nn import ops
from realmix_tf import ood_share

from libml.run import summaries
from libml.train.config import TrainConfig
from libml.data.pipeline import load_ssl
from libml.base.errors import UserError
from realmix_tf.realmix import RealMix
from tests.fixtures_data import make_ssl_dataset, test_options, toy_images, write_set
from tests.fixtures_train import run
from tests.two_devices import run_script, toy_mirrored

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORTS = [32, 64, 96, 128]


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 0.9])
def test_mask_with_a_tensor_gamma_equals_the_float_rule(gamma):
    probs = tf.nn.softmax(tf.random.stateless_normal([37, 5], seed=[1, 2]) * 3)
    want_mask, want_threshold = ops.ood_mask(probs, gamma, return_threshold=True)
    variable = tf.Variable(gamma, dtype=tf.float32)
    got_mask, got_threshold = tf.function(
        lambda: ops.ood_mask(probs, tf.convert_to_tensor(variable), return_threshold=True))()
    np.testing.assert_array_equal(got_mask.numpy(), want_mask.numpy())
    assert float(got_threshold) == pytest.approx(float(want_threshold))


def test_gamma_flag_accepts_auto_and_rejects_words():
    assert gamma_auto.parse_gamma("auto") == "auto" and gamma_auto.parse_gamma(" AUTO ") == "auto"
    assert gamma_auto.parse_gamma("0.6") == 0.6
    with pytest.raises(UserError, match="--gamma='often' is not a number"):
        gamma_auto.parse_gamma("often")
    with pytest.raises(UserError, match="out of range"):
        RealMix.check_hparams(gamma=1.5)
    RealMix.check_hparams(gamma="auto")
    assert RealMix(3, (8, 8, 3), filters=4, repeat=1, gamma="auto").hparams()["gamma"] == "auto"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_ssl_dataset(tmp_path_factory.mktemp("data"), nlabeled=16, nunlabeled=48, nvalid=8,
                            ntest=16, size=8)


@pytest.fixture(scope="module")
def toy_ood(tmp_path_factory):
    """The toy with 40 % of its unlabeled images in two colours no labeled class has (label -1)."""
    toy = make_ssl_dataset(tmp_path_factory.mktemp("data_ood"), nlabeled=16, nunlabeled=48,
                           nvalid=8, ntest=16, size=8)
    colours = np.arange(48) % 5                     # 3, 4: outliers (palette rows 0-2 = classes)
    images, _ = toy_images(48, 5, 8, 3, seed=4, labels=colours)
    write_set(toy.unlabel_path, images, np.where(colours >= 3, -1, colours), overwrite=True)
    return toy


@pytest.fixture
def quick_trust(monkeypatch):
    """Trust from the second report on, so that the tiny runs move gamma off 0."""
    monkeypatch.setattr(ood_share, "trust_accuracy", lambda nclass: 0.0)


def tiny_config(toy, train_dir, **overrides):
    values = dict(dataset=toy.name, data_dir=toy.root, train_dir=str(train_dir), batch=8,
                  filters=8, repeat=1, train_kimg=0.125, report_kimg=0.03125, save_kimg=0.03125,
                  keep_ckpt=10, eval_batch=16, export=False, progress=False,
                  short_run_scaling=True, algorithm=dict(gamma="auto"))
    values.update(overrides)
    return TrainConfig(**values)


def state(trainer):
    s = trainer.model.gamma_state
    return [float(s.gamma.numpy()), float(s.estimate.numpy()), int(s.streak.numpy()),
            int(s.trusted.numpy())]


def history(trainer):
    with open(os.path.join(trainer.run_dir, gamma_auto.HISTORY_FILE)) as f:
        return json.load(f)


def test_run_logs_gamma_and_estimate_at_every_report(toy, tmp_path, quick_trust):
    trainer = run(tiny_config(toy, tmp_path))
    assert "gammaauto" in os.path.basename(trainer.run_dir)
    events = summaries.read_events(trainer.tf_dir)
    for tag in ("monitors/gamma", "monitors/ood_share_estimate", "monitors/ood_share_raw",
                "monitors/gamma_trusted"):
        assert [step for step, _ in events[tag]] == REPORTS, tag
    records = history(trainer)
    assert [r["step"] for r in records] == REPORTS
    assert [r["trusted"] for r in records] == [False, True, True, True]   # 2 reports to trust
    estimate = 0.0
    for r in records:     # the smoothing rule, from 0: estimate += 0.3 * (raw - estimate)
        if r["trusted"]:
            estimate += 0.3 * (min(max(r["ood_share_raw"], 0.0), 1.0) - estimate)
        assert r["ood_share_estimate"] == pytest.approx(estimate, abs=1e-6)
        assert r["gamma"] == pytest.approx(min(estimate, 0.95) if r["trusted"] else 0.0, abs=1e-6)
        # 16 labeled images (leave one out) + 8 validation images with a label; trust on the
        # labeled images (fewer than 20 validation images)
        # window = every 3rd of the 40 training unlabeled records (eval_batch 16), from report % 3
        assert r["n_window"] == len(range(r["step"] // 32 % 3, 40, 3))
        assert r["reference"] == "labeled+valid" and r["n_reference"] == 24
        assert r["trust_set"] == "train_labeled"
    tb = dict(events["monitors/gamma"])
    assert [float(tb[s]) for s in REPORTS] == pytest.approx([r["gamma"] for r in records], abs=1e-6)
    assert state(trainer)[0] == pytest.approx(records[-1]["gamma"], abs=1e-6)
    # gamma is a variable read by the step: one trace for the whole run
    assert trainer._train_fn.experimental_get_tracing_count() == 1


def test_windows_interleave_and_cover_the_unlabeled_set(toy):
    """40 training unlabeled records (48 minus 8 validation), windows of 16: stride 3, so
    windows 0, 1, 2 read records 0, 3, 6, ... / 1, 4, ... / 2, 5, ...; window 3 = window 0."""
    data = load_ssl(toy.name, toy.root, options=test_options())
    images = toy.unlabeled[0][8:].astype(np.float32) * (2 / 255) - 1
    seen = []
    for index in range(4):
        (batch,) = list(data.unlabeled_window(16, index))
        rows = np.arange(index % 3, 40, 3)[:16]
        np.testing.assert_allclose(batch["image"].numpy(), images[rows], atol=1e-6)
        seen += rows.tolist() if index < 3 else []
    assert sorted(seen) == list(range(40))
    assert gamma_auto.GammaAutoHook.window_index(96, 32) == 3


class _Model:
    def __init__(self):
        self.gamma_state = gamma_auto.GammaState()


def test_hook_estimates_the_window_share_from_features(tmp_path):
    """One report on synthetic pooled features: 3 in-distribution classes, outliers pointing
    elsewhere; the window holds 40 % outliers; validation images without a label (outliers)
    stay out of the reference."""
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 1, (5, 16)) ** 4

    def images(classes, n):
        return np.abs(centres[rng.choice(classes, n)] + rng.normal(0, 0.02, (n, 16))).astype("f4")

    window = np.concatenate([images([3, 4], 200), images([0, 1, 2], 300)])
    kept = {"train_labeled": dict(features=images([0, 1, 2], 60), labels=np.arange(60) % 3),
            "valid": dict(features=np.concatenate([images([0, 1, 2], 40), images([3, 4], 10)]),
                          labels=np.r_[np.arange(40) % 3, -np.ones(10, np.int64)])}
    hook = gamma_auto.GammaAutoHook(_Model(), nclass=3, run_dir=str(tmp_path))
    hook.auto.trusted = True
    hook.state.store(hook.auto)
    record = hook.report(512, window, kept, dict(valid=90.0, train_labeled=100.0))
    # the prototype score, the labeled reference and the 40 labeled validation images
    scores = ood_share.reference_scores(kept["train_labeled"]["features"], kept["train_labeled"]["labels"],
                                        window, kept["valid"]["features"][:40], nclass=3)
    assert scores.name == "labeled+valid" and record["reference"] == scores.name
    assert record["n_reference"] == 100 and record["score"] == "prototype"
    assert record["calibration_shift"] == scores.shift == 0.0
    assert record["trust_set"] == "valid" and record["reference_accuracy"] == 0.9
    assert record["feature_accuracy"] is None
    assert record["ood_share_raw"] == ood_share.estimate_scores(scores, seed=512).share
    assert record["ood_share_raw"] == pytest.approx(0.4, abs=0.1)
    assert record["gamma"] == pytest.approx(0.3 * record["ood_share_raw"])   # smoothed from 0
    assert float(hook.state.gamma.numpy()) == pytest.approx(record["gamma"])
    assert history(types.SimpleNamespace(run_dir=str(tmp_path))) == [json.loads(json.dumps(record))]


def test_trust_with_few_validation_images_waits_for_features_that_separate_the_classes(tmp_path):
    """100 % mismatch: no validation image has a label, the classifier already fits the
    labeled images (100 %). Before issue 21 the gate opened at the second report; now it waits
    until the labeled images' leave-one-out nearest-prototype accuracy in feature space
    reaches the trust accuracy too."""
    rng = np.random.default_rng(1)
    labels = np.arange(60) % 6
    centres = rng.uniform(0, 1, (6, 16)) ** 4
    organised = np.abs(centres[labels] + rng.normal(0, 0.05, (60, 16))).astype("f4")
    scattered = np.abs(rng.normal(0, 1, (60, 16))).astype("f4")
    window = np.abs(rng.normal(0, 1, (100, 16))).astype("f4")
    valid = dict(features=window[:30], labels=-np.ones(30, np.int64))
    hook = gamma_auto.GammaAutoHook(_Model(), nclass=6, run_dir=str(tmp_path))
    trusted = []
    for step, features in zip((32, 64, 96, 128), (scattered, scattered, organised, organised)):
        kept = {"train_labeled": dict(features=features, labels=labels), "valid": valid}
        record = hook.report(step, window, kept, dict(valid=float("nan"), train_labeled=100.0))
        assert record["trust_set"] == "train_labeled"
        assert record["reference_accuracy"] == record["feature_accuracy"]
        trusted.append(record["trusted"])
    assert hook.history[0]["feature_accuracy"] < 0.4 and hook.history[2]["feature_accuracy"] == 1.0
    assert trusted == [False, False, False, True]
    assert hook.history[-1]["ood_share_raw"] == pytest.approx(1.0, abs=0.1)   # all outliers


def test_resume_keeps_the_estimate(toy_ood, tmp_path, quick_trust):
    tf_config.enable_op_determinism()
    try:
        reference = run(tiny_config(toy_ood, tmp_path / "ref"))
        # 10 steps = 80 images: reports at 32 and 64 and their checkpoints survive.
        stopped = run(tiny_config(toy_ood, tmp_path / "cut"), stop_after_steps=10)
        assert [r["step"] for r in history(stopped)] == [32, 64]
        resumed = run(tiny_config(toy_ood, tmp_path / "cut"))
    finally:
        tf_config.disable_op_determinism()
    assert state(resumed) == state(reference)
    assert history(resumed) == history(reference)
    # a real estimate: 16 of the 40 training unlabeled images are outliers (0.33-0.69 here:
    # windows of 13-14 images, a reference of 22 cut in halves, a model of 16 steps; the
    # estimator before issue 21 gave 0.38-0.59)
    raw = [r["ood_share_raw"] for r in history(reference)]
    assert all(abs(r - 0.4) <= 0.3 for r in raw), raw
    assert all(r["n_reference"] == 16 + 6 for r in history(reference))   # 6 of 8 valid labeled


MIRRORED_SCRIPT = """
import json

with strategy.scope():
    model = RealMix(4, (8, 8, 3), filters=4, repeat=1, warmup_kimg=0, gamma="auto")
batches = iter(strategy.experimental_distribute_dataset(data))
step = tf.function(lambda d: strategy.run(model.train_step, args=(d,)))
ratios = []
for gamma in (0.0, 0.5, 0.25):
    model.gamma_state.gamma.assign(gamma)          # what the report hook does, from the host
    out = step(next(batches))
    ratios.append([float(v) for v in out["monitors/mask_ratio"].values])
print("RESULT", json.dumps(dict(ratios=ratios, traces=step.experimental_get_tracing_count(),
      replicas=[float(v.numpy()) for v in model.gamma_state.gamma.value.values])))
"""


def test_two_replica_mirrored_strategy_reads_gamma_without_retracing(tmp_path):
    """gamma set from the host between steps reaches both replicas' masks; one trace."""
    stdout = run_script(toy_mirrored(16) + MIRRORED_SCRIPT)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT")]
    out = json.loads(lines[0].split(" ", 1)[1])
    assert out["traces"] == 1 and out["replicas"] == [0.25, 0.25]
    # Each replica masks floor(gamma * 16) + ties of its 16 mixed unlabeled rows (2 views x 8).
    for (gamma, ratios) in zip((0.0, 0.5, 0.25), out["ratios"]):
        assert len(ratios) == 2
        for ratio in ratios:
            assert ratio == 1.0 if gamma == 0 else 1 - gamma - 1 / 16 - 1e-6 <= ratio <= 1 - gamma + 1e-6


@pytest.mark.slow
def test_two_devices_cli_gathers_window_and_reference_features(toy, tmp_path):
    """--gamma=auto on 2 logical CPU devices: every report estimates from the whole window and
    the whole reference, gathered from both replicas."""
    args = [sys.executable, "-m", "realmix_tf.realmix", f"--dataset={toy.name}",
            f"--data_dir={toy.root}", f"--train_dir={tmp_path}", "--batch=8", "--filters=8",
            "--repeat=1", "--train_kimg=0.125", "--report_kimg=0.0625", "--save_kimg=0.0625",
            "--eval_batch=16", "--noprogress", "--short_run_scaling", "--nodata_autotune",
            "--noexport", "--gamma=auto"]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=400,
                            env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2",
                                 "REALMIX_CPU_DEVICES": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 x CPU" in result.stderr
    (path,) = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path) for f in fs if f == "gamma_auto.json"]
    with open(path) as f:
        records = json.load(f)
    assert [r["step"] for r in records] == [64, 128]
    for r in records:
        assert r["n_window"] == 13 and r["n_reference"] == 24 and r["reference"] == "labeled+valid"
        assert 0.0 <= r["ood_share_raw"] <= 1.0
