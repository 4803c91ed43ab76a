"""runs/bench_step: machine lines, and --peer alternating with a peer worker process. The peer
here is a stand-in that speaks the worker protocol of runs/peer_step.py (the real one needs
torch and the port's checkout, neither of which the project installs)."""
import os
import stat
import subprocess
import sys

import pytest

from libml.base import machine as platform
from runs import peer_step

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
    # FLOPs counted once, and each figure against the peak with its formula
    flops_line = next(l for l in out.splitlines() if l.startswith("FLOPs per step: forward "))
    assert "x (3 x 12 forward+backward + 8 forward-only images) = " in flops_line
    peak_line = next(l for l in out.splitlines() if l.startswith("float32         peak "))
    assert " cores x " in peak_line and " GHz (" in peak_line and " FLOP/cycle (" in peak_line
    lines = out.splitlines()
    port_rate = lines[lines.index(port_line) + 1]
    assert port_rate.split()[0] == "port" and port_rate.endswith("% of peak")


def test_a_failing_peer_is_one_line_and_the_benchmark_goes_on(tmp_path):
    port = tmp_path / "port"
    port.mkdir()
    (port / "train.py").write_text("# stand-in checkout\n")
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 'Traceback (most recent call last):' >&2\n"
                      "echo \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    result = bench("--precisions=float32", f"--peer={port}", f"--peer_python={python}")
    assert result.returncode == 0, result.stderr
    assert "peer (float32) left out: the peer worker exited (code 1): ModuleNotFoundError: No " \
        "module named 'torch'" in result.stdout.splitlines()
    assert "Traceback" not in result.stdout + result.stderr
    assert any(l.startswith("float32         realmix ") for l in result.stdout.splitlines())


def test_the_worker_reports_its_own_failure_in_one_line(tmp_path):
    """This Python has no torch: the real worker says so in one JSON line, and PeerProcess
    turns it into one PeerError line."""
    import importlib.util
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here")
    (tmp_path / "train.py").write_text("")
    worker = subprocess.run([sys.executable, os.path.join(ROOT, "runs", "peer_step.py"),
                             f"--peer={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert worker.returncode == 1 and "Traceback" not in worker.stderr
    assert worker.stdout == '{"error": "ModuleNotFoundError: No module named \'torch\'"}\n'
    with pytest.raises(peer_step.PeerError, match=r"^the peer worker failed: "
                       r"ModuleNotFoundError: No module named 'torch'$"):
        peer_step.PeerProcess(str(tmp_path), sys.executable, 4, "float32")


def test_torchvision_and_pil_stand_ins_cover_what_the_ports_imports_need(monkeypatch):
    """The port's train.py imports torchvision.transforms; its dataset/cifar10.py imports
    torchvision and PIL.Image and subclasses torchvision.datasets.CIFAR10."""
    missing = ("torchvision", "PIL", "tensorboardX", "matplotlib", "progress")
    for name in list(sys.modules):      # as in a fresh worker (other tests may import PIL)
        if name.split(".")[0] in missing:
            monkeypatch.delitem(sys.modules, name)
    before = set(sys.modules)
    try:
        stubbed = peer_step._stub_modules(lambda name: None if name in missing else object())
        assert stubbed == sorted(missing)
        namespace = {}
        exec("import torchvision.transforms as transforms\nimport torchvision\n"
             "from PIL import Image\nfrom progress.bar import Bar\n"
             "from tensorboardX import SummaryWriter\nimport matplotlib.pyplot as plt\n"
             "class CIFAR10_labeled(torchvision.datasets.CIFAR10):\n    pass\n", namespace)
        with pytest.raises(RuntimeError, match="torchvision is not installed"):
            namespace["CIFAR10_labeled"]("data", train=True)
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]


def test_installed_modules_are_not_replaced():
    before = set(sys.modules)
    try:
        assert peer_step._stub_modules(lambda name: object()) == []
        assert "torchvision" not in sys.modules
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]


def test_bench_step_peer_without_the_ports_train_py_is_a_user_error(tmp_path):
    result = bench("--precisions=float32", f"--peer={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --peer={tmp_path} has no train.py")
