"""What the tools print: usage lines, counts, where the export went, the classes and channels
of a custom dataset, an error line after a progress bar (issue 24, item 10)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from libml.base import cli
from libml.base.console import plural
from libml.export.saving import export_note
from tests import fixtures_archives as fx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_usage_line_names_the_module_the_user_ran():
    assert cli.command_name(os.path.join(REPO, "runs", "quickstart.py")) == "python -m runs.quickstart"
    assert cli.command_name(os.path.join(REPO, "data_prep", "create_split.py")) == \
        "python -m data_prep.create_split"
    assert cli.command_name(os.path.join(REPO, "realmix_tf", "predict.py")) == "python -m realmix_tf.predict"
    assert cli.command_name("/venv/bin/realmix-quickstart") == "realmix-quickstart"   # entry point
    assert cli.command_name("plot") == "plot"


def test_quickstart_help_names_runs_quickstart(tmp_path):
    """From a folder outside the repository (the project on the path, as `pip install -e .` puts it)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-m", "runs.quickstart", "--help"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "usage: python -m runs.quickstart [flags]"


def test_plural():
    assert [plural(n, "curve") for n in (0, 1, 2)] == ["0 curves", "1 curve", "2 curves"]
    assert plural(1, "class", "classes") == "1 class" and plural(3, "class", "classes") == "3 classes"


def test_plot_counts_one_curve_in_the_singular(tmp_path, capsys):
    from runs import plot
    from tests.test_plot import fake_run
    fake_run(tmp_path / "exp", "mnist5k.1@100-1", "RealMix_a", [50.0, 80.0, 97.5])
    out = str(tmp_path / "curves.png")
    plot.main(["plot", str(tmp_path / "exp"), f"--output={out}"])
    assert capsys.readouterr().out.strip() == f"drew 1 curve of 1 run -> {out}"


def test_export_note_names_the_files_and_the_predict_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "exp" / "toy.1@4-1" / "RealMix_x" / "export"
    paths = {"keras": str(folder / "model.keras"), "saved_model": str(folder / "saved_model")}
    rel = os.path.join("exp", "toy.1@4-1", "RealMix_x", "export")
    assert export_note(paths) == (
        f"  export    {os.path.join(rel, 'model.keras')} (plain Keras), "
        f"{os.path.join(rel, 'saved_model')} (SavedModel); predict with: "
        f"python -m realmix_tf.predict --model={rel} IMAGES")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")           # the export is not under it: absolute
    assert f"--model={folder} IMAGES" in export_note(paths)


def test_custom_dataset_prints_its_classes_and_why_three_channels(tmp_path, capsys):
    from data_prep import create_datasets as cd
    from PIL import Image
    src = tmp_path / "src"
    fx.write_image_folders(str(src / "l"), {"zebra": 2, "ant": 2}, shape=(12, 12, 1))
    fx.write_image_folders(str(src / "t"), {"ant": 1, "zebra": 1}, shape=(12, 12, 1))
    Image.new("RGB", (12, 12), (200, 10, 10)).save(src / "l" / "ant" / "red.png")
    cd.main(["create_datasets", "custom", "--name=c", f"--labeled_dir={src / 'l'}",
             f"--test_dir={src / 't'}", "--size=8", f"--data_dir={tmp_path / 'data'}"])
    lines = capsys.readouterr().out.splitlines()
    assert f"classes (2, label = position, from the sub-folder names of {src / 'l'}): ant, zebra" in lines
    assert ("channels 3 (RGB): 1 of 7 images are in colour; the 6 grayscale ones are repeated "
            "to 3 channels") in lines
    os.remove(src / "l" / "ant" / "red.png")
    cd.main(["create_datasets", "custom", "--name=g", f"--labeled_dir={src / 'l'}",
             f"--test_dir={src / 't'}", "--size=8", f"--data_dir={tmp_path / 'data'}"])
    assert "channels 1: all 6 images are grayscale" in capsys.readouterr().out.splitlines()


class _FakePredictor:
    shape, class_names = (8, 8, 3), ["a", "b"]
    ood, ood_note = None, "info: no OOD reference"

    def __init__(self, path):
        pass

    def outputs(self, images):
        return np.full((len(images), 2), 0.5, np.float32), None


def test_predict_error_line_starts_on_its_own_line_after_the_bar(tmp_path, monkeypatch, capsys):
    from realmix_tf import predict
    monkeypatch.setattr(predict, "_resolve_model", lambda path: path)
    monkeypatch.setattr(predict, "Predictor", _FakePredictor)
    folder = tmp_path / "images"
    fx.write_image_folders(str(folder), {"x": 3}, shape=(8, 8, 3))
    (folder / "x" / "zz_broken.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit) as stop:
        cli.run(predict.main, predict.FLAGS, ["predict", "--model=m", str(folder), "--batch=2",
                                              f"--output={tmp_path / 'p.csv'}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "predicting" in err                                 # the bar was shown
    errors = [line for line in err.split("\n") if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: unreadable image"), err
