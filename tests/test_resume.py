"""Exact resume: a run stopped mid-way (in-process, and by a real SIGKILL) and re-run ends with
weights bit-identical to an uninterrupted run of the same length, under TF op determinism."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from libml.train import config as train_config
from tests.fixtures_data import make_ssl_dataset
from tests.fixtures_train import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_ssl_dataset(tmp_path_factory.mktemp("data"), nlabeled=16, nunlabeled=48, nvalid=8,
                            ntest=16, size=8)


@pytest.fixture
def deterministic():
    tf_config.enable_op_determinism()
    yield
    tf_config.disable_op_determinism()


def tiny_config(toy, train_dir, **overrides):
    values = dict(dataset=toy.name, data_dir=toy.root, train_dir=str(train_dir), batch=8,
                  filters=8, repeat=1, train_kimg=0.125, report_kimg=0.03125, save_kimg=0.03125,
                  keep_ckpt=10, eval_batch=64, export=False, progress=False, short_run_scaling=True,
                  algorithm=dict(tsa="linear", gamma=0.25))
    values.update(overrides)
    return train_config.TrainConfig(**values)


def all_weights(trainer):
    model = trainer.model
    variables = model.net.weights + model.ema_net.weights + list(model.optimizer.variables)
    variables += [v for pair in model.head_pairs for layer in pair for v in layer.weights]
    return [v.numpy() for v in variables] + [model.step.numpy()]


def checkpoint_steps(trainer):
    state = tf.train.get_checkpoint_state(trainer.tf_dir)
    return sorted(int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_interrupted_run_resumes_to_identical_weights(toy, tmp_path, deterministic):
    reference = run(tiny_config(toy, tmp_path / "ref"))
    assert int(reference.model.step.numpy()) == 128

    # 10 steps = 80 images: checkpoints at 32 and 64 exist, the 16 images after them are lost.
    stopped = run(tiny_config(toy, tmp_path / "cut"), stop_after_steps=10)
    assert checkpoint_steps(stopped) == [32, 64]
    resumed = run(tiny_config(toy, tmp_path / "cut"))
    assert int(resumed.model.step.numpy()) == 128
    assert_same(all_weights(reference), all_weights(resumed))
    # The redone reports replace the lost ones: one history entry per report step.
    assert [h["step"] for h in resumed.history] == [32, 64, 96, 128]

    # Sanity: the comparison can fail (a different seed gives different weights).
    other = run(tiny_config(toy, tmp_path / "seed1", seed=1, train_kimg=0.03125))
    assert not np.array_equal(all_weights(other)[0], all_weights(reference)[0])


def test_sigkill_mid_run_then_rerun_matches_uninterrupted(toy, tmp_path, deterministic):
    """A real SIGKILL of the command-line tool, as soon as its first checkpoint is complete."""
    length = dict(train_kimg=0.5, report_kimg=0.0625, save_kimg=0.0625)
    # The command line's input pipeline (default tf.data options), so its iterator state fits.
    reference = run(tiny_config(toy, tmp_path / "ref", **length), data_options=None)

    killed_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "realmix_tf.realmix", f"--dataset={toy.name}",
            f"--data_dir={toy.root}", f"--train_dir={killed_dir}", "--batch=8", "--filters=8",
            "--repeat=1", "--train_kimg=0.5", "--report_kimg=0.0625", "--save_kimg=0.0625",
            "--keep_ckpt=10", "--eval_batch=64", "--noexport", "--noprogress",
            "--short_run_scaling", "--tsa=linear", "--gamma=0.25", "--deterministic"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=log)
    state_files = lambda: list(killed_dir.glob("*/*/tf/checkpoint"))   # noqa: E731
    deadline = time.time() + 120
    while not state_files() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    state = tf.train.get_checkpoint_state(str(state_files()[0].parent))
    assert int(state.model_checkpoint_path.rsplit("-", 1)[1]) < 512

    resumed = run(tiny_config(toy, killed_dir, **length), data_options=None)
    assert int(resumed.model.step.numpy()) == 512
    assert_same(all_weights(reference), all_weights(resumed))
