"""Command-line flags of the trainer: defaults, --helpfull text, and every flag error as a
one-line UserError (exit code 2 for the command)."""
import os
import subprocess
import sys

import pytest

from libml.train import precision_probe
from libml.train import config as train_config
from libml.base import machine
from libml.train import trainer as train
from libml.base.errors import UserError
from realmix_tf import registry
from realmix_tf.realmix import RealMix
from tests.fixtures_data import make_ssl_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_ssl_dataset(tmp_path_factory.mktemp("flags_data"), nlabeled=16, nunlabeled=48,
                            nvalid=8, ntest=16, size=8)


def parse(*args, algorithm="realmix"):
    """The command line's flags (a fresh FlagValues), parsed."""
    flag_values = registry.define_flags(algorithm)
    flag_values([algorithm, *args])
    return flag_values


def start(*args):
    """Parses the flags and runs the command's start-up checks (no data needed)."""
    return registry.configure("realmix", parse(*args))


def test_defaults_are_the_released_ones():
    config = registry.configure("realmix", parse())
    assert (config.dataset, config.batch, config.lr, config.wd, config.ema) == \
        ("cifar10.3@250-5000", 64, 0.002, 0.02, 0.999)
    assert (config.train_kimg, config.report_kimg, config.save_kimg, config.keep_ckpt) == (65536, 64, 64, 50)
    assert (config.filters, config.repeat, config.scales) == (32, 4, 0)
    assert config.algorithm == dict(beta=0.75, w_match=75.0, warmup_kimg=1024, tsa="none",
                                    tsa_source="labels", gamma=0.0, loss_nclass=0,
                                    ood_score="confidence", prototype_momentum=0.99)
    assert config.train_nimg == 65536 * 1024 and config.report_nimg == 65536


def test_percent_mask_is_an_alias_of_gamma_and_released_tsa_names_work():
    hp = registry.configure("realmix", parse("--percent_mask=0.6", "--tsa=linear_schedule")).algorithm
    assert hp["gamma"] == 0.6 and hp["tsa"] == "linear"


def test_fractional_kimg():
    config = registry.configure("supervised", parse("--train_kimg=0.5", "--report_kimg=0.125",
                                                    "--save_kimg=0.25", "--batch=8",
                                                    algorithm="supervised"))
    assert (config.train_nimg, config.report_nimg, config.save_nimg, config.total_steps) == (512, 128, 256, 64)


def test_every_flag_is_documented():
    FLAGS = parse()
    help_text = FLAGS.get_help()
    for name in ("dataset", "data_dir", "train_dir", "batch", "lr", "wd", "ema", "beta", "w_match",
                 "warmup_kimg", "train_kimg", "report_kimg", "save_kimg", "keep_ckpt", "filters",
                 "repeat", "scales", "tsa", "tsa_source", "gamma", "percent_mask", "extend",
                 "extend_aug", "extend_seed", "seed", "mixed_precision", "jit_compile",
                 "load_checkpoint", "eval_ckpt", "bn_momentum", "short_run_scaling", "export_only",
                 "data_autotune"):
        assert name in FLAGS, name
        assert FLAGS[name].help and (f"--{name}" in help_text or f"--[no]{name}" in help_text), name


@pytest.mark.parametrize("args, message", [
    (["--dataset=cifar10-250"], "malformed dataset name"),
    (["--batch=0"], "--batch=0 must be positive"),
    (["--train_kimg=0"], "--train_kimg=0.0 must be positive"),
    (["--report_kimg=-1"], "--report_kimg=-1.0 must be positive"),
    (["--save_kimg=0"], "--save_kimg=0.0 must be positive"),
    (["--keep_ckpt=0"], "--keep_ckpt=0 must be positive"),
    (["--filters=0"], "--filters=0 must be positive"),
    (["--lr=0"], "--lr=0.0 must be positive"),
    (["--wd=-0.1"], "--wd=-0.1 is negative"),
    (["--ema=1"], "--ema=1.0 is out of range"),
    (["--bn_momentum=-0.5"], "--bn_momentum=-0.5 is out of range"),
    (["--scales=-1"], "--scales=-1 is negative"),
    (["--train_kimg=1", "--report_kimg=2"], "exceeds --train_kimg"),
    (["--train_kimg=1", "--report_kimg=0.03125", "--batch=64"], "larger than one report period"),
    (["--mixed_precision=fp8"], "--mixed_precision='fp8' is unknown"),
    (["--extend=-1"], "--extend=-1 is negative"),
    (["--extend=50", "--extend_aug=blur"], "--extend_aug='blur' is unknown"),
    (["--shuffle_buffer=-1"], "--shuffle_buffer=-1 is negative"),
    (["--eval_ckpt=/nonexistent/run"], "--eval_ckpt=/nonexistent/run not found"),
    (["--load_checkpoint=/nonexistent/run"], "--load_checkpoint=/nonexistent/run not found"),
    (["--eval_ckpt=/tmp", "--load_checkpoint=/tmp"], "both given"),
    (["--eval_ckpt=/tmp", "--export_only"], "both given"),
    (["--gamma=1"], "--gamma=1.0 is out of range"),
    (["--percent_mask=-1"], "--gamma=-1.0 is out of range"),
    (["--tsa=cosine"], "--tsa='cosine' is unknown"),
    (["--tsa_source=probs"], "--tsa_source='probs' is unknown"),
    (["--beta=0"], "--beta=0.0 must be positive"),
    (["--w_match=-1"], "--w_match=-1.0 is negative"),
])
def test_flag_errors_are_one_line_user_errors(args, message):
    with pytest.raises(UserError) as error:
        start(*args)
    assert message in str(error.value)
    assert "\n" not in str(error.value) and ": " in str(error.value)


def test_positional_arguments_are_rejected():
    with pytest.raises(UserError, match="unexpected arguments extra"):
        registry.main("realmix", ["realmix", "extra"], parse())


def test_missing_data_names_the_command_that_creates_it(tmp_path):
    flag_values = parse(f"--data_dir={tmp_path}", "--dataset=cifar10.3@250-5000",
                        f"--train_dir={tmp_path}/exp")
    with pytest.raises(UserError, match="create_split"):
        registry.main("realmix", ["realmix"], flag_values)


def test_extend_without_extension_files_names_the_command(toy, tmp_path):
    flag_values = parse(f"--data_dir={toy.root}", f"--dataset={toy.name}", "--extend=50",
                        "--extend_aug=erase", f"--train_dir={tmp_path}", "--batch=8")
    with pytest.raises(UserError, match="extend_unlabeled"):
        registry.main("realmix", ["realmix"], flag_values)


def test_batch_not_divisible_by_the_replicas(toy, tmp_path):
    class ThreeReplicas:
        num_replicas_in_sync = 3
    config = train_config.TrainConfig(dataset=toy.name, data_dir=toy.root, train_dir=str(tmp_path),
                                      batch=8)
    with pytest.raises(UserError, match="--batch=8 does not split over 3 devices"):
        train.Trainer(config, RealMix.from_config, "RealMix", strategy=ThreeReplicas())


def run_command(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "realmix_tf.realmix", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_command_exit_code_2_and_one_line_on_bad_values_and_bad_types():
    for args, expected in ((["--gamma=1.5"], "error: --gamma=1.5 is out of range"),
                           (["--batch=abc"], "error: flag --batch=abc")):
        result = run_command(*args)
        assert result.returncode == 2, result.stderr
        lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and lines[0].startswith(expected), result.stderr


def test_original_libml_command_lines_are_accepted(capsys):
    """libml's flags parse with every algorithm; --shuffle and --epochs are mapped, the flags
    without meaning here are named once on one line (realmix_tf/legacy_flags.py)."""
    for algorithm in ("realmix", "mixmatch", "mean_teacher", "supervised"):
        config = registry.configure(algorithm, parse(
            "--arch=resnet", "--whiten", "--shuffle=64", "--para_parse=4", "--para_augment=4", "--nu=2",
            "--train_kimg=256", "--report_kimg=64", "--epochs=2", "--nclass=10", "--img_size=32",
            "--augment=cifar10", "--log_device_placement=false", algorithm=algorithm))
        assert config.shuffle_buffer == 64 and config.train_kimg == 128
        notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
        assert notes == ["note: --epochs=2: run length 128 kimg (2 reports of 64 kimg)",
                         "note: libml flags without effect here: --whiten (images are scaled to [-1, 1], "
                         "libml's default); --para_parse (tf.data tunes its own parallelism); "
                         "--para_augment (tf.data tunes its own parallelism); --nclass (the class count "
                         "comes from the dataset); --img_size (the image size comes from the dataset); "
                         "--augment (augmentation comes from the dataset (flip, shift in "
                         "<dataset>-meta.json))"], algorithm
    with pytest.raises(UserError, match="--arch=shake: only resnet"):
        start("--arch=shake")
    assert start().shuffle_buffer == 0 and capsys.readouterr().err == ""      # nothing given: silent


def test_command_line_with_libml_flags_runs_to_the_data_check(tmp_path):
    result = run_command("--arch=resnet", "--whiten", "--para_parse=4", f"--data_dir={tmp_path}",
                         "--dataset=cifar10.3@250-5000")
    assert result.returncode == 2
    errors = [l for l in result.stderr.splitlines() if l.startswith(("error:", "note:"))]
    assert errors[0].startswith("note: libml flags without effect here: --whiten")
    assert errors[1].startswith("error: missing ") and "data_prep.create_split" in errors[1], result.stderr


def test_main_trains_a_tiny_run_and_returns_stats(toy, tmp_path, capsys):
    flag_values = parse(f"--data_dir={toy.root}", f"--dataset={toy.name}", f"--train_dir={tmp_path}",
                        "--batch=8", "--filters=8", "--repeat=1", "--train_kimg=0.015625",
                        "--report_kimg=0.015625", "--noexport", "--noprogress", "--tsa=exp",
                        "--percent_mask=0.5", "--nodata_autotune")
    stats = registry.main("realmix", ["realmix"], flag_values)
    assert stats["reports"] == 1 and 0 <= stats["last01"] <= 100
    banner = capsys.readouterr().err.splitlines()[:6]   # the start banner: its precision line
    line = next(l.strip() for l in banner if l.startswith("  precision "))
    assert line.startswith(f"precision {precision_probe.auto_precision()[0]} (--mixed_precision=auto: ")
    (run_dir,) = (tmp_path / toy.name).iterdir()
    assert run_dir.name.startswith("RealMix_") and "gamma0.5" in run_dir.name and "tsaexp" in run_dir.name
    assert (run_dir / "stats" / "accuracy.json").exists() and (run_dir / "tf" / "checkpoint").exists()


def test_launch_parses_and_validates_like_the_command_line(toy, tmp_path):
    for values, message in (({"gamma": 1.5}, "--gamma=1.5 is out of range"),
                            ({"batch": 0}, "--batch=0 must be positive"),
                            ({"gammma": 0.5}, "gammma")):
        with pytest.raises(UserError, match=message):
            registry.launch("realmix", dict(values, dataset=toy.name, data_dir=toy.root,
                                            train_dir=str(tmp_path)))
    assert not os.listdir(tmp_path)
    assert registry.flag_args({"gamma": 0.6, "export": False, "progress": True}) == \
        ["--gamma=0.6", "--noexport", "--progress"]
    assert registry.get("RealMix") is registry.get("realmix")
    with pytest.raises(UserError, match="unknown algorithm"):
        registry.get("nonexistent")
