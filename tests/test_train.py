"""The generic trainer end to end on a tiny RealMix run: summaries, accuracy.json,
checkpoints, run folder, re-run, half-written checkpoints, transfer, --eval_ckpt."""
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from libml.train import precision_probe
from libml.run import checkpoints as checkpoint
from libml.train import config as train_config
from libml.export import saving
from libml.base import machine as platform
from libml.run import naming
from libml.run import summaries
from libml.train import trainer as train
from libml.base.errors import UserError
from realmix_tf.realmix import RealMix
from tests.fixtures_data import make_ssl_dataset, test_options

STEPS = [32, 64, 96, 128]    # report steps (images) of the tiny run


def tiny_config(toy, train_dir, **overrides):
    values = dict(dataset=toy.name, data_dir=toy.root, train_dir=str(train_dir), batch=8,
                  filters=8, repeat=1, train_kimg=0.125, report_kimg=0.03125, save_kimg=0.03125,
                  keep_ckpt=2, eval_batch=64, progress=False, short_run_scaling=True,
                  algorithm=dict(tsa="linear", gamma=0.25))
    values.update(overrides)
    return train_config.TrainConfig(**values)


def make_trainer(config):
    return train.Trainer(config, RealMix.from_config, "RealMix", data_options=test_options())


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    return make_ssl_dataset(tmp_path_factory.mktemp("train_data"), nlabeled=16, nunlabeled=48,
                            nvalid=8, ntest=16, size=8)


@pytest.fixture(scope="session")
def finished_run(toy, tmp_path_factory):
    """One finished tiny run (16 steps, 4 reports, checkpoints every report, export)."""
    trainer = make_trainer(tiny_config(toy, tmp_path_factory.mktemp("runs")))
    stats = trainer.run()
    return trainer, stats


def test_event_files_have_the_libml_tags_at_each_report(finished_run):
    trainer, _ = finished_run
    events = summaries.read_events(trainer.tf_dir)
    for tag in ("accuracy/train_labeled", "accuracy/valid", "accuracy", "losses/xe", "losses/l2u",
                "losses/overall", "monitors/lr", "monitors/img_per_sec", "monitors/mask_threshold",
                "monitors/unlabeled_confidence"):
        assert [step for step, _ in events[tag]] == STEPS, tag
    assert all(float(v) == pytest.approx(0.002) for _, v in events["monitors/lr"])
    assert all(0 <= float(v) <= 100 for _, v in events["accuracy"])
    histogram = events["monitors/unlabeled_confidence"][-1][1]
    assert histogram.shape == (30, 3)                       # left edge, right edge, count
    assert histogram[:, 2].sum() == 8                       # the 8 validation images
    assert 0 < histogram[0, 0] <= histogram[-1, 1] <= 1 + 1e-6


def test_accuracy_json_holds_the_medians_of_the_test_accuracy(finished_run):
    trainer, stats = finished_run
    with open(os.path.join(trainer.stats_dir, "accuracy.json")) as f:
        saved = json.load(f)
    test = [float(v) for _, v in summaries.read_events(trainer.tf_dir)["accuracy"]]
    assert saved["reports"] == 4 and saved["kimg"] == 0.125
    assert saved["last01"] == pytest.approx(test[-1])
    for key in ("last10", "last20", "last50"):
        assert saved[key] == pytest.approx(np.median(test))
        assert saved["error_" + key] == pytest.approx(100 - np.median(test))
    assert saved["last01"] == stats["last01"]


def test_median_accuracies_windows():
    values = [float(v) for v in range(1, 61)]       # 1..60
    stats = summaries.median_accuracies(values)
    assert stats["last01"] == 60 and stats["last10"] == 55.5
    assert stats["last20"] == 50.5 and stats["last50"] == 35.5
    assert stats["error_last20"] == 49.5
    assert summaries.median_accuracies([])["last20"] is None


def test_checkpoints_every_save_period_keeping_keep_ckpt(finished_run):
    trainer, _ = finished_run
    state = tf.train.get_checkpoint_state(trainer.tf_dir)
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == \
        ["model.ckpt-96", "model.ckpt-128"]
    assert sorted(f for f in os.listdir(trainer.tf_dir) if f.endswith(".index")) == \
        ["model.ckpt-128.index", "model.ckpt-96.index"]


def test_run_folder_and_args_json(finished_run, toy):
    trainer, _ = finished_run
    name = os.path.basename(trainer.run_dir)
    assert os.path.dirname(trainer.run_dir).endswith(toy.name)
    parts = name.split("_")
    assert parts[0] == "RealMix" and "batch8" in parts and "filters8" in parts and "gamma0.25" in parts
    assert name == naming.short_run_folder_name("RealMix", trainer.hparams, trainer._hparam_defaults(),
                                                RealMix.hparam_table())
    with open(os.path.join(trainer.run_dir, "args", "args.json")) as f:
        args = json.load(f)
    assert args["dataset"] == toy.name and args["tsa"] == "linear" and args["nclass"] == 3
    assert args["class_names"] == ["class0", "class1", "class2"]
    # --mixed_precision as given and the Keras policy it resolved to on this machine
    assert args["mixed_precision"] == "auto"
    assert args["precision"] == trainer.model.precision == precision_probe.auto_precision()[0]


def test_start_line_names_the_precision_choice_and_the_machine(finished_run):
    trainer, _ = finished_run
    policy, reason = precision_probe.auto_precision()
    line = trainer.start_line()
    assert line.startswith(f"precision {policy} (--mixed_precision=auto: {reason}); oneDNN ")
    assert platform.isa_line(platform.cpu_info()[1]) in line


def test_run_folder_name_sorts_hyperparameters():
    assert train.run_folder_name("RealMix", {"wd": 0.02, "beta": 0.75, "tsa": "none"}) == \
        "RealMix_beta0.75_tsanone_wd0.02"


def test_run_folder_name_over_255_bytes_ends_with_a_digest():
    long = {f"setting{i:02d}": 0.123456 for i in range(30)}
    name = train.run_folder_name("RealMix", long)
    assert len(name.encode()) == 255 and name.startswith("RealMix_setting00")
    assert name == train.run_folder_name("RealMix", dict(long))          # stable
    assert name != train.run_folder_name("RealMix", dict(long, setting29=0.5))
    short = train.run_folder_name("RealMix", {"gamma": 0.6})
    assert short == "RealMix_gamma0.6"                                    # unchanged below it


def test_run_folder_name_rounds_long_floats_and_keeps_libml_forms():
    name = train.run_folder_name("RealMix", {"ema": 1 - 10 / 384, "w_match": 75.0, "lr": 0.002,
                                             "train_kimg": 0.03125})
    assert name == "RealMix_ema0.973958_lr0.002_train_kimg0.03125_w_match75.0"


def test_short_run_scaling_caps_decays_to_the_run_length(finished_run):
    config = train_config.TrainConfig(batch=64, train_kimg=75, short_run_scaling=True)   # 1200 steps
    assert config.total_steps == 1200
    assert config.effective_decays() == pytest.approx((1 - 10 / 1200, 1 - 10 / 1200))
    assert train_config.TrainConfig(short_run_scaling=True).effective_decays() == (0.999, 0.999)
    assert train_config.TrainConfig(train_kimg=75, short_run_scaling=False).effective_decays() \
        == (0.999, 0.999)
    trainer, _ = finished_run                   # 16 steps: 1 - 10/16
    assert trainer.model.ema_decay == pytest.approx(0.375)
    assert {bn.momentum for bn in trainer.model.net.bn_layers()} == {0.375}


def test_rerunning_a_finished_run_changes_nothing(finished_run):
    trainer, _ = finished_run
    before = sorted(os.listdir(trainer.tf_dir))
    again = make_trainer(dataclasses_replace(trainer.config, export=False))
    stats = again.run()
    assert int(again.model.step.numpy()) == 128
    assert stats["reports"] == 4
    assert sorted(f for f in os.listdir(trainer.tf_dir) if not f.startswith("events")) == \
        [f for f in before if not f.startswith("events")]
    np.testing.assert_array_equal(again.model.net.classifier.kernel.numpy(),
                                  trainer.model.net.classifier.kernel.numpy())


def dataclasses_replace(config, **changes):
    import dataclasses
    return dataclasses.replace(config, **changes)


def copy_run(trainer, tmp_path):
    """A copy of the finished run under a new train_dir; returns its config."""
    target = tmp_path / "runs"
    rel = os.path.relpath(trainer.run_dir, trainer.config.train_dir)
    shutil.copytree(trainer.run_dir, target / rel)
    return dataclasses_replace(trainer.config, train_dir=str(target), export=False)


def restore_only(config):
    from libml.run.runfolder import RunFolder
    trainer = make_trainer(config)
    trainer.iterators = trainer._make_iterators()
    folder = RunFolder(trainer.run_dir, keep=5).open(trainer._args())
    try:
        return trainer, folder.restore(
            lambda p: checkpoint.read_training_state(trainer.model, trainer.iterators, p),
            checkpoint.READ_ERRORS)
    finally:
        folder.close()


def test_half_written_checkpoint_is_ignored(finished_run, tmp_path):
    trainer, _ = finished_run
    config = copy_run(trainer, tmp_path)
    tf_dir = os.path.join(config.train_dir, os.path.relpath(trainer.tf_dir, trainer.config.train_dir))
    # A save killed before the index file `checkpoint` was updated: files exist, index does not list them.
    for suffix in (".index", ".data-00000-of-00001"):
        with open(os.path.join(tf_dir, f"model.ckpt-160{suffix}"), "wb") as f:
            f.write(b"\x00garbage")
    restored, ok = restore_only(config)
    assert ok and int(restored.model.step.numpy()) == 128
    # Set aside (kept, renamed), so the run's own step-160 checkpoint never meets it.
    assert os.path.exists(os.path.join(tf_dir, "model.ckpt-160.unreadable.index"))


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path):
    trainer, _ = finished_run
    config = copy_run(trainer, tmp_path)
    tf_dir = os.path.join(config.train_dir, os.path.relpath(trainer.tf_dir, trainer.config.train_dir))
    data = os.path.join(tf_dir, "model.ckpt-128.data-00000-of-00001")
    with open(data, "r+b") as f:
        f.truncate(100)
    restored, ok = restore_only(config)
    assert ok and int(restored.model.step.numpy()) == 96


def test_start_banner_and_whole_run_progress_bar(finished_run, toy, tmp_path, capsys):
    """A resumed run prints the banner (folder, data sizes, model size, device, precision,
    resumed-from) and one progress bar over the whole run from its resumed position."""
    import re
    trainer, _ = finished_run
    config = dataclasses_replace(copy_run(trainer, tmp_path), progress=True, median_last=2)
    tf_dir = os.path.join(config.train_dir, os.path.relpath(trainer.tf_dir, trainer.config.train_dir))
    with open(os.path.join(tf_dir, "model.ckpt-128.data-00000-of-00001"), "r+b") as f:
        f.truncate(100)                                   # resumes from model.ckpt-96
    again = make_trainer(config)
    capsys.readouterr()
    again.run()
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    start = err.index(f"RealMix  {again.run_dir}")
    assert err[start + 1] == f"  data      {toy.name}: 16 labeled, 40 unlabeled, 8 valid, 16 test (8x8x3, 3 classes)"
    params = sum(int(np.prod(v.shape)) for v in again.model.net.weights)
    assert err[start + 2] == f"  model     Wide ResNet filters 8 repeat 1 scales 1: {params:,} parameters"
    assert err[start + 3] == "  device    1 x CPU (default strategy)"
    assert err[start + 4] == "  " + again.start_line()          # precision and why, oneDNN, CPU
    assert err[start + 5] == (f"  start     resuming from {os.path.join(tf_dir, 'model.ckpt-96')} "
                              f"(0.09375 kimg), run length 0.125 kimg")
    bars = [line for line in err if line.startswith("RealMix ") and "|" in line]
    assert re.search(r"^RealMix +75%\|.*\| 96(\.0)?/128 img", bars[0]), bars[0]   # starts where it resumed
    assert re.search(r"^RealMix +100%\|.*\| 128/128 img \[.*, report 4/4, test \d+\.\d\d %$", bars[-1]), bars[-1]
    assert any(line.startswith("kimg 0.125 ") for line in err)
    # The end line: the run's one test error (--median_last=2: median of the last 2 reports).
    last2 = sorted(h["test"] for h in again.history[-2:])
    assert err[-2:] == [again.run_dir, f"  test error {100 - sum(last2) / 2:.2f} % "
                                       f"(median of the last 2 reports)"]


def test_eval_ckpt_evaluates_raw_and_ema_and_writes_json(finished_run, toy, tmp_path):
    trainer, _ = finished_run
    config = tiny_config(toy, tmp_path / "other", eval_ckpt=trainer.run_dir)
    result = make_trainer(config).run()
    assert result["step"] == 128
    assert result["checkpoint"].endswith("model.ckpt-128")
    with open(result["output"]) as f:
        saved = json.load(f)
    assert set(saved) >= {"raw", "ema", "step"} and set(saved["raw"]) == {"valid", "test"}
    # The EMA numbers of the last checkpoint are the last report's.
    assert saved["ema"]["test"] == pytest.approx(trainer.history[-1]["test"])
    assert saved["ema"]["valid"] == pytest.approx(trainer.history[-1]["valid"])


def test_eval_ckpt_with_another_architecture_is_a_user_error(finished_run, toy, tmp_path):
    trainer, _ = finished_run
    config = tiny_config(toy, tmp_path, eval_ckpt=trainer.run_dir, filters=16)
    with pytest.raises(UserError, match="does not match this model"):
        make_trainer(config).run()


@pytest.fixture(scope="session")
def toy4(tmp_path_factory):
    return make_ssl_dataset(tmp_path_factory.mktemp("data4"), name="four", nclass=4, nlabeled=16,
                            nunlabeled=48, nvalid=8, ntest=16, size=8)


def source_values(prefix, path):
    return tf.train.load_checkpoint(prefix).get_tensor(checkpoint.checkpoint_key(path))


@pytest.mark.parametrize("source", ["checkpoint", "keras"])
def test_transfer_keeps_a_fresh_head_and_copies_every_other_weight(finished_run, toy4, tmp_path, source):
    trainer, _ = finished_run
    target = make_trainer(tiny_config(toy4, tmp_path, load_checkpoint=trainer.run_dir, seed=5))
    model = target.model
    fresh_head = [v.numpy() for v in model.net.classifier.weights + model.ema_net.classifier.weights]
    path = trainer.run_dir if source == "checkpoint" else os.path.join(trainer.export_dir, saving.KERAS_FILE)
    saving.transfer_weights(model, path, target.info)
    prefix = checkpoint.resolve_checkpoint(trainer.run_dir)
    for net in (model.net, model.ema_net):
        head = {id(v) for v in net.classifier.weights}
        for v in net.weights:
            if id(v) in head:
                continue
            if source == "checkpoint":
                expected = source_values(prefix, v.path)
            else:     # the export is the EMA net: it initialises both nets
                expected = source_values(prefix, "ema_net/" + v.path.split("/", 1)[1])
            np.testing.assert_array_equal(v.numpy(), expected, err_msg=v.path)
    head_now = [v.numpy() for v in model.net.classifier.weights + model.ema_net.classifier.weights]
    for before, after in zip(fresh_head, head_now):
        np.testing.assert_array_equal(before, after)
    assert head_now[0].shape == (8, 4)                       # 4 classes, the source had 3
    assert int(model.step.numpy()) == 0 and int(model.optimizer.iterations.numpy()) == 0


def test_transfer_runs_in_training_and_resets_the_step(finished_run, toy4, tmp_path):
    trainer, _ = finished_run
    config = tiny_config(toy4, tmp_path, load_checkpoint=trainer.run_dir, train_kimg=0.015625,
                         report_kimg=0.015625, save_kimg=0.015625, export=False)
    target = make_trainer(config)
    target.run()
    assert int(target.model.step.numpy()) == 16
    assert len(target.history) == 1


def test_transfer_from_another_architecture_is_a_user_error(finished_run, toy4, tmp_path):
    trainer, _ = finished_run
    target = make_trainer(tiny_config(toy4, tmp_path, filters=16))
    with pytest.raises(UserError, match="different architecture"):
        saving.transfer_weights(target.model, trainer.run_dir, target.info)
    keras_file = os.path.join(trainer.export_dir, saving.KERAS_FILE)
    with pytest.raises(UserError, match="different architecture"):
        saving.transfer_weights(target.model, keras_file, target.info)


def test_corrupt_streamed_record_mid_training_names_the_file(tmp_path, monkeypatch):
    from data_prep import extend_unlabeled
    from libml.data import pipeline as data_module
    from libml.data import extend
    monkeypatch.setattr(data_module, "CACHE_MAX_DECODED_BYTES", 0)    # stream, as large sets are
    data = make_ssl_dataset(tmp_path / "data", nlabeled=16, nunlabeled=48, nvalid=8, ntest=16, size=8)
    extend_unlabeled.extend_unlabeled(data.name, data.root, copies=2, aug="none", seed=0, progress=False,
                            parallel=1)
    shards = extend.extended_unlabeled_files(data.name, data.root, 2, "none", 0)
    trainer = make_trainer(tiny_config(data, tmp_path / "runs", extend=2, extend_aug="none"))
    # Damaged after start-up checks (which read every shard), as a disk fault mid-run would be.
    damaged = shards[-1]
    content = bytearray(open(damaged, "rb").read())
    content[len(content) * 2 // 3] ^= 0xFF
    open(damaged, "wb").write(bytes(content))
    with pytest.raises(UserError) as e:
        trainer.run()
    message = str(e.value)
    assert message.startswith(f"corrupt TFRecord {damaged} (") and "re-create it" in message
    assert "\n" not in message
