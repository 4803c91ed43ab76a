"""README command 1 (runs/quickstart.py) end to end at a tiny size: data, split, two runs, table."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickstart(work_dir, *extra):
    command = [sys.executable, "-m", "runs.quickstart", f"--work_dir={work_dir}", "--labels=20",
               "--nvalid=50", "--train_kimg=0.25", "--report_kimg=0.125", "--filters=8", *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quickstart_prepares_data_trains_both_and_prints_the_table(tmp_path):
    result = quickstart(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = tmp_path / "data"
    assert (data / "mnist5k-train.tfrecord").exists() and (data / "mnist5k-test.tfrecord").exists()
    assert (data / "SSL" / "mnist5k.1@20-label.tfrecord").exists()
    runs = sorted(os.listdir(tmp_path / "experiments" / "mnist5k.1@20-50"))
    assert [r.split("_")[0] for r in runs] == ["RealMix", "Supervised"]
    for run in runs:
        assert (tmp_path / "experiments" / "mnist5k.1@20-50" / run / "stats" / "accuracy.json").exists()
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| method |")
    assert [row.split("|")[1].strip() for row in table[1:]] == ["RealMix", "Supervised"]
    for row in table[1:]:
        errors = [float(cell) for cell in row.split("|")[2:4]]
        assert all(0 <= e <= 100 for e in errors)

    # A second call trains nothing and prints the same table.
    again = quickstart(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "$ " not in "\n".join(l for l in again.stdout.splitlines() if "create_" in l)
    assert [l for l in again.stdout.splitlines() if l.startswith("| ")] == table


def test_quickstart_rejects_unknown_algorithm(tmp_path):
    result = quickstart(tmp_path, "--algorithms=realmix,nosuchalgo")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown --algorithms ['nosuchalgo']")
    assert not (tmp_path / "data").exists()
