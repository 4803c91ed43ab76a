"""runs/miniature.py: the cell grid, the statistics, and a --quick smoke run (two cells)."""
import json
import os

import pytest

from libml.base.errors import UserError
from runs import miniature


def test_default_grid_counts_and_sharing():
    s = miniature.Settings()
    cells = miniature.build_cells(s)
    per_experiment = {e: sum(c.experiment == e for c in cells) for e in miniature.DEFAULT_EXPERIMENTS}
    # 5 methods x 2 sizes, 4 methods x 5 levels, 3 gammas + supervised; times 2 seeds
    assert per_experiment == {"sizes": 20, "mismatch": 40, "ablation": 8}
    # Supervised: one run per seed for the 5 levels; gamma 0.6 at 75 % shared with the ablation.
    assert len(miniature.unique_runs(cells)) == 20 + (3 * 5 + 1) * 2 + 2 * 2
    # The paper commands' CIFAR-10 settings; the mismatch sets at the released loss scale.
    hp = {(c.experiment, c.row): dict(c.run.hparams) for c in cells}
    assert hp[("sizes", "PiModel")]["consistency_weight"] == 20
    assert hp[("sizes", "VAT")]["mixed_precision"] == "none"
    assert hp[("mismatch", "MeanTeacher")]["wd"] == 0.2
    assert all(dict(c.run.hparams)["loss_nclass"] == 10 for c in cells
               if c.experiment in ("mismatch", "ablation") and c.row != "Supervised")
    vat = next(c.run for c in cells if c.row == "VAT")
    assert miniature.train_flags(vat, s, "/data", "/runs")["mixed_precision"] == "none"
    sup = {c.run for c in cells if c.experiment == "mismatch" and c.row == "Supervised" and c.seed == 1}
    assert len(sup) == 1
    realmix = {c.column: dict(c.run.hparams)["gamma"] for c in cells
               if c.experiment == "mismatch" and c.row.startswith("RealMix") and c.seed == 2}
    assert realmix == {"0%": 0.0, "25%": 0.2, "50%": 0.4, "75%": 0.6, "100%": 0.85}
    ablation = [c.run for c in cells if c.experiment == "ablation" and "0.6" in c.row and c.seed == 2]
    mismatch75 = [c.run for c in cells if c.experiment == "mismatch" and c.column == "75%"
                  and c.row.startswith("RealMix") and c.seed == 2]
    assert ablation == mismatch75
    assert all(c.run.dataset == "mnist6_mismatch75.1@60-200" for c in cells
               if c.experiment == "ablation" and c.seed == 1 and c.row != "Supervised")
    assert {c.run for c in cells if c.experiment == "ablation" and c.row == "Supervised"} == {
        c.run for c in cells if c.experiment == "mismatch" and c.row == "Supervised"}
    sizes_rm = [c.run for c in cells if c.experiment == "sizes" and c.row == "RealMix"]
    assert all(dict(r.hparams)["tsa"] == "linear" and r.extend == 10 for r in sizes_rm)
    assert all(r.extend == 0 for r in miniature.unique_runs(cells) if r.method != "RealMix")
    assert dict(sizes_rm[0].hparams)["warmup_kimg"] == 8.0        # 0.25 x 32 kimg
    assert miniature.run_decay(s) == 1 - 10 / 512                 # --short_run_scaling
    assert miniature.run_decay(miniature.Settings(train_kimg=0.25, batch=32)) == 0.0
    flags_ = miniature.train_flags(sizes_rm[0], s, "/data", "/runs")
    assert flags_["short_run_scaling"] is True and "ema" not in flags_ and flags_["extend"] == 10


def test_gamma_auto_grid_shares_the_hand_and_no_mask_runs():
    s = miniature.Settings(seeds=(1,), experiments=("mismatch", "ablation", "gamma_auto"))
    cells = miniature.build_cells(s)
    auto = [c for c in cells if c.experiment == "gamma_auto"]
    assert len(auto) == 3 * 5
    gammas = {(c.row, c.column): dict(c.run.hparams)["gamma"] for c in auto}
    assert {k[1]: v for k, v in gammas.items() if k[0] == "RealMix (γ = auto)"} == {
        f"{level}%": "auto" for level in miniature.LEVELS}
    assert {v for k, v in gammas.items() if k[0] == "RealMix (γ = 0)"} == {0.0}
    hand = {c.run for c in auto if c.row == "RealMix (γ per level)"}
    assert hand == {c.run for c in cells if c.experiment == "mismatch" and c.row.startswith("RealMix")}
    # New runs: 5 auto + 3 no-mask (at 0 % the hand gamma is 0; at 75 % it is the ablation's).
    assert len(miniature.unique_runs(cells)) - len(miniature.unique_runs(
        [c for c in cells if c.experiment != "gamma_auto"])) == 8
    assert miniature.train_flags(auto[0].run, s, "/d", "/r")["gamma"] == "auto"


def test_median_error_and_cells():
    assert miniature.median_error([10.0, 50.0, 90.0, 94.0, 96.0], 3) == pytest.approx(100 - 94.0)
    assert miniature.median_error([80.0, None, 90.0], 2) == pytest.approx(10.0)
    assert miniature.median_error([], 4) is None
    assert miniature.format_cell([10.0, 12.0]) == "11.00 ± 1.41"
    assert miniature.format_cell([7.5]) == "7.50"


@pytest.mark.parametrize("argv,match", [
    (["--experiments=tables"], "--experiments"),
    (["--methods=FixMatch"], "--methods"),
    (["--seeds=0"], "seeds >= 1"),
    (["--sizes=5"], "label counts"),
    (["--reports=4", "--median_last=5"], "median_last"),
    (["--train_kimg=0.01", "--reports=16"], "shorter than one batch"),
])
def test_bad_flags(argv, match):
    with pytest.raises(UserError, match=match):
        miniature.main(["miniature"] + argv)


def test_quick_run_writes_table_and_plot(tmp_path):
    from PIL import Image
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["miniature", "--quick", "--experiments=sizes", "--methods=Supervised,RealMix",
            "--seeds=1,2", "--sizes=50,100", f"--work_dir={work}", f"--output={out}",
            "--nodata_autotune"]
    assert miniature.main(argv) == 0

    text = (out / "results.md").read_text()
    assert "| method | 50 labels |" in text and "100 labels" not in text     # --quick: first size
    rows = [line for line in text.splitlines() if line.startswith(("| Supervised |", "| RealMix |"))]
    assert len(rows) == 4 and rows[:2] == rows[2:]      # mean table, then the per-seed table
    assert "Error % per seed (1):" in text
    for row in rows:
        error = float(row.split("|")[2])
        assert 0.0 <= error <= 100.0
    assert "Seeds 1 (" in text and "0.25 kimg" in text and "test error % (the last report), of 2 reports per run" in text
    with Image.open(out / "sizes.png") as png:
        assert png.format == "PNG" and png.size[0] > 300 and png.size[1] > 200

    result = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in result["runs"]] == ["Supervised", "RealMix"]
    for r in result["runs"]:
        assert len(r["test"]) == 2 and r["error"] == pytest.approx(100 - r["test"][-1])
        assert not os.path.isabs(r["run_dir"])            # relative to --work_dir
        history = json.loads((open(os.path.join(work, r["run_dir"], "stats", "accuracy_history.json"))).read())
        assert [h["test"] for h in history] == r["test"]
    assert result["runs"][1]["extend"] == 2 and "extend2" in result["runs"][1]["run_dir"]
    assert result["tables"]["sizes"]["errors"]["Supervised"]["50 labels"] == [result["runs"][0]["error"]]
    assert result["meta"]["runs_trained"] == 2

    os.remove(out / "sizes.png")
    assert miniature.main(argv) == 0                     # finished runs are reused, not retrained
    again = json.loads((out / "results.json").read_text())
    assert again["meta"]["runs_trained"] == 0 and os.path.exists(out / "sizes.png")
    assert again["tables"] == result["tables"]


def test_command_line_exit_code(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "runs.miniature", "--experiments=tables",
                           f"--work_dir={tmp_path}"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --experiments=tables: use one or more of sizes,mismatch,ablation,gamma_auto,"
        "ood_score"]
    assert not os.listdir(tmp_path)                     # nothing prepared or trained
