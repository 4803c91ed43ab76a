"""libml/base/console.py: the start banner and the whole-run progress bar."""
import re

import pytest

from libml.base import console

def test_human_and_strategy():
    assert console.human(1234) == "1,234" and console.human(1_470_000) == "1.47 M"
    import tensorflow as tf
    assert console.describe_strategy(tf.distribute.get_strategy()) == "1 x CPU (default strategy)"

    class Extended:
        worker_devices = ("/job:localhost/replica:0/task:0/device:GPU:0",
                          "/job:localhost/replica:0/task:0/device:GPU:1")

    class MirroredStrategy:
        extended, num_replicas_in_sync = Extended(), 2

    assert console.describe_strategy(MirroredStrategy()) == "2 x GPU (MirroredStrategy)"


def test_parameters_of_a_keras_model():
    import keras
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.BatchNormalization()])
    assert console.count_parameters(model) == 3 * 2 + 2 + 4 * 2


def test_banner_lines():
    lines = console.banner("RealMix", "exp/toy.1@30-10/RealMix_a", "toy.1@30-10",
                           dict(labeled=30, unlabeled=110, valid=10, test=None), (8, 8, 3), 3,
                           "WRN filters 8 repeat 1 scales 2", 12_345, "1 x CPU (default strategy)",
                           "precision float32 (--mixed_precision=none); oneDNN on; CPU X",
                           "resuming from exp/tf/model.ckpt-2048", 2048, 8192)
    assert lines == [
        "RealMix  exp/toy.1@30-10/RealMix_a",
        "  data      toy.1@30-10: 30 labeled, 110 unlabeled, 10 valid, ? test (8x8x3, 3 classes)",
        "  model     WRN filters 8 repeat 1 scales 2: 12,345 parameters",
        "  device    1 x CPU (default strategy)",
        "  precision float32 (--mixed_precision=none); oneDNN on; CPU X",
        "  start     resuming from exp/tf/model.ckpt-2048 (2 kimg), run length 8 kimg",
    ]


def test_run_progress_covers_the_whole_run_from_the_resumed_position(capsys):
    with console.RunProgress(step=2048, train_nimg=8192, report_nimg=2048, desc="RealMix") as bar:
        assert (bar.bar.n, bar.bar.total) == (2048, 8192)
        bar.update(2048)
        bar.report(4096, 91.5)
        bar.write("kimg 4 accuracy ...")
        assert bar.bar.n == 4096
    err = capsys.readouterr()
    assert "kimg 4 accuracy ..." in err.err
    last = err.err.replace("\r", "\n").strip().splitlines()[-1]
    assert re.search(r"RealMix +50%\|.*\| 4\.10k/8\.19k img \[.*<.*\], report 3/4, test 91\.50 %", last), last


def test_disabled_or_finished_prints_plainly(capsys):
    bar = console.RunProgress(step=0, train_nimg=1024, report_nimg=512, enabled=False)
    bar.update(512)
    bar.report(512, 50.0)
    bar.write("line")
    bar.close()
    done = console.RunProgress(step=1024, train_nimg=1024, report_nimg=512)
    assert done.bar is None
    out = capsys.readouterr()
    assert out.err == "line\n" and out.out == ""
