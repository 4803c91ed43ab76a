"""runs/profile_step: one profiled RealMix step on a tiny network, its op time by family."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_profile_step_shares_cover_the_op_time():
    result = subprocess.run(
        [sys.executable, "-m", "runs.profile_step", "--filters=4", "--repeat=1", "--batch=4",
         "--size=8", "--precisions=float32"], cwd=ROOT, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^float32: [0-9.]+ s of op time \(both threads\) in one step, batch 4",
                     out, re.M)
    shares = dict(re.findall(r"^  ([A-Za-z /]+?)\s+([0-9.]+) %$", out, re.M))
    assert set(shares) == {"conv forward", "conv backward", "batch norm", "leaky relu",
                           "copies", "cast", "optimizer / EMA / WD", "other"}
    assert abs(sum(float(v) for v in shares.values()) - 100) < 0.5
    assert float(shares["conv forward"]) > 0 and float(shares["conv backward"]) > 0
    assert float(shares["batch norm"]) > 0
