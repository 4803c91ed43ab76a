"""Two MultiWorkerMirroredStrategy worker processes on 127.0.0.1 through the command line
(issue 26): killed (SIGKILL, both workers) after a checkpoint and relaunched, a run ends
bit-identical to an uninterrupted one, each worker resuming its own input position (saved
beside the chief's checkpoint, or rebuilt from its shard when that file is missing); the
non-chief writes nothing but its input positions; a lost worker ends the chief in one line
with exit code 2; a run folder that is not shared is refused in one line. Every process is
bounded by a timeout."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from runs.launch_local import free_ports, tf_configs, worker_command
from tests.test_distributed_runs import (REPO, TIMEOUT, checkpoint_values, command, env, run,
                                         run_dir, toy)   # noqa: F401 (toy is a fixture)

LAUNCH = [sys.executable, "-m", "runs.launch_local", "--workers=2", "--grace=5",
          f"--timeout={TIMEOUT}", "--"]


def base(toy, train_dir, *extra):
    # Saves every 2 steps (16 images): the kill lands between two saves of a 64-step run.
    return command(toy, train_dir, "realmix_tf.realmix", "--worker_timeout=60",
                   "--train_kimg=0.125", "--report_kimg=0.0625", "--save_kimg=0.015625", *extra)


def start_workers(args, logs, **env_values):
    """The two workers of `args` as separate processes (so both can be SIGKILLed)."""
    configs = tf_configs(free_ports(2))
    return [subprocess.Popen(worker_command(args), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                             env=env(TF_CONFIG=config, **env_values))
            for config, log in zip(configs, logs)]


def kill_after(processes, folder, step, logs):
    """SIGKILLs every worker once the chief's checkpoint of `step` images exists."""
    deadline = time.time() + TIMEOUT
    target = None
    while time.time() < deadline and all(p.poll() is None for p in processes):
        found = list(folder.glob(f"*/*/tf/model.ckpt-{step}.index"))
        if found:
            target = found[0]
            break
        time.sleep(0.01)
    for p in processes:
        p.send_signal(signal.SIGKILL)
        p.wait()
    text = "".join(open(log.name).read()[-1500:] for log in logs)
    assert target is not None and all(p.returncode == -signal.SIGKILL for p in processes), text


def final_values(folder):
    values = checkpoint_values(run_dir(folder))
    assert len(values) > 20
    return values


@pytest.mark.slow
def test_two_workers_killed_and_relaunched_resume_bit_identical(toy, tmp_path):
    scratch = tmp_path / "scratch"         # the workers' system temp folder
    scratch.mkdir()
    reference = run(LAUNCH + base(toy, tmp_path / "ref"), TMPDIR=str(scratch))
    assert reference.returncode == 0, reference.stdout[-3000:]
    want = final_values(tmp_path / "ref")

    killed = tmp_path / "killed"
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    kill_after(start_workers(base(toy, killed), logs, TMPDIR=str(scratch)), killed, 32, logs)
    folder = run_dir(killed)
    positions = os.listdir(os.path.join(folder, "tf", "worker1"))
    assert any(name.startswith("input.ckpt-") for name in positions), positions
    assert not os.path.exists(os.path.join(folder, "tf", "worker0"))   # the chief's are in its own
    resumed = run(LAUNCH + base(toy, killed), TMPDIR=str(scratch))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "[worker 1]" in resumed.stdout and "resuming from" in resumed.stdout
    got = final_values(killed)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # Worker 1 wrote nothing to its temp folder (TensorFlow's autograph sources of the killed
    # processes aside); it used to hold a full copy of every checkpoint and export.
    assert not [f for f in os.listdir(scratch) if not f.startswith("__autograph_generated_file")]

    # Without worker 1's input positions (a kill between the chief's save and its own), the
    # position is rebuilt from its shard: the same weights again.
    rebuilt = tmp_path / "rebuilt"
    logs = [open(tmp_path / f"rebuilt{i}.log", "w") for i in range(2)]
    kill_after(start_workers(base(toy, rebuilt), logs), rebuilt, 48, logs)
    folder = run_dir(rebuilt)
    for name in os.listdir(os.path.join(folder, "tf", "worker1")):
        os.remove(os.path.join(folder, "tf", "worker1", name))
    again = run(LAUNCH + base(toy, rebuilt))
    assert again.returncode == 0, again.stdout[-3000:]
    assert "rebuilding it from the start of this worker's shard" in again.stdout
    got = final_values(rebuilt)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.slow
def test_lost_worker_is_one_line_exit_2_and_the_checkpoints_stay(toy, tmp_path):
    args = base(toy, tmp_path / "runs", "--worker_timeout=20")
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    chief, worker = start_workers(args, logs)
    deadline = time.time() + TIMEOUT
    while not list((tmp_path / "runs").glob("*/*/tf/model.ckpt-16.index")) \
            and chief.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    try:
        chief.wait(timeout=TIMEOUT)
    finally:
        chief.kill()
    text = open(logs[0].name).read()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert chief.returncode == 2 and len(errors) == 1, text[-3000:]
    assert errors[0].startswith("error: worker 1 (127.0.0.1:"), errors
    assert "was lost: relaunch every worker with the same command" in errors[0]
    assert "Traceback" not in text
    folder = run_dir(tmp_path / "runs")
    named = errors[0].split("resumes from ", 1)[1].split(",", 1)[0]
    assert os.path.isfile(os.path.join(folder, "tf", named + ".index"))
    assert checkpoint_values(folder)                     # the newest checkpoint reads back


@pytest.mark.slow
def test_a_run_folder_that_is_not_shared_is_one_line_on_every_worker(toy, tmp_path):
    """Worker 1 given another --train_dir stands for a host whose disk is not the chief's."""
    configs = tf_configs(free_ports(2))
    procs = [subprocess.Popen(worker_command(base(toy, tmp_path / f"host{i}")), cwd=REPO,
                              env=env(TF_CONFIG=config), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i, config in enumerate(configs)]
    errors = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            proc.kill()
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(lines) == 1, err[-3000:]
        errors.append(lines[0])
    assert errors[0].startswith("error: worker 1 does not see the chief's run folder "), errors
    assert errors[1].startswith("error: worker 1 does not see the chief's run folder at "
                                f"{tmp_path / 'host1'}"), errors
    for line in errors:
        assert "--train_dir must be one file system folder that every host sees" in line
    assert not list((tmp_path / "host0").glob("*/*/tf/model.ckpt-*"))      # nothing trained
