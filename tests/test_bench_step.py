"""runs/bench_step: machine lines, and --peer alternating with a peer worker process. The peer
here is a stand-in that speaks the worker protocol of runs/peer_step.py (the real one needs
torch and the port's checkout, neither of which the project installs)."""
import os
import stat
import subprocess
import sys

from libml import platform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_WORKER = """import json, sys
assert any(a.startswith("--peer=") for a in sys.argv), sys.argv
print(json.dumps({"torch": "stand-in", "threads": 1}), flush=True)
for line in sys.stdin:
    if line.startswith("quit"):
        break
    print(json.dumps({"wall": 0.5, "cpu": 0.25}), flush=True)
"""


def bench(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "runs.bench_step", "--filters=4", "--repeat=1",
                           "--batch=4", "--size=8", "--steps=1", "--warmup=1", "--repeats=2",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_bench_step_prints_the_machine_and_times_the_peer_in_every_round(tmp_path):
    port = tmp_path / "port"
    port.mkdir()
    (port / "train.py").write_text("# stand-in checkout\n")
    worker = tmp_path / "worker.py"
    worker.write_text(FAKE_WORKER)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nshift\nexec {sys.executable} {worker} \"$@\"\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    result = bench("--precisions=float32", f"--peer={port}", f"--peer_python={python}")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"ISA: {platform.isa_line(platform.cpu_info()[1])}" in out
    assert "oneDNN: on" in out or "oneDNN: off" in out
    assert "torch stand-in, 1 threads" in out
    port_line = next(l for l in out.splitlines() if l.strip().startswith("port"))
    assert "port    0.500 s/step (median; best 0.500)" in port_line
    assert port_line.count(" ", port_line.index("per round")) >= 2     # one ratio per round
    assert "CPU time 0.25 s" in port_line


def test_bench_step_peer_without_the_ports_train_py_is_a_user_error(tmp_path):
    result = bench("--precisions=float32", f"--peer={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --peer={tmp_path} has no train.py")
