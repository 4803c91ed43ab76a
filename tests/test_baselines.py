"""Baselines (supervised, MixMatch, Mean Teacher, fully supervised): losses on hand-computed
values, few-step smoke runs on a tiny Wide ResNet, fully supervised data and the trainer."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from libml.base import cli

from libml.train import config as train_config
from libml.data import pipeline as ssl_data
from libml.base.errors import UserError
from realmix_tf import registry
from realmix_tf.fully_supervised import Config as FullySupervisedConfig, FullySupervised, parse_fully_supervised_name
from realmix_tf.mean_teacher import MeanTeacher
from realmix_tf.mixmatch import MixMatch
from realmix_tf.realmix import RealMix
from realmix_tf.supervised import Supervised, labeled_cross_entropy
from tests.fixtures_data import make_ssl_dataset, test_options, toy_images, write_set
from tests.reference import clone_network, softmax

B, SIZE, NCLASS = 8, 16, 4
TINY = dict(filters=8, repeat=1)


def batch(seed=0):
    rng = np.random.RandomState(seed)
    labeled = {"image": tf.constant(rng.uniform(-1, 1, (B, SIZE, SIZE, 3)), tf.float32),
               "label": tf.constant(rng.randint(0, NCLASS, B), tf.int64)}
    unlabeled = {"image": tf.constant(rng.uniform(-1, 1, (B, 2, SIZE, SIZE, 3)), tf.float32),
                 "label": tf.constant(rng.randint(0, NCLASS, B), tf.int64)}
    return labeled, unlabeled


def clone(net):
    return clone_network(net, (SIZE, SIZE, 3))


def xe(logits, labels):
    return -np.log(softmax(logits)[np.arange(len(labels)), labels]).mean()


def bn_stats(net):
    return [v.numpy().copy() for v in net.non_trainable_variables]


# ---------------------------------------------------------------------------------------------
# Losses on hand-computed values

def test_labeled_cross_entropy_hand_computed():
    # log-softmax([2, 1, -1])[0] = -0.349012 (spec §12.2); uniform logits give ln 3.
    loss = labeled_cross_entropy(tf.constant([[2.0, 1.0, -1.0], [0.0, 0.0, 0.0]]),
                                 tf.constant([0, 2], tf.int64), 3)
    np.testing.assert_allclose(float(loss), (0.349012 + np.log(3)) / 2, atol=1e-6)


def test_supervised_step_loss_and_bn_policy():
    model = Supervised(NCLASS, (SIZE, SIZE, 3), **TINY)
    labeled, unlabeled = batch()
    ref = clone(model.net)
    expected = xe(ref(labeled["image"], training=True, update_bn_stats=True).numpy(),
                  labeled["label"].numpy())
    out = model.train_step((labeled, unlabeled))
    assert set(out) == {"losses/xe"}
    np.testing.assert_allclose(float(out["losses/xe"]), expected, rtol=1e-5)
    for got, want in zip(bn_stats(model.net), bn_stats(ref)):   # moving stats from the batch
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert int(model.step.numpy()) == B and Supervised.unlabeled is None
    assert_few_steps_learn(model, (labeled, unlabeled), {"losses/xe"}, out)


def test_mixmatch_losses_are_the_spec_worked_values():
    model = MixMatch(3, (SIZE, SIZE, 3), **TINY)
    step = tf.constant(0, tf.int64)
    loss_xe, _ = model.labeled_loss(tf.constant([[2.0, 1.0, -1.0]]),
                                    tf.constant([[0.76, 0.09, 0.15]]), step)
    loss_l2u, _ = model.unlabeled_loss(tf.constant([[2.0, 1.0, -1.0], [0.0, 0.0, 1.0]]),
                                       tf.constant([[0.76, 0.09, 0.15], [0.1, 0.2, 0.7]]))
    np.testing.assert_allclose(float(loss_xe), 0.889012, atol=1e-6)          # spec §12.2
    np.testing.assert_allclose(float(loss_l2u), 0.012155, atol=1e-6)         # spec §12.3
    np.testing.assert_allclose(float(loss_xe + 75 * loss_l2u), 1.800638, atol=1e-5)


def test_mixmatch_is_realmix_without_tsa_and_mask():
    data = batch(1)
    mm = MixMatch(NCLASS, (SIZE, SIZE, 3), w_match=10.0, warmup_kimg=0, seed=3, **TINY)
    rm = RealMix(NCLASS, (SIZE, SIZE, 3), w_match=10.0, warmup_kimg=0, seed=3, tsa="none",
                 gamma=0.0, **TINY)
    out_mm, out_rm = mm.train_step(data), rm.train_step(data)
    assert set(out_mm) == {"losses/xe", "losses/l2u", "losses/overall", "monitors/w_match",
                           "monitors/confidence_min", "monitors/confidence_mean",
                           "monitors/confidence_max"}
    for key in out_mm:
        np.testing.assert_allclose(float(out_mm[key]), float(out_rm[key]), rtol=1e-5)
    hp = mm.hparams()
    assert not {"tsa", "tsa_source", "gamma", "train_kimg"} & set(hp)
    assert hp["beta"] == 0.75 and hp["w_match"] == 10.0 and hp["nu"] == 2
    assert hp["temperature"] == 0.5 and hp["warmup_kimg"] == 0
    assert_few_steps_learn(mm, data, {"losses/xe", "losses/l2u"}, out_mm)


def test_mean_teacher_ramp_hand_computed():
    # train_kimg 1: the ramp ends at 0.4 * 1024 = 409.6 images.
    model = MeanTeacher(NCLASS, (SIZE, SIZE, 3), train_kimg=1, **TINY)
    steps = tf.constant([0, 256, 409, 410, 4096], tf.int64)
    np.testing.assert_allclose(model.consistency_ramp(steps).numpy(),
                               [0.0, 31.25, 50 * 409 / 409.6, 50.0, 50.0], rtol=1e-6)


def test_mean_teacher_step_matches_reference():
    model = MeanTeacher(NCLASS, (SIZE, SIZE, 3), train_kimg=1, ema=0.9, seed=1, **TINY)
    labeled, unlabeled = batch(2)
    model.train_step((labeled, unlabeled))            # EMA weights now differ from the raw ones
    model.step.assign(256)                           # ramp 0.625 -> weight 31.25
    labeled, unlabeled = batch(3)
    x, labels, u = labeled["image"], labeled["label"].numpy(), unlabeled["image"]
    student_net, teacher_net = clone(model.net), clone(model.ema_net)
    teacher = softmax(teacher_net(u[:, 0], training=True, update_bn_stats=False).numpy())
    student = softmax(student_net(u[:, 1], training=True, update_bn_stats=False).numpy())
    loss_xe = xe(student_net(x, training=True, update_bn_stats=True).numpy(), labels)
    loss_mt = ((teacher - student) ** 2).mean()
    ema_bn_before = bn_stats(model.ema_net)

    out = model.train_step((labeled, unlabeled))
    assert set(out) == {"losses/xe", "losses/mt", "losses/overall", "monitors/consistency_weight"}
    np.testing.assert_allclose(float(out["losses/xe"]), loss_xe, rtol=1e-5)
    np.testing.assert_allclose(float(out["losses/mt"]), loss_mt, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(float(out["monitors/consistency_weight"]), 31.25, rtol=1e-6)
    np.testing.assert_allclose(float(out["losses/overall"]), loss_xe + 31.25 * loss_mt, rtol=1e-5)
    # Only the labeled pass moved the BN statistics; ema_net received a copy of them.
    for got, want in zip(bn_stats(model.net), bn_stats(student_net)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(bn_stats(model.ema_net), bn_stats(model.net)):
        np.testing.assert_array_equal(got, want)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(ema_bn_before, bn_stats(model.ema_net)))
    assert int(model.step.numpy()) == 256 + B
    assert_few_steps_learn(model, (labeled, unlabeled), {"losses/xe", "losses/mt"}, out)


@pytest.mark.parametrize("kwargs", [dict(consistency_weight=-1.0), dict(warmup_pos=1.5),
                                    dict(train_kimg=0)])
def test_mean_teacher_bad_hyper_parameters(kwargs):
    with pytest.raises(UserError):
        MeanTeacher(NCLASS, (SIZE, SIZE, 3), **TINY, **kwargs)


# ---------------------------------------------------------------------------------------------
# Few-step smoke runs (continuing the models above, to build and trace each only once)

def assert_few_steps_learn(model, data, tags, first, steps=4):
    """`steps` more compiled steps on the same batch: tags present, values finite, raw and EMA
    weights moving, step counted, and the labeled loss below the first step's."""
    raw = [v.numpy().copy() for v in model.net.trainable_variables]
    ema = [v.numpy().copy() for v in model.ema_net.trainable_variables]
    start = int(model.step.numpy())
    step_fn = tf.function(model.train_step)
    outputs = [step_fn(data) for _ in range(steps)]
    assert tags <= set(outputs[-1]) and set(outputs[-1]) == set(first)
    assert all(np.isfinite(float(v)) for out in outputs for v in out.values())
    assert int(model.step.numpy()) == start + steps * B
    assert all(np.abs(a - v.numpy()).max() > 0 for a, v in zip(raw, model.net.trainable_variables))
    assert all(np.abs(a - v.numpy()).max() > 0 for a, v in zip(ema, model.ema_net.trainable_variables))
    assert float(outputs[-1]["losses/xe"]) < float(first["losses/xe"])


# ---------------------------------------------------------------------------------------------
# Fully supervised data

@pytest.fixture(scope="module")
def full_toy(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fs"))
    make_ssl_dataset(root, name="toy", nclass=3, nlabeled=6, nunlabeled=12, nvalid=2,
                     ntest=12, size=8)                       # toy-test and toy-meta.json
    # Validation records (the first 5) are class 0, the 15 training records classes 1 and 2.
    train_labels = np.int64([0] * 5 + [1, 2] * 7 + [1])
    train_images, train_labels = toy_images(20, 3, size=8, seed=7, labels=train_labels)
    write_set(os.path.join(root, "toy-train.tfrecord"), train_images, train_labels)
    return root, train_images, train_labels


def test_fully_supervised_names():
    assert str(parse_fully_supervised_name("cifar10-5000")) == "cifar10-5000"
    assert parse_fully_supervised_name("cifar10") == parse_fully_supervised_name("cifar10-1")
    for bad in ("cifar10.3@250-5000", "cifar10-0", "10cifar", "cifar10-"):
        with pytest.raises(UserError):
            parse_fully_supervised_name(bad)


@pytest.mark.parametrize("cache", [True, False])
def test_fully_supervised_data(full_toy, cache):
    root, images, labels = full_toy
    data = load_fully_supervised("toy-5", root, cache=cache, options=test_options())
    sizes = FullySupervisedConfig(dataset="toy-5", data_dir=root).load_data().sizes()
    assert (sizes["labeled"], sizes["unlabeled"], sizes["valid"]) == (15, 0, 5)  # no unlabeled set
    assert data.info.nclass == 3 and data.info.shape == (8, 8, 3)
    valid = [b for b in data.valid(64)]
    np.testing.assert_array_equal(valid[0]["label"].numpy(), labels[:5])
    np.testing.assert_allclose(valid[0]["image"].numpy(), images[:5] * (2 / 255) - 1, atol=1e-6)
    evaluated = np.concatenate([b["label"].numpy() for b in data.eval_labeled(4)])
    np.testing.assert_array_equal(evaluated, labels[5:])                     # 15 labeled images
    stream = iter(data.train_labeled(8))
    seen = np.concatenate([next(stream)["label"].numpy() for _ in range(6)])
    assert set(seen) == {1, 2}                                 # never a validation record
    with pytest.raises(UserError, match="has no unlabeled set"):
        data.train_unlabeled(8)
    if cache:    # one step of the fully supervised model on these streams (no unlabeled data)
        model = FullySupervised(3, (8, 8, 3), **TINY)
        assert model.unlabeled is None
        out = model.train_step((next(stream), None))
        assert np.isfinite(float(out["losses/xe"])) and int(model.step.numpy()) == 8
        assert model.name == "fully_supervised"


def load_fully_supervised(dataset, root, **kwargs):
    name = parse_fully_supervised_name(dataset)
    return ssl_data.load_supervised(name.name, name.nvalid, root, **kwargs)


def test_fully_supervised_data_errors(full_toy, tmp_path):
    root, _, _ = full_toy
    with pytest.raises(UserError, match="create_datasets"):
        load_fully_supervised("nothere-1", str(tmp_path))
    with pytest.raises(UserError, match="none would be left"):
        load_fully_supervised("toy-20", root)


# ---------------------------------------------------------------------------------------------
# Through the trainer

@pytest.mark.parametrize("algorithm", ["MeanTeacher", "Supervised"])
def test_trainer_runs(algorithm, tmp_path):
    toy = make_ssl_dataset(tmp_path / "data", nlabeled=16, nunlabeled=48, nvalid=8, ntest=16,
                           size=8)
    config = train_config.TrainConfig(dataset=toy.name, data_dir=toy.root, train_dir=str(tmp_path / "runs"),
                               batch=8, filters=8, repeat=1, train_kimg=1 / 32, report_kimg=1 / 64,
                               save_kimg=1 / 32, eval_batch=64, export=False, progress=False,
                               short_run_scaling=True)
    trainer = registry.make_trainer(algorithm, config, data_options=test_options())
    stats = trainer.run()
    assert os.path.basename(trainer.run_dir).startswith(algorithm + "_")
    assert int(trainer.model.step.numpy()) == 32 and stats["reports"] == 2
    with open(os.path.join(trainer.run_dir, "args", "args.json")) as f:
        assert json.load(f)["algorithm"] == algorithm


def test_baseline_command_lines_refuse_other_algorithms_flags_and_check_their_own():
    for name, args in (("mixmatch", ["--tsa=linear"]), ("mixmatch", ["--gamma=0.5"]),
                       ("mixmatch", ["--percent_mask=0.5"]), ("supervised", ["--beta=0.5"])):
        with pytest.raises(UserError, match=args[0][2:].split("=")[0]):
            cli.parse(registry.define_flags(name), [name] + args)
    flag_values = registry.define_flags("mixmatch")
    cli.parse(flag_values, ["mixmatch", "--beta=0.5", "--w_match=100"])
    assert registry.configure("mixmatch", flag_values).algorithm == \
        dict(beta=0.5, w_match=100.0, warmup_kimg=1024, loss_nclass=0)
    flag_values = registry.define_flags("mean_teacher")
    cli.parse(flag_values, ["mean_teacher", "--warmup_pos=2"])
    with pytest.raises(UserError, match="--warmup_pos=2.0 is out of range"):
        MeanTeacher(NCLASS, (SIZE, SIZE, 3), **registry.configure("mean_teacher", flag_values).algorithm)
    for name in ("supervised", "fully_supervised"):
        flag_values = registry.define_flags(name)
        cli.parse(flag_values, [name, "--extend=2"])
        with pytest.raises(UserError, match="drop --extend"):
            registry.configure(name, flag_values)


def test_fully_supervised_trainer(full_toy, tmp_path):
    root, _, _ = full_toy
    stats = registry.launch("fully_supervised", dict(
        dataset="toy-5", data_dir=root, train_dir=str(tmp_path), batch=8, filters=8, repeat=1,
        train_kimg=0.015625, report_kimg=0.015625, save_kimg=0.015625, export=False,
        progress=False), data_options=test_options())
    assert stats["run_dir"].startswith(os.path.join(str(tmp_path), "toy-5", "FullySupervised_"))
    assert stats["reports"] == 1
    assert registry.define_flags("fully_supervised")["dataset"].default == "cifar10-1"
    assert stats["kimg"] == 16 / 1024                                 # 2 steps of 8 images
