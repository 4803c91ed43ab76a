"""runs/gpu_check.py (issue 26): it skips cleanly without GPU, and on 2 logical CPU devices
prints its table with the one-device and the two-device global step equal."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check(*args, timeout=400):
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "runs.gpu_check", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_without_gpu_it_says_so_and_exits_0():
    out = check()
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("no GPU visible: nothing to check here")


@pytest.mark.slow
def test_table_on_two_logical_cpu_devices():
    out = check("--cpu_devices=2", "--filters=4", "--repeat=1", "--size=8", "--batch=8",
                "--steps=3")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    rows = {line.split("  ")[0]: line.split() for line in lines
            if line.startswith(("1 device", "2 devices"))}
    assert set(rows) == {"1 device (/cpu:0)", "2 devices, global"}, lines
    one, two = rows["1 device (/cpu:0)"], rows["2 devices, global"]
    assert one[-4] == "1" and two[-4] == "2"
    assert abs(float(one[-3]) - float(two[-3])) < 1e-4          # the last loss
    assert float(one[-2]) > 0 and float(two[-2]) > 0            # s/step measured
    verdict = [line for line in lines if line.startswith("largest difference")][0]
    assert verdict.endswith("EQUAL"), verdict
