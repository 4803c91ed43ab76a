"""Run folder names (libml/run/naming.py) and TensorBoard's hparams summaries (issue 24, item 12):
short readable names by default, libml's names under --run_naming=libml, libml-named runs
resumed where they are."""
import os
import re

import pytest

from libml.run import naming
from libml.run import summaries

# RealMix's run hyper-parameters as the trainer collects them (values of a real quickstart-like run)
DEFAULTS = dict(batch=64, filters=32, repeat=4, scales=0, lr=0.002, wd=0.02, ema=0.999, seed=0,
                beta=0.75, w_match=75.0, warmup_kimg=1024, nu=2, temperature=0.5, tsa="none",
                tsa_source="labeled", gamma=0.0, train_kimg=65536, extend=0)
RUN = dict(DEFAULTS, nclass=10, batch=64, filters=32, repeat=4, scales=3, lr=0.002, wd=0.02,
           ema=1 - 10 / 256, seed=1, train_kimg=16, tsa="linear", gamma="auto", extend=50,
           extend_aug="erase", extend_seed=0)


def test_short_name_shows_only_what_differs_from_the_defaults_and_ends_with_a_digest():
    name = naming.short_run_folder_name("RealMix", RUN, DEFAULTS)
    assert name.startswith("RealMix_ema0.960938_extend50_gammaauto_scales3_seed1_train_kimg16_"
                           "tsalinear_")
    assert naming.is_digest(name.split("_")[-1])
    assert len(name) <= naming.SHORT_MAX
    libml = naming.run_folder_name("RealMix", RUN)
    assert len(libml) > 2 * len(name)          # what the legend showed before
    assert re.fullmatch(r"RealMix_[0-9a-f]{8}",                  # all defaults: nothing shown
                        naming.short_run_folder_name("RealMix", DEFAULTS, DEFAULTS))


def test_same_settings_same_name_other_settings_other_name():
    name = naming.short_run_folder_name("RealMix", RUN, DEFAULTS)
    assert naming.short_run_folder_name("RealMix", dict(reversed(list(RUN.items()))), DEFAULTS) == name
    others = [dict(RUN, gamma=0.5), dict(RUN, nclass=6),           # nclass: not shown, digested
              dict(RUN, extend_aug="flip"),                        # a default-less key
              dict(RUN, ema=RUN["ema"] + 1e-9)]                    # beyond the 6 digits shown
    names = {naming.short_run_folder_name("RealMix", o, DEFAULTS) for o in others}
    assert len(names) == len(others) and name not in names
    assert naming.short_run_folder_name("MixMatch", RUN, DEFAULTS) != name


def test_many_changed_settings_are_cut_to_the_cap_and_still_distinct():
    defaults = {f"setting{i:02d}": 0.0 for i in range(40)}
    many = {f"setting{i:02d}": 0.123456 for i in range(40)}
    name = naming.short_run_folder_name("RealMix", many, defaults)
    assert len(name.encode()) <= naming.SHORT_MAX and name.startswith("RealMix_setting000.123456_")
    last = naming.short_run_folder_name("RealMix", dict(many, setting39=0.5), defaults)
    assert last != name and last.rsplit("_", 1)[0] == name.rsplit("_", 1)[0]   # only the digest
    first = naming.short_run_folder_name("RealMix", many, defaults, first=["setting39"])
    assert first.startswith("RealMix_setting000.123456_") and "_setting390.123456_" in first


def test_libml_naming_is_unchanged_under_the_flag(tmp_path):
    root = str(tmp_path)
    expected = ("RealMix_batch64_beta0.75_ema0.960938_extend50_extend_augerase_extend_seed0_"
                "filters32_gammaauto_lr0.002_nclass10_nu2_repeat4_scales3_seed1_temperature0.5_"
                "train_kimg16_tsalinear_tsa_sourcelabeled_w_match75.0_warmup_kimg1024_wd0.02")
    assert naming.run_dir(root, "RealMix", RUN, DEFAULTS, "libml") == os.path.join(root, expected)
    assert naming.run_folder_name("RealMix", RUN) == expected


def test_a_libml_named_run_of_the_same_settings_is_resumed_where_it_is(tmp_path):
    root, said = str(tmp_path), []
    short = naming.run_dir(root, "RealMix", RUN, DEFAULTS, "short", say=said.append)
    assert os.path.basename(short) == naming.short_run_folder_name("RealMix", RUN, DEFAULTS)
    assert said == []
    libml = os.path.join(root, naming.run_folder_name("RealMix", RUN))
    os.makedirs(os.path.join(libml, "args"))              # a run of the libml naming
    assert naming.run_dir(root, "RealMix", RUN, DEFAULTS, "short", say=said.append) == libml
    assert len(said) == 1 and said[0].startswith(f"note: continuing the run of these settings in {libml}")
    assert naming.run_dir(root, "RealMix", dict(RUN, gamma=0.5), DEFAULTS, "short", say=said.append) \
        != libml                                          # other settings: a new short name
    os.makedirs(short)                                    # both exist: the short one
    assert naming.run_dir(root, "RealMix", RUN, DEFAULTS, "short", say=said.append) == short


def test_a_new_train_kimg_note_with_short_names(tmp_path, capsys):
    from libml.run.runfolder import RunFolder
    from tests.test_faults_input import _fake_checkpoint
    defaults = dict(DEFAULTS)
    old = tmp_path / naming.short_run_folder_name("RealMix", dict(RUN, train_kimg=1024), defaults)
    _fake_checkpoint(old)
    other = tmp_path / naming.short_run_folder_name("RealMix", dict(RUN, gamma=0.25, train_kimg=512), defaults)
    _fake_checkpoint(other)
    new = tmp_path / naming.short_run_folder_name("RealMix", dict(RUN, train_kimg=2048), defaults)
    RunFolder(str(new), keep=2).open({}).close()
    err = capsys.readouterr().err
    assert err.startswith(f"note: this is a new run ({new}): --train_kimg") and err.count("\n") == 1
    assert "exists with --train_kimg=1024; to continue" in err


def test_trainer_run_folder_is_short_and_writes_the_hparams_summary(finished_run, toy):  # noqa: F811
    from tensorboard.plugins.hparams import metadata
    from tensorflow.core.util import event_pb2
    import glob
    import tensorflow as tf
    trainer, _ = finished_run
    name = os.path.basename(trainer.run_dir)
    words = name.split("_")
    assert words[0] == "RealMix" and naming.is_digest(words[-1]) and len(name) <= naming.SHORT_MAX
    assert {"batch8", "filters8", "gamma0.25", "tsalinear"} <= set(words)
    assert "lr0.002" not in words and "wd0.02" not in words       # defaults are not repeated
    assert trainer.hparams["scales"] == 1 and not any(w.startswith(("scales", "ema", "bn_momentum"))
                                                      for w in words)   # resolved from defaults
    starts = []
    for path in glob.glob(os.path.join(trainer.tf_dir, "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            for value in event_pb2.Event.FromString(record).summary.value:
                if value.tag == metadata.SESSION_START_INFO_TAG:
                    starts.append(metadata.parse_session_start_info_plugin_data(
                        value.metadata.plugin_data.content))
    assert len(starts) == 1
    hparams = {k: v.number_value if v.HasField("number_value") else v.string_value
               for k, v in starts[0].hparams.items()}
    assert starts[0].group_name == name
    assert hparams["gamma"] == 0.25 and hparams["tsa"] == "linear" and hparams["batch"] == 8
    assert hparams["dataset"] == toy.name and hparams["algorithm"] == "RealMix"
    assert hparams["train_kimg"] == 0.125 and set(trainer.hparams) <= set(hparams)


def test_write_hparams_converts_values_tensorboard_does_not_take(tmp_path):
    import tensorflow as tf
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default(step=0):
        assert summaries.write_hparams({"a": None, "b": (1, 2), "c": 3}, "run")
    writer.close()
    assert "_hparams_/session_start_info" in summaries.read_events(str(tmp_path))


def test_run_naming_flag_picks_the_libml_name(toy, tmp_path):  # noqa: F811
    from tests.test_train import make_trainer, tiny_config
    libml = make_trainer(tiny_config(toy, tmp_path, run_naming="libml"))
    assert os.path.basename(libml.run_dir) == naming.run_folder_name("RealMix", libml.hparams)
    with pytest.raises(Exception, match="run_naming"):
        tiny_config(toy, tmp_path, run_naming="long").validate()


from tests.test_train import finished_run, toy  # noqa: E402,F401 (fixtures)
