"""Π-model and VAT (issue 11): the VAT ops, label smoothing and the --loss_nclass scale on
hand-computed values, each step against an independent reference on a tiny Wide ResNet,
smoke runs through the command-line path (registry.launch)."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from libml.train import precision_probe
from libml.base import cli
from realmix_tf import vat
from libml.base.errors import UserError
from realmix_tf import registry
from realmix_tf.mean_teacher import MeanTeacher
from realmix_tf.mixmatch import MixMatch
from realmix_tf.pi_model import PiModel
from realmix_tf.realmix import RealMix
from realmix_tf.supervised import labeled_cross_entropy
from realmix_tf.vat import VAT
from tests.fixtures_data import make_ssl_dataset, test_options
from tests.reference import softmax
from tests.test_baselines import NCLASS, SIZE, TINY, assert_few_steps_learn, batch, bn_stats, clone, xe

MODES = ["eager", "function", "jit"]


def run(mode, fn, *args):
    if mode != "eager":
        fn = tf.function(fn, jit_compile=(mode == "jit"))
    return fn(*[tf.convert_to_tensor(a) for a in args]).numpy()


# ---------------------------------------------------------------------------------------------
# Ops on hand-computed values

@pytest.mark.parametrize("mode", MODES)
def test_normalize_perturbation(mode):
    # [3, -4] / max 4 = [0.75, -1]; / sqrt(1e-6 + 1.5625) = [0.6, -0.8] (to 3e-7). Each example
    # on its own: [0, 2] -> [0, 1] / sqrt(1 + 1e-6).
    d = np.float32([[[3.0], [-4.0]], [[0.0], [2.0]]])
    out = run(mode, vat.normalize_perturbation, d)
    np.testing.assert_allclose(out[..., 0], [[0.6, -0.8], [0.0, 1.0]], atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_kl_and_entropy(mode):
    # p = [1/2, 1/4, 1/4], q uniform: KL(p||q) = 1/2 ln 1.5 + 1/2 ln 0.75 = 0.0588915;
    # KL(q||p) = 1/3 (ln(2/3) + 2 ln(4/3)) = 0.0566330; H(p) = 1/2 ln 2 + 1/2 ln 4 = 1.0397208.
    p = np.log(np.float32([[0.5, 0.25, 0.25]]))
    q = np.float32([[7.0, 7.0, 7.0]])
    np.testing.assert_allclose(run(mode, vat.kl_divergence_from_logits, p, q), [0.0588915], atol=1e-6)
    np.testing.assert_allclose(run(mode, vat.kl_divergence_from_logits, q, p), [0.0566330], atol=1e-6)
    np.testing.assert_allclose(run(mode, vat.entropy_from_logits, p), [1.0397208], atol=1e-6)
    np.testing.assert_allclose(run(mode, vat.entropy_from_logits, q), [np.log(3)], atol=1e-6)


def test_vat_loss_is_kl_student_to_teacher_gradient_to_student_only():
    student, teacher = tf.Variable(np.log([[0.5, 0.25, 0.25]])), tf.Variable([[7.0, 7.0, 7.0]], dtype=tf.float64)
    with tf.GradientTape() as tape:
        loss = vat.vat_loss(student, teacher)
    np.testing.assert_allclose(float(loss), 0.0588915, atol=1e-6)
    g_student, g_teacher = tape.gradient(loss, [student, teacher])
    assert g_teacher is None and np.abs(g_student.numpy()).sum() > 0


def test_perturbation_two_classes_hand_computed():
    # forward = identity on 2 "pixels" = 2 logits, x = 0: q = [1/2, 1/2]; noise [1, 0] ->
    # d = xi [1, 0]; p(x + d) - q = [xi/4, -xi/4] (to O(xi^3)), so the direction is [1, -1]
    # and delta = 6 [1, -1] / sqrt(2 + 1e-6) = [4.2426396, -4.2426396].
    x = tf.zeros([1, 2], tf.float64)
    delta = vat.virtual_adversarial_perturbation(x, tf.zeros([1, 2], tf.float64), lambda v: v,
                                                     6.0, tf.constant([[1.0, 0.0]], tf.float64))
    np.testing.assert_allclose(delta.numpy(), [[4.2426396, -4.2426396]], atol=1e-6)


@pytest.mark.parametrize("xi", [1e-6, 1e-2])
def test_perturbation_matches_closed_form_on_a_linear_model(xi):
    # logits = x W: the gradient of mean_b KL(q_b || softmax((x_b + d_b) W)) over d_b is
    # W (p_b - q_b) / B, written here in numpy; the op finds it with a tape.
    rng = np.random.RandomState(0)
    x, w, noise = rng.normal(size=(3, 2, 3)), rng.normal(size=(6, 4)), rng.normal(size=(3, 2, 3))

    def normalize(v):
        v = v / (1e-12 + np.abs(v).reshape(3, -1).max(1)[:, None, None])
        return v / np.sqrt(1e-6 + (v ** 2).reshape(3, -1).sum(1))[:, None, None]

    d = xi * normalize(noise)
    q, p = softmax(x.reshape(3, 6) @ w), softmax((x + d).reshape(3, 6) @ w)
    expected = 2.5 * normalize(((p - q) @ w.T / 3).reshape(3, 2, 3))
    forward = lambda v: tf.reshape(v, [3, 6]) @ tf.constant(w)          # noqa: E731
    delta = vat.virtual_adversarial_perturbation(tf.constant(x), forward(tf.constant(x)), forward,
                                                     2.5, tf.constant(noise), xi)
    np.testing.assert_allclose(delta.numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.sqrt((delta.numpy() ** 2).reshape(3, -1).sum(1)), 2.5, rtol=1e-6)


def test_label_smoothing_hand_computed():
    # targets [1, 0, 0] - 0.1 ([1, 0, 0] - 1/3) = [0.93333, 0.03333, 0.03333]; log-softmax
    # [2, 1, -1] = [-0.349012, -1.349012, -3.349012] (spec §12.2):
    # xe = 0.933333 * 0.349012 + 0.033333 * (1.349012 + 3.349012) = 0.482345.
    logits, labels = tf.constant([[2.0, 1.0, -1.0]]), tf.constant([0], tf.int64)
    np.testing.assert_allclose(float(labeled_cross_entropy(logits, labels, 3, 0.1)), 0.482345, atol=1e-6)
    np.testing.assert_allclose(float(labeled_cross_entropy(logits, labels, 3)), 0.349012, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Steps against an independent reference

def test_pi_model_step_matches_reference():
    model = PiModel(NCLASS, (SIZE, SIZE, 3), train_kimg=1, seed=1, smoothing=0.01, **TINY)
    assert model.consistency_weight == 10.0 and model.hparams()["smoothing"] == 0.01
    model.train_step(batch(2))
    model.step.assign(256)                                   # ramp 0.625 -> weight 6.25
    labeled, unlabeled = batch(3)
    x, labels, u = labeled["image"], labeled["label"].numpy(), unlabeled["image"]
    net = clone(model.net)                                   # the raw weights: teacher and student
    teacher = softmax(net(u[:, 0], training=True, update_bn_stats=False).numpy())
    student = softmax(net(u[:, 1], training=True, update_bn_stats=False).numpy())
    logp = np.log(softmax(net(x, training=True, update_bn_stats=True).numpy()))
    targets = np.eye(NCLASS)[labels] * 0.99 + 0.01 / NCLASS
    loss_xe = -(targets * logp).sum(1).mean()
    loss_pm = ((teacher - student) ** 2).mean()

    out = model.train_step((labeled, unlabeled))
    assert set(out) == {"losses/xe", "losses/pm", "losses/overall", "monitors/consistency_weight"}
    np.testing.assert_allclose(float(out["losses/xe"]), loss_xe, rtol=1e-5)
    np.testing.assert_allclose(float(out["losses/pm"]), loss_pm, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(float(out["losses/overall"]), loss_xe + 6.25 * loss_pm, rtol=1e-5)
    for got, want in zip(bn_stats(model.net), bn_stats(net)):    # labeled pass only
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert_few_steps_learn(model, (labeled, unlabeled), {"losses/xe", "losses/pm"}, out)


def test_vat_step_matches_reference():
    # xi = 1e-2: libml's 1e-6 moves pixels by ~4e-8, where float32 rounding of two differently
    # compiled networks (this reference is eager) decides the direction; the 1e-6 arithmetic
    # is checked in float64 above.
    model = VAT(NCLASS, (SIZE, SIZE, 3), train_kimg=1, seed=2, vat_xi=1e-2, **TINY)
    model.step.assign(256)                                   # ramp 0.625 -> weight 0.1875
    labeled, unlabeled = batch(4)
    x, labels, y = labeled["image"], labeled["label"].numpy(), unlabeled["image"][:, 0]
    net = clone(model.net)
    logits_y = net(y, training=True, update_bn_stats=False)
    noise = tf.random.stateless_normal(y.shape, model.step_seed(tf.constant(256, tf.int64)))
    d = 1e-2 * vat.normalize_perturbation(noise)
    with tf.GradientTape() as tape:                          # the power iteration, written out
        tape.watch(d)
        p = tf.nn.softmax(logits_y)
        logq = tf.nn.log_softmax(net(y + d, training=True, update_bn_stats=False))
        kl = tf.reduce_mean(tf.reduce_sum(p * (tf.math.log(p) - logq), 1))
    delta = 6.0 * vat.normalize_perturbation(tape.gradient(kl, d))
    student = softmax(net(y + delta, training=True, update_bn_stats=False).numpy())
    teacher = softmax(logits_y.numpy())
    loss_vat = (student * (np.log(student) - np.log(teacher))).sum(1).mean()
    loss_ent = -(teacher * np.log(teacher)).sum(1).mean()
    loss_xe = xe(net(x, training=True, update_bn_stats=True).numpy(), labels)

    out = model.train_step((labeled, unlabeled))
    assert set(out) == {"losses/xe", "losses/vat", "losses/entmin", "losses/overall",
                        "monitors/vat_weight"}
    np.testing.assert_allclose(float(out["losses/xe"]), loss_xe, rtol=1e-5)
    np.testing.assert_allclose(float(out["losses/entmin"]), loss_ent, rtol=1e-5)
    np.testing.assert_allclose(float(out["losses/vat"]), loss_vat, rtol=1e-3, atol=1e-7)
    assert loss_vat > 1e-5                    # the perturbation changed the predictions
    np.testing.assert_allclose(float(out["losses/overall"]),
                               loss_xe + 0.1875 * loss_vat + 0.06 * loss_ent, rtol=1e-4)
    for got, want in zip(bn_stats(model.net), bn_stats(net)):    # labeled pass only
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert_few_steps_learn(model, (labeled, unlabeled), {"losses/xe", "losses/vat"}, out)


@pytest.mark.parametrize("kwargs", [dict(vat=-1.0), dict(vat_eps=0.0), dict(vat_xi=0.0),
                                    dict(entmin_weight=-0.1), dict(warmup_pos=2.0),
                                    dict(smoothing=1.0), dict(precision="mixed_bfloat16")])
def test_vat_bad_hyper_parameters(kwargs):
    with pytest.raises(UserError):
        VAT(NCLASS, (SIZE, SIZE, 3), **TINY, **kwargs)


# ---------------------------------------------------------------------------------------------
# --loss_nclass: the released loss scale of the 6-class mismatch sets (10-way head)

def test_loss_nclass_gives_the_zero_padded_ten_way_scale():
    # Guesses and predictions on 6 classes, and the same zero-padded to 10 classes (4 logits
    # at -1e9: probability 0). Every extra entry adds 0 to the squared error, so the 10-way
    # mean is exactly 6/10 of the 6-way one; --loss_nclass=10 on the 6-way head gives it.
    rng = np.random.RandomState(0)
    logits6 = rng.normal(size=(8, 6)).astype(np.float32)
    targets6 = softmax(rng.normal(size=(8, 6))).astype(np.float32)
    logits10 = np.concatenate([logits6, np.full((8, 4), -1e9, np.float32)], 1)
    targets10 = np.concatenate([targets6, np.zeros((8, 4), np.float32)], 1)
    plain = MixMatch(6, (SIZE, SIZE, 3), **TINY)
    released = MixMatch(6, (SIZE, SIZE, 3), loss_nclass=10, **TINY)
    ten_way = MixMatch(10, (SIZE, SIZE, 3), **TINY)
    l6 = float(plain.unlabeled_loss(logits6, targets6)[0])
    l10 = float(ten_way.unlabeled_loss(logits10, targets10)[0])
    np.testing.assert_allclose(l6, ((targets6 - softmax(logits6)) ** 2).mean(), rtol=1e-6)
    np.testing.assert_allclose(l10, 0.6 * l6, rtol=1e-6)
    np.testing.assert_allclose(float(released.unlabeled_loss(logits6, targets6)[0]), l10, rtol=1e-6)
    assert released.hparams()["loss_nclass"] == 10 and "loss_nclass" not in plain.hparams()
    # The OOD mask divides by kept x loss_nclass: RealMix at gamma 0.5 equals the 10-way run.
    masked = [float(m.unlabeled_loss(lg, t)[0]) for m, lg, t in (
        (RealMix(6, (SIZE, SIZE, 3), gamma=0.5, loss_nclass=10, **TINY), logits6, targets6),
        (RealMix(10, (SIZE, SIZE, 3), gamma=0.5, **TINY), logits10, targets10))]
    np.testing.assert_allclose(masked[0], masked[1], rtol=1e-6)
    with pytest.raises(UserError, match="loss_nclass"):
        MixMatch(6, (SIZE, SIZE, 3), loss_nclass=4, **TINY)


def test_loss_nclass_scales_the_mean_teacher_consistency():
    # Same seed, same weights, same batch: the consistency term is 6/10 of the plain one.
    data = batch(5)
    outs = [MeanTeacher(6, (SIZE, SIZE, 3), seed=4, loss_nclass=n, **TINY).train_step(data)
            for n in (0, 10)]
    np.testing.assert_allclose(float(outs[1]["losses/mt"]), 0.6 * float(outs[0]["losses/mt"]),
                               rtol=1e-5)
    np.testing.assert_allclose(float(outs[1]["losses/xe"]), float(outs[0]["losses/xe"]), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Command lines and smoke runs

def test_pi_model_and_vat_flags():
    fv = registry.define_flags("pi_model")
    cli.parse(fv, ["pi_model", "--smoothing=0.01", "--loss_nclass=10"])
    assert registry.configure("pi_model", fv).algorithm == dict(
        consistency_weight=10.0, warmup_pos=0.4, smoothing=0.01, loss_nclass=10)
    fv = registry.define_flags("vat")
    cli.parse(fv, ["vat"])
    assert registry.configure("vat", fv).algorithm == dict(
        vat=0.3, vat_eps=6.0, vat_xi=1e-6, entmin_weight=0.06, warmup_pos=0.4, smoothing=0.0)
    for name, arg in (("vat", "--vat_eps=0"), ("vat", "--smoothing=1"), ("pi_model", "--warmup_pos=3"),
                      ("fully_supervised", "--smoothing=-0.1")):
        fv = registry.define_flags(name)
        cli.parse(fv, [name, arg])
        with pytest.raises(UserError, match=arg.split("=")[0]):
            registry.configure(name, fv)
    with pytest.raises(UserError):                         # VAT has no --loss_nclass
        cli.parse(registry.define_flags("vat"), ["vat", "--loss_nclass=10"])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_ssl_dataset(tmp_path_factory.mktemp("pi_vat"), nlabeled=16, nunlabeled=48,
                            nvalid=8, ntest=16, size=8)


@pytest.mark.parametrize("name,prefix", [("pi_model", "PiModel"), ("vat", "VAT")])
def test_smoke_run(toy, tmp_path, name, prefix):
    flags_ = dict(dataset=toy.name, data_dir=toy.root, train_dir=str(tmp_path), batch=8,
                  filters=8, repeat=1, train_kimg=1 / 32, report_kimg=1 / 64, save_kimg=1 / 32,
                  export=False, progress=False, short_run_scaling=True, smoothing=0.01)
    stats = registry.launch(name, flags_, data_options=test_options())
    assert os.path.basename(stats["run_dir"]).startswith(prefix + "_")
    assert "smoothing0.01" in stats["run_dir"] and stats["reports"] == 2
    with open(os.path.join(stats["run_dir"], "args", "args.json")) as f:
        assert json.load(f)["algorithm"] == prefix
    if name == "vat":
        with pytest.raises(UserError, match="mixed_precision=none"):
            registry.launch(name, dict(flags_, mixed_precision="bf16", train_dir=str(tmp_path / "bf16")),
                            data_options=test_options())


def test_vat_auto_precision_is_float32_even_where_auto_means_bf16(monkeypatch):
    import types

    from libml.train.config import TrainConfig
    monkeypatch.setattr(precision_probe, "auto_precision", lambda: ("mixed_bfloat16", "AMX (test)"))
    info = types.SimpleNamespace(nclass=NCLASS, shape=(SIZE, SIZE, 3))
    config = TrainConfig(mixed_precision="auto", filters=8, repeat=1)
    assert config.precision() == "mixed_bfloat16"
    assert VAT.from_config(info, config).precision == "float32"
    with pytest.raises(UserError, match="mixed_precision=none"):
        VAT.from_config(info, TrainConfig(mixed_precision="bf16", filters=8, repeat=1))
