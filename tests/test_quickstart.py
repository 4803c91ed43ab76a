"""README command 1 (runs/quickstart.py): the plan (RealMix's recipe, the mismatch mode), the
progress line, the table from recorded results without TensorFlow, and (slow) end to end at a
tiny size: data, split, Extend, three runs, table."""
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from libml.base import cli
from libml.run import run_error
from runs import quickstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--labels=20", "--nvalid=50", "--train_kimg=0.25", "--report_kimg=0.125", "--filters=8",
        "--extend=2", "--median_last=2"]


def quickstart_command(work_dir, *extra):
    command = [sys.executable, "-m", "runs.quickstart", f"--work_dir={work_dir}", *TINY, *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)


def plan_of(*argv):
    cli.parse(quickstart.FLAG_VALUES, ["quickstart", *argv])
    quickstart.check_flags(quickstart.FLAG_VALUES)
    return quickstart.make_plan(quickstart.FLAG_VALUES)


def flags_of(plan, algorithm):
    return next(r.command for r in plan.runs if r.algorithm == algorithm)


def test_realmix_row_runs_the_recipe_and_mixmatch_is_beside_it(tmp_path):
    plan = plan_of(f"--work_dir={tmp_path}")
    assert [r.algorithm for r in plan.runs] == ["realmix", "mixmatch", "supervised"]
    assert plan.dataset == "mnist5k.1@100-500"
    realmix, mixmatch = flags_of(plan, "realmix"), flags_of(plan, "mixmatch")
    # TSA as the paper with <= 250 labels, Extend (10 copies of 'erase'), gamma = auto.
    for flag in ("--tsa=linear", "--gamma=auto", "--extend=10", "--extend_aug=erase",
                 "--median_last=8", "--warmup_kimg=8"):
        assert flag in realmix, flag
    assert not any(a.startswith(("--tsa", "--gamma", "--extend")) for a in mixmatch)
    assert "--median_last=8" in flags_of(plan, "supervised")


def test_mismatch_mode_uses_the_mismatch_set_at_the_released_loss_scale(tmp_path):
    plan = plan_of(f"--work_dir={tmp_path}", "--mode=mismatch", "--mismatch=75")
    assert plan.dataset == "mnist6_mismatch75.1@60-200"
    realmix = flags_of(plan, "realmix")
    assert {"--loss_nclass=10", "--gamma=auto", "--tsa=linear", "--extend=10"} <= set(realmix)
    assert "--loss_nclass=10" in flags_of(plan, "mixmatch")
    assert plan_of(f"--work_dir={tmp_path}", "--mode=mismatch", "--nvalid=100").dataset == \
        "mnist6_mismatch50.1@60-100"


def test_names_are_the_registry_run_folder_prefixes():
    """Read from realmix_tf/registry.py's REGISTRY table (importing it would start TensorFlow)."""
    import ast
    with open(os.path.join(ROOT, "realmix_tf", "registry.py")) as f:
        tree = ast.parse(f.read())
    table = next(node.value for node in ast.walk(tree) if isinstance(node, ast.AnnAssign)
                 and getattr(node.target, "id", "") == "REGISTRY")
    registry = {key.value: call.args[1].value for key, call in zip(table.keys, table.values)}
    assert {k: registry[k] for k in quickstart.NAMES} == quickstart.NAMES


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_progress_line_says_run_i_of_n_and_the_time_left(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(quickstart.time, "time", clock)
    runs = [quickstart.Run("realmix", [], "r.json", "r.log"),
            quickstart.Run("supervised", [], "s.json", "s.log")]
    out = io.StringIO()                      # not a terminal: a line per quarter of a run
    progress = quickstart.Progress(runs, 32, stream=out)
    progress.begin(0)
    clock.now += 30
    progress.show(1.0)                       # first report: 30 s from the start (startup)
    clock.now += 70
    progress.show(8.0)                       # 7 kimg in 70 s
    clock.now += 10
    progress.show(9.0)                       # same quarter: not printed
    progress.end("RealMix: done")
    progress.begin(1)
    lines = out.getvalue().splitlines()
    assert lines[0] == ("quickstart: run 1/2 RealMix, kimg 0/32 | 0 % | 0 s elapsed, "
                        "time left: after the first reports")
    # Work: 32 x 2.8 (RealMix) + 32 x 1 (supervised) = 121.6. Between reports: 8 kimg x 2.8 =
    # 22.4 in 80 s; at kimg 8 (22.4 done), the first 70 s gave 19.6: left (121.6 - 22.4) x 70 /
    # 19.6 = 354.3 s + one run to start x 30 s.
    cost = quickstart.COST["realmix"]
    total, done = 32 * cost + 32, 8 * cost
    left = quickstart.duration((total - done) * 70 / (7 * cost) + 30)
    assert lines[1] == (f"quickstart: run 1/2 RealMix, kimg 8/32 | {100 * done / total:.0f} % | "
                        f"1 min 40 s elapsed, about {left} left")
    assert len(lines) == 4 and lines[2] == "RealMix: done"
    # Run 2: the rest of the work at 8 x 2.8 per 80 s, no run left to start.
    left = quickstart.duration(32 * 80 / (8 * cost))
    assert lines[3] == f"quickstart: run 2/2 Supervised, kimg 0/32 | 74 % | 1 min 50 s elapsed, about {left} left"


def test_run_error_is_one_number_named_one_way():
    tests = [10.0, 50.0, 90.0, 94.0, None, 96.0, 95.0]
    # Last 4: 94, None, 96, 95 -> median of the finite ones = 95.
    assert run_error.error_of(tests, 4) == pytest.approx(5.0)
    # Last 2: 96, 95 -> 95.5 (even window: the mean of the middle two, as np.median).
    assert run_error.error_of(tests, 2) == pytest.approx(4.5)
    rng = np.random.default_rng(0)
    values = list(rng.uniform(0, 100, 30))
    for n in (1, 5, 8, 20, 50):
        assert run_error.median_last(values, n) == pytest.approx(float(np.median(values[-n:])))
    assert run_error.error_of([None], 3) is None
    assert run_error.name(8, 32) == "test error % (median of the last 8 reports)"
    assert run_error.line(2.904, 8, 32) == "test error 2.90 % (median of the last 8 reports)"
    assert run_error.line(2.9, 20, 4) == "test error 2.90 % (median of all 4 reports)"
    assert run_error.name(1) == "test error % (the last report)"


def write_results(plan, tests):
    for run, accuracies in zip(plan.runs, tests):
        result = dict(algorithm=run.algorithm, name=run.name, command=run.command,
                      run_dir=os.path.join(plan.train_dir, plan.dataset, run.name + "_x"),
                      dataset=plan.dataset, test=accuracies, kimg=list(range(1, len(accuracies) + 1)),
                      median_last=8, error=run_error.error_of(accuracies, 8), wall_seconds=61.0,
                      true_outlier_share=0.5)
        if run.algorithm == "realmix":
            result.update(gamma=0.45, ood_share_estimate=0.46, gamma_trusted=True)
        os.makedirs(os.path.dirname(run.result_path), exist_ok=True)
        with open(run.result_path, "w") as f:
            json.dump(result, f)


def test_a_call_with_every_result_recorded_prints_the_table_without_tensorflow(tmp_path):
    plan = plan_of(f"--work_dir={tmp_path}", "--mode=mismatch")
    realmix = [50.0] * 24 + [97.0, 96.0, 98.0, 97.5, 96.5, 97.0, 98.5, 97.0]   # last 8: median 97.25
    write_results(plan, [realmix, [90.0] * 32, [80.0] * 31 + [81.0]])
    script = textwrap.dedent(f"""
        import sys
        sys.argv = ["quickstart", "--work_dir={tmp_path}", "--mode=mismatch"]
        import runpy
        try:
            runpy.run_module("runs.quickstart", run_name="__main__")
        except SystemExit as e:
            print("exit", e.code)
        print("tensorflow imported:", "tensorflow" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    out = result.stdout.splitlines()
    assert out[-2:] == ["exit 0", "tensorflow imported: False"], result.stdout + result.stderr
    assert not (tmp_path / "data").exists() and "$ " not in result.stdout   # nothing ran
    table = [line for line in out if line.startswith("| ")]
    assert table == [
        "| method | test error % (median of the last 8 reports) |",
        "| RealMix (TSA linear, Extend 10, γ = auto) | 3.00 |",
        "| MixMatch | 10.00 |",
        "| Supervised | 20.00 |",
    ]
    share = next(line for line in out if line.startswith("Share of outliers"))
    assert "estimate 0.460" in share and "true 0.500" in share


def test_more_errors_adds_the_other_windows_only_when_asked(tmp_path):
    plan = plan_of(f"--work_dir={tmp_path}", "--algorithms=supervised", "--more_errors")
    write_results(plan, [[60.0] * 12 + [70.0] * 10 + [80.0] * 9 + [90.0]])
    lines = quickstart.table(plan, quickstart.FLAG_VALUES, quickstart.read_results(plan))
    assert lines[1] == ("| method | test error % (median of the last 8 reports) | final report | "
                        "median of last 10 | median of last 20 |")
    assert lines[3] == "| Supervised | 20.00 | 10.00 | 20.00 | 25.00 |"
    plain = plan_of(f"--work_dir={tmp_path}", "--algorithms=supervised")
    assert quickstart.table(plain, quickstart.FLAG_VALUES, quickstart.read_results(plain))[1] == \
        "| method | test error % (median of the last 8 reports) |"


def test_true_outlier_share_counts_the_training_images_after_validation(tmp_path):
    plan = plan_of(f"--work_dir={tmp_path}", "--mode=mismatch", "--nvalid=2")
    path = os.path.join(plan.data_dir, "SSL", "mnist6_mismatch50.1@60-map.json")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:       # the 2 validation images first: not counted
        json.dump({"unlabel_in_distribution": [False, False, True, False, True, True]}, f)
    assert quickstart.true_outlier_share(plan) == pytest.approx(0.25)


def test_quickstart_rejects_unknown_algorithm(tmp_path):
    result = quickstart_command(tmp_path, "--algorithms=realmix,nosuchalgo")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown --algorithms ['nosuchalgo']")
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_quickstart_prepares_data_trains_three_and_prints_the_table(tmp_path):
    result = quickstart_command(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    data = tmp_path / "data"
    assert (data / "mnist5k-train.tfrecord").exists() and (data / "mnist5k-test.tfrecord").exists()
    assert (data / "SSL" / "mnist5k.1@20-label.tfrecord").exists()
    assert (data / "SSL" / "extend" / "mnist5k.1@20-50" / "erase2-seed0" / "manifest.json").exists()
    runs = sorted(os.listdir(tmp_path / "experiments" / "mnist5k.1@20-50"))
    assert [r.split("_")[0] for r in runs] == ["MixMatch", "RealMix", "Supervised"]
    realmix = next(r for r in runs if r.startswith("RealMix"))
    assert "gammaauto" in realmix and "tsalinear" in realmix and "extend2" in realmix
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| method | test error % (median of the last 2 reports) |"
    assert [row.split("|")[1].strip() for row in table[1:]] == [
        "RealMix (TSA linear, Extend 2, γ = auto)", "MixMatch", "Supervised"]
    # The table's number is the trainer's last line's, named the same way.
    for row, log in zip(table[1:], sorted(os.listdir(tmp_path / "logs"), key=lambda n: "RMS".index(n[0]))):
        error = row.split("|")[2].strip()
        with open(tmp_path / "logs" / log) as f:
            assert f"test error {error} % (median of the last 2 reports)" in f.read()
    assert "quickstart: run 3/3 Supervised" in result.stdout
    assert "Share of outliers" in result.stdout

    # A second call trains nothing and prints the same table.
    again = quickstart_command(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "$ " not in again.stdout
    assert [l for l in again.stdout.splitlines() if l.startswith("| ")] == table
