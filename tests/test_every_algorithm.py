"""Every registered algorithm, built from the registry (issue 20): its flags parse to its
declared hyper-parameters and each check is wired to its flag; a short run trains, reports and
writes its files, fed the data its model declares; a run cut short (in-process) and a run
killed with SIGKILL (the command line) resume to weights bit-identical to an uninterrupted
run. 1 vs 2 logical devices:
tests/test_distributed_steps.py, also built from the registry. A new algorithm is covered the
moment its REGISTRY line exists."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from libml.base import cli
from libml.base.errors import UserError
from realmix_tf import registry
from tests.fixtures_data import make_ssl_dataset, write_set
from tests.fixtures_train import run
from tests.test_resume import all_weights, assert_same

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGORITHMS = sorted(registry.REGISTRY)
# Short-run values of hyper-parameters, by name, for whichever algorithm declares them.
SHORT = dict(warmup_kimg=0.0625, gamma=0.25, tsa="linear", uratio=2)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    toy = make_ssl_dataset(tmp_path_factory.mktemp("data"), nlabeled=16, nunlabeled=48, nvalid=8,
                           ntest=16, size=8)
    # The labeled-only form of the same images, for algorithms with labeled-only datasets.
    images = np.concatenate([toy.labeled[0], toy.unlabeled[0]])
    labels = np.concatenate([toy.labeled[1], toy.unlabeled[1]])
    write_set(os.path.join(toy.root, "toy-train.tfrecord"), images, labels)
    return toy


def dataset_for(name, toy) -> str:
    """The toy set's name in the form the algorithm's config reads (SSL split or labeled-only)."""
    try:
        registry.get(name).config_class()(dataset=toy.name).dataset_name()
        return toy.name
    except UserError:
        return "toy-8"


def flags_for(name, toy, train_dir, **length) -> dict:
    table = registry.get(name).model_class().hparam_table()
    values = dict(dataset=dataset_for(name, toy), data_dir=toy.root, train_dir=str(train_dir),
                  batch=8, filters=8, repeat=1, train_kimg=0.0625, report_kimg=0.015625,
                  save_kimg=0.015625, keep_ckpt=10, eval_batch=64, export=False, progress=False,
                  short_run_scaling=True, data_autotune=False)
    values.update({k: v for k, v in SHORT.items() if k in table and table[k].flag})
    values.update(length)
    return values


def config_for(name, toy, train_dir, **length):
    flag_values = registry.define_flags(name)
    cli.parse(flag_values, [name] + registry.flag_args(flags_for(name, toy, train_dir, **length)))
    return registry.configure(name, flag_values)


@pytest.fixture
def deterministic():
    tf_config.enable_op_determinism()
    yield
    tf_config.disable_op_determinism()


# ---------------------------------------------------------------------------------------------
# Flags

@pytest.mark.parametrize("name", ALGORITHMS)
def test_flags_parse_to_the_declared_hyperparameters(name):
    model_class = registry.get(name).model_class()
    table = model_class.hparam_table()
    flag_values = registry.define_flags(name)
    cli.parse(flag_values, [name])
    config = registry.configure(name, flag_values)
    assert config.algorithm == {k: hp.value(hp.default) for k, hp in table.items() if hp.flag}
    for key, hp in table.items():
        if hp.flag:
            assert flag_values[key].help == hp.help and hp.help, key
    # Every float hyper-parameter with a check refuses nan in one line naming its flag.
    for key, hp in table.items():
        if hp.flag and hp.check is not None and isinstance(hp.default, float):
            flag_values = registry.define_flags(name)
            cli.parse(flag_values, [name, f"--{key}=nan"])
            with pytest.raises(UserError, match=f"--{key}=nan"):
                registry.configure(name, flag_values)


# ---------------------------------------------------------------------------------------------
# A short run, and exact resume

@pytest.mark.parametrize("name", ALGORITHMS)
def test_cut_short_run_resumes_to_identical_weights(name, toy, tmp_path, deterministic):
    reference = run(config_for(name, toy, tmp_path / "ref"), algorithm=name)
    assert int(reference.model.step.numpy()) == 64
    # The trainer fed the declared data: [B*ratio, views, H, W, C], or none.
    labeled, unlabeled = reference.iterators
    spec = reference.model.unlabeled
    assert next(labeled)["image"].shape == (8, 8, 8, 3)
    if spec is None:
        assert unlabeled is None
    else:
        assert next(unlabeled)["image"].shape == (spec.rows(8), len(spec.views), 8, 8, 3)
    stats_file = os.path.join(reference.run_dir, "stats", "accuracy.json")
    with open(stats_file) as f:
        assert json.load(f)["reports"] == 4
    assert os.path.basename(reference.run_dir).startswith(registry.get(name).name + "_")

    # 5 steps = 40 images: the checkpoint at 32 exists, the 8 images after it are lost.
    stopped = run(config_for(name, toy, tmp_path / "cut"), stop_after_steps=5, algorithm=name)
    assert int(stopped.model.step.numpy()) == 40
    resumed = run(config_for(name, toy, tmp_path / "cut"), algorithm=name)
    assert int(resumed.model.step.numpy()) == 64
    assert_same(all_weights(reference), all_weights(resumed))


@pytest.mark.slow
@pytest.mark.parametrize("name", ALGORITHMS)
def test_sigkill_then_rerun_matches_uninterrupted(name, toy, tmp_path, deterministic):
    """A real SIGKILL of the command line as soon as its first checkpoint is complete."""
    # The command line's input pipeline (tf.data defaults) on both sides, so the iterator
    # state the killed run saved is the one the reference's pipeline has.
    length = dict(train_kimg=0.125, report_kimg=0.0625, save_kimg=0.015625, data_autotune=True)
    reference = run(config_for(name, toy, tmp_path / "ref", **length), data_options=None,
                    algorithm=name)
    killed_dir = tmp_path / "killed"
    values = flags_for(name, toy, killed_dir, **length)
    args = [sys.executable, "-m", registry.get(name).module, "--deterministic",
            *registry.flag_args(values)]
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                                stdout=log, stderr=log)
        state_files = lambda: list(killed_dir.glob("*/*/tf/checkpoint"))   # noqa: E731
        deadline = time.time() + 180
        while not state_files() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log_path.read_text()[-2000:]
    state = tf.train.get_checkpoint_state(str(state_files()[0].parent))
    assert int(state.model_checkpoint_path.rsplit("-", 1)[1]) < 128

    resumed = run(config_for(name, toy, killed_dir, **length), data_options=None, algorithm=name)
    assert int(resumed.model.step.numpy()) == 128
    assert_same(all_weights(reference), all_weights(resumed))
