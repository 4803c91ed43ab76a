"""Strategy choice, TF_CONFIG parsing, worker roles, the start-up rendezvous and the local
launcher (libml/train/devices.py, runs/launch_local.py)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from libml.train import devices
from libml.base.errors import UserError
from runs import launch_local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(workers, task_type="worker", index=0, chief=None):
    cluster = {"worker": workers}
    if chief is not None:
        cluster["chief"] = chief
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


def test_tf_config_roles():
    two = ["127.0.0.1:2001", "127.0.0.1:2002"]
    assert devices.parse_tf_config("") is None and devices.parse_tf_config(None) is None
    w0, w1 = (devices.parse_tf_config(config(two, index=i)) for i in (0, 1))
    assert (w0.num_workers, w0.worker_id, w0.is_chief) == (2, 0, True)
    assert (w1.worker_id, w1.is_chief) == (1, False)
    chief = devices.parse_tf_config(config(two, "chief", 0, chief=["10.0.0.1:2000"]))
    worker = devices.parse_tf_config(config(two, "worker", 0, chief=["10.0.0.1:2000"]))
    assert chief.num_workers == 3 and chief.is_chief and chief.workers[0] == "10.0.0.1:2000"
    assert (worker.worker_id, worker.is_chief) == (1, False)


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ('{"task": {"type": "worker", "index": 0}}', 'no "cluster"'),
    (config(["127.0.0.1"]), "host:port"),
    (config(["127.0.0.1:1", "127.0.0.1:2"], index=2), "out of range"),
    (config(["127.0.0.1:1"], task_type="ps"), "no \"task\""),
    (json.dumps({"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker"}}), "ps"),
])
def test_malformed_tf_config_is_one_line(text, match):
    with pytest.raises(UserError, match=match) as info:
        devices.parse_tf_config(text)
    assert "\n" not in str(info.value) and ": " in str(info.value)


def test_resolve_kind():
    two = devices.parse_tf_config(config(["h:1", "h:2"]))
    one = devices.parse_tf_config(config(["h:1"]))
    assert devices.resolve_kind("auto", two) == "multiworker"
    assert devices.resolve_kind("auto", one, gpus=0, cpus=1) == "none"
    assert devices.resolve_kind("auto", None, gpus=4) == "mirrored"
    assert devices.resolve_kind("auto", None, cpus=2) == "mirrored"
    assert devices.resolve_kind("none", two) == "none"
    assert devices.resolve_kind("mirrored", None) == "mirrored"
    with pytest.raises(UserError, match="needs TF_CONFIG"):
        devices.resolve_kind("multiworker", None)
    with pytest.raises(UserError, match="unknown"):
        devices.resolve_kind("tpu", None)


def test_cpu_devices_env(monkeypatch):
    monkeypatch.setenv(devices.CPU_DEVICES_ENV, "3")
    assert devices.env_cpu_devices() == 3
    monkeypatch.setenv(devices.CPU_DEVICES_ENV, "two")
    with pytest.raises(UserError, match="not a number"):
        devices.env_cpu_devices()


def test_worker_role():
    assert devices.WorkerRole().is_chief
    worker = devices.WorkerRole(devices.parse_tf_config(config(["h:1", "h:2"], index=1)))
    assert not worker.is_chief and worker.worker_id == 1 and worker.num_workers == 2


def test_rendezvous_names_the_unreachable_worker():
    port, dead = launch_local.free_ports(2)
    cluster = devices.parse_tf_config(config([f"127.0.0.1:{port}", f"127.0.0.1:{dead}"]))
    start = time.monotonic()
    with pytest.raises(UserError, match=f"worker 1 at 127.0.0.1:{dead} not reachable within 1 s"):
        devices.rendezvous(cluster, timeout=1)
    assert time.monotonic() - start < 10


def test_rendezvous_passes_when_every_worker_listens():
    port, peer = launch_local.free_ports(2)
    listener = socket.socket()
    listener.bind(("127.0.0.1", peer))
    listener.listen(4)
    try:
        cluster = devices.parse_tf_config(config([f"127.0.0.1:{port}", f"127.0.0.1:{peer}"]))
        devices.rendezvous(cluster, timeout=5)
    finally:
        listener.close()


def launch(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "runs.launch_local", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": REPO})


WORKER = ("import os, sys, json, time; c = json.loads(os.environ['TF_CONFIG']); "
          "i = c['task']['index']; print('task', i, len(c['cluster']['worker']), sys.argv[1:], "
          "flush=True); time.sleep(0.3 if i else float(sys.argv[1])); sys.exit({code} if i else 0)")


def test_launcher_prefixes_output_and_succeeds():
    result = launch("--workers=2", "--", sys.executable, "-c", WORKER.format(code=0), "0.3")
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.splitlines())
    assert lines == ["[worker 0] task 0 2 ['0.3', '--distribute=multiworker']",
                     "[worker 1] task 1 2 ['0.3', '--distribute=multiworker']"]


def test_launcher_stops_every_worker_when_one_fails():
    start = time.monotonic()
    result = launch("--workers=2", "--grace=1", "--", sys.executable, "-c",
                    WORKER.format(code=7), "120")
    assert result.returncode == 7
    assert "worker 1 exited with code 7: stopping the others" in result.stderr
    assert time.monotonic() - start < 60         # worker 0 (sleeping 120 s) was stopped


def test_launcher_without_command_is_one_line():
    result = launch("--workers=2")
    assert result.returncode == 2 and result.stderr.startswith("error: no command given")


def test_collective_flag_maps_to_the_communication_implementation():
    import tensorflow as tf
    kinds = tf.distribute.experimental.CommunicationImplementation
    assert devices.communication("auto", 0) == kinds.AUTO
    assert devices.communication("ring", 0) == kinds.RING
    assert devices.communication("nccl", 2) == kinds.NCCL
    with pytest.raises(UserError, match="--collective=nccl needs GPUs and this worker sees none"):
        devices.communication("nccl", 0)
    with pytest.raises(UserError, match="--collective='mpi' is unknown: use one of auto, ring, nccl"):
        devices.communication("mpi", 0)
    from libml.train.config import TrainConfig
    assert TrainConfig().collective == "auto"
    with pytest.raises(UserError, match="collective"):
        TrainConfig(collective="mpi").validate()


def test_lost_worker_message_names_the_worker_and_the_checkpoint():
    cluster = devices.parse_tf_config(config(["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]))
    text = ("Collective ops is aborted by: failed to connect to all addresses ... "
            "from remote target /job:worker/replica:0/task:2 while calling ...")
    line = devices.lost_worker_message(text, cluster, 0, "/r/tf/model.ckpt-640")
    assert line == ("worker 2 (10.0.0.3:1) was lost: relaunch every worker with the same command "
                    "(each host its own TF_CONFIG, as before): it resumes from model.ckpt-640, "
                    "which is intact")
    line = devices.lost_worker_message("peer 10.0.0.2:1 unavailable", cluster, 0, "")
    assert line.startswith("worker 1 (10.0.0.2:1) was lost") and "starts over" in line
    assert devices.lost_worker_message("deadline", cluster, 0, "").startswith(
        "another worker (of 10.0.0.1:1, 10.0.0.2:1, 10.0.0.3:1) was lost")
