"""runs/plot.py: error curves of runs read from their report history, drawn to a PNG."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from libml.base.errors import UserError
from runs import plot


def fake_run(root, dataset, run, tests, valids=None):
    folder = os.path.join(str(root), dataset, run)
    os.makedirs(os.path.join(folder, "stats"))
    history = [dict(step=(i + 1) * 2048, kimg=2.0 * (i + 1), test=t, train_labeled=100.0,
                    valid=None if valids is None else valids[i]) for i, t in enumerate(tests)]
    with open(os.path.join(folder, "stats", "accuracy_history.json"), "w") as f:
        json.dump(history, f)
    with open(os.path.join(folder, "stats", "accuracy.json"), "w") as f:   # as the trainer
        json.dump({"reports": len(tests)}, f)
    return folder


def colour_pixels(path, rgb, tol=40):
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(pixels - np.asarray(rgb)).sum(-1) < tol).sum())


def test_curves_are_error_by_kimg(tmp_path):
    run = fake_run(tmp_path, "mnist5k.1@100-1", "RealMix_a", [50.0, 80.0, 97.5], [40.0, 70.0, 90.0])
    got = plot.curves(run, ["test", "valid"])
    assert got["test"] == ([2.0, 4.0, 6.0], [50.0, 20.0, 2.5])
    assert got["valid"] == ([2.0, 4.0, 6.0], [60.0, 30.0, 10.0])
    assert plot.curves(fake_run(tmp_path, "x.1@1-1", "Empty", []), ["test"]) == {}


def test_curve_from_event_files_when_there_is_no_history(tmp_path):
    """Runs of the released code (or an older trainer) have only TensorBoard events."""
    import tensorflow as tf
    folder = tmp_path / "exp" / "cifar10.1@250-1" / "RealMix_old"
    writer = tf.summary.create_file_writer(str(folder / "tf"))
    with writer.as_default():
        for step, accuracy in ((1024, 40.0), (2048, 75.0), (3072, 90.0)):
            tf.summary.scalar("accuracy_test", accuracy, step=step)     # the released tag
    writer.close()
    assert plot.curves(str(folder)) == {"test": ([1.0, 2.0, 3.0], [60.0, 25.0, 10.0])}
    assert plot.curves(str(folder), ["valid"]) == {}


def test_short_labels():
    runs = ["e/cifar10.1@250-1/RealMix_batch64_gamma0.5_lr0.002", "e/cifar10.1@250-1/RealMix_batch64_gamma0.0_lr0.002",
            "e/cifar10.1@250-1/Supervised_batch64_lr0.002"]
    assert list(plot.labels(runs).values()) == ["RealMix gamma0.5", "RealMix gamma0.0", "Supervised"]
    short = plot.labels(["e/c.1@1-1/RealMix_gamma0.5_0a1b2c3d", "e/c.1@1-1/RealMix_0f0f0f0f",
                         "e/c.1@1-1/RealMix_nu3_12345678", "e/c.1@1-1/RealMix_nu3_87654321"])
    assert list(short.values()) == ["RealMix gamma0.5", "RealMix", "RealMix nu3 12345678",
                                    "RealMix nu3 87654321"]      # the digest only where labels tie
    two = plot.labels(["e/a.1@1-1/RealMix_x1", "e/b.1@1-1/RealMix_x1"])
    assert list(two.values()) == ["a.1@1-1 RealMix", "b.1@1-1 RealMix"]


def test_draws_one_coloured_line_per_run(tmp_path):
    fake_run(tmp_path / "exp", "mnist5k.1@100-1", "RealMix_a", [50.0, 80.0, 97.5])
    fake_run(tmp_path / "exp", "mnist5k.1@100-1", "Supervised_b", [40.0, 60.0, 83.0])
    out = str(tmp_path / "curves.png")
    plot.main(["plot", str(tmp_path / "exp"), f"--output={out}"])
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (800, 500)
    assert colour_pixels(out, (0x1F, 0x77, 0xB4)) > 100      # matplotlib C0: the first run
    assert colour_pixels(out, (0xFF, 0x7F, 0x0E)) > 100      # C1: the second run
    before = open(out, "rb").read()
    with pytest.raises(UserError, match="already exists: pass --overwrite"):
        plot.main(["plot", str(tmp_path / "exp"), f"--output={out}"])
    assert open(out, "rb").read() == before


def test_errors(tmp_path):
    fake_run(tmp_path / "exp", "d.1@1-1", "Run", [])
    out = str(tmp_path / "c.png")
    with pytest.raises(UserError, match="no reports yet"):
        plot.main(["plot", str(tmp_path / "exp"), f"--output={out}"])
    assert not os.path.exists(out)
    with pytest.raises(UserError, match="--sets=bogus: choose from test, valid, train_labeled"):
        plot.main(["plot", str(tmp_path / "exp"), "--sets=bogus", f"--output={out}"])
    with pytest.raises(UserError, match="name a .png file"):
        plot.main(["plot", str(tmp_path / "exp"), "--output=c.jpg"])
    with pytest.raises(UserError, match="name the run folders"):
        plot.main(["plot"])
