"""Command-line runs with tf.distribute (issue 10): 2 logical CPU devices to the end, SIGKILL
and resume to the same weights, evaluation equal to one device; 2 worker processes with
MultiWorkerMirroredStrategy on 127.0.0.1 (chief-only run folder, relaunch resumes); bad
configurations end with one line and exit code 2. Every process is bounded by a timeout."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from libml.data.pipeline import load_ssl
from runs.launch_local import free_ports
from tests.fixtures_data import make_ssl_dataset, test_options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 400


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_ssl_dataset(tmp_path_factory.mktemp("data"), nlabeled=16, nunlabeled=48, nvalid=8,
                            ntest=16, size=8)


def command(toy, train_dir, module="realmix_tf.realmix", *extra):
    args = [sys.executable, "-m", module, f"--dataset={toy.name}", f"--data_dir={toy.root}",
            f"--train_dir={train_dir}", "--batch=8", "--filters=8", "--repeat=1",
            "--train_kimg=0.25", "--report_kimg=0.125", "--save_kimg=0.03125", "--eval_batch=64",
            "--noprogress", "--short_run_scaling", "--nodata_autotune", "--deterministic"]
    if module == "realmix_tf.realmix":
        args += ["--tsa=linear", "--gamma=0.25"]
    return args + list(extra)


def env(**values):
    return {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2", **values}


def run(args, timeout=TIMEOUT, **env_values):
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env(**env_values))


def run_dir(train_dir):
    folders = [os.path.join(r, d) for r, ds, _ in os.walk(train_dir) for d in ds
               if d.startswith(("RealMix_", "Supervised_"))]
    assert len(folders) == 1, folders
    return folders[0]


def checkpoint_values(folder):
    reader = tf.train.load_checkpoint(os.path.join(folder, "tf"))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith("variables/")}


@pytest.mark.slow
def test_two_devices_cli_to_the_end_sigkill_resume_and_evaluation(toy, tmp_path):
    two = dict(REALMIX_CPU_DEVICES="2")
    reference = run(command(toy, tmp_path / "ref"), **two)
    assert reference.returncode == 0, reference.stderr[-3000:]
    ref = run_dir(tmp_path / "ref")
    stats = json.load(open(os.path.join(ref, "stats", "accuracy.json")))
    assert stats["reports"] == 2 and stats["kimg"] == 0.25
    assert len([f for f in os.listdir(os.path.join(ref, "tf")) if f.startswith("events")]) == 1
    assert sorted(os.listdir(os.path.join(ref, "export"))) == ["meta.json", "model.keras",
                                                               "ood_reference.npz", "saved_model"]
    assert not [f for f in os.listdir(os.path.dirname(ref)) if ".tmp-" in f or ".old-" in f]

    # The same command killed (SIGKILL) after its first checkpoint, then re-run.
    killed_dir = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(command(toy, killed_dir), cwd=REPO, env=env(**two), stdout=log,
                            stderr=log)
    deadline = time.time() + TIMEOUT
    while not list(killed_dir.glob("*/*/tf/checkpoint")) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    state = tf.train.get_checkpoint_state(os.path.join(run_dir(killed_dir), "tf"))
    assert int(state.model_checkpoint_path.rsplit("-", 1)[1]) < 256
    resumed = run(command(toy, killed_dir), **two)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-3000:]
    want, got = checkpoint_values(ref), checkpoint_values(run_dir(killed_dir))
    assert want.keys() == got.keys() and len(want) > 20
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)

    # Evaluation over 2 replicas gives the numbers of one device on the same weights.
    results = []
    for values in (dict(REALMIX_CPU_DEVICES="2"), dict(REALMIX_CPU_DEVICES="0")):
        out = run(command(toy, tmp_path / "ref", "realmix_tf.realmix", f"--eval_ckpt={ref}"),
                  **values)
        assert out.returncode == 0, out.stderr[-3000:]
        path = [line.split(" ", 1)[1] for line in out.stdout.splitlines() if line.startswith("wrote ")]
        results.append(json.load(open(path[0])))
    assert results[0]["ema"] == results[1]["ema"] and results[0]["raw"] == results[1]["raw"]
    assert results[0]["ema"]["test"] is not None


# Not slow-marked: the one 2-worker (MultiWorkerMirroredStrategy, 127.0.0.1) training run that
# CI runs on every CPU kind (~40 s); the other multi-worker runs are in tests/test_multiworker_resume.py.
def test_two_workers_chief_writes_the_run_folder_and_relaunch_resumes(toy, tmp_path):
    scratch = tmp_path / "scratch"           # the workers' temporary folders go here
    scratch.mkdir()
    # Without --short_run_scaling, whose decays (and so the run folder) follow --train_kimg.
    base = command(toy, tmp_path / "runs", "realmix_tf.supervised", "--worker_timeout=120",
                   "--noshort_run_scaling")
    launch = [sys.executable, "-m", "runs.launch_local", "--workers=2", "--grace=5", "--"]
    first = run(launch + base + ["--train_kimg=0.0625", "--report_kimg=0.03125"],
                TMPDIR=str(scratch))
    assert first.returncode == 0, first.stdout[-3000:]
    assert "[worker 1]" in first.stdout and "[worker 0] kimg 0.0625" in first.stdout
    folder = run_dir(tmp_path / "runs")
    assert len([f for f in os.listdir(os.path.join(folder, "tf")) if f.startswith("events")]) == 1
    assert json.load(open(os.path.join(folder, "stats", "accuracy.json")))["reports"] == 2
    assert os.path.isfile(os.path.join(folder, "export", "model.keras"))
    assert os.path.isfile(os.path.join(folder, "export", "ood_reference.npz"))
    assert not os.listdir(scratch)           # worker 1's saves and export were discarded

    again = run(launch + base + ["--train_kimg=0.125", "--report_kimg=0.03125"],
                TMPDIR=str(scratch))
    assert again.returncode == 0, again.stdout[-3000:]
    for worker in (0, 1):       # each worker's start banner names the chief's checkpoint
        assert any(line.startswith(f"[worker {worker}]") and "resuming from" in line
                   for line in again.stdout.splitlines()), again.stdout[-3000:]
    state = tf.train.get_checkpoint_state(os.path.join(folder, "tf"))
    assert state.model_checkpoint_path.endswith("-128")
    assert json.load(open(os.path.join(folder, "stats", "accuracy.json")))["reports"] == 4


def test_bad_configurations_are_one_line(toy, tmp_path):
    port, dead = free_ports(2)
    cases = {
        "malformed": (dict(TF_CONFIG="{not json"), [], "error: TF_CONFIG is not valid JSON"),
        "indivisible": (dict(REALMIX_CPU_DEVICES="3"), [],
                        "error: --batch=8 does not split over 3 devices"),
        "unreachable": (dict(TF_CONFIG=json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{port}", f"127.0.0.1:{dead}"]},
            "task": {"type": "worker", "index": 0}})), ["--worker_timeout=3"],
            f"error: worker 1 at 127.0.0.1:{dead} not reachable within 3 s"),
    }
    procs = {name: subprocess.Popen(command(toy, tmp_path / name, "realmix_tf.supervised", *extra),
                                    cwd=REPO, env=env(**values), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, (values, extra, _) in cases.items()}
    for name, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            proc.kill()
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(lines) == 1, (name, err[-2000:])
        assert lines[0].startswith(cases[name][2]), (name, lines)
        assert not (tmp_path / name).exists()


def test_worker_shards_split_every_epoch(toy):
    """Each of 2 workers reads its own half of every epoch of the training streams."""
    epochs = []
    for worker in (0, 1):
        data = load_ssl(toy.name, toy.root, seed=3, options=test_options(), shard=(worker, 2))
        order = data._sharded(data._index_stream(16, 1))
        epochs.append([int(i) for i in order.take(16).as_numpy_iterator()])
    first, second = epochs
    assert sorted(first[:8] + second[:8]) == list(range(16))      # epoch 0: each image once
    assert sorted(first[8:] + second[8:]) == list(range(16))      # epoch 1 too
    assert first[:8] != second[:8]
    single = load_ssl(toy.name, toy.root, seed=3, options=test_options())
    whole = [int(i) for i in single._index_stream(16, 1).take(16).as_numpy_iterator()]
    assert first[:8] == whole[0::2] and second[:8] == whole[1::2]
