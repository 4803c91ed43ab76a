"""data_prep/check_split.py: overlap matrix, planted leaks, exit codes, errors."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep import check_split as ck
from data_prep import create_split
from libml.data import records
from libml.base.errors import UserError
from tests import fixtures_archives as fx


@pytest.fixture
def split_root(tmp_path, monkeypatch):
    """A 5-class dataset of distinct 6x6 images with a seed-1 split of 20 labels."""
    monkeypatch.setenv("ML_DATA", str(tmp_path))
    images = fx.random_images(150, (6, 6, 3), seed=7)
    labels = np.arange(150) % 5
    fx.write_record_dataset(str(tmp_path), "toy", {"train": (images[:120], labels[:120]),
                                                    "test": (images[120:], labels[120:])})
    create_split.create_split(str(tmp_path / "SSL" / "toy"), [str(tmp_path / "toy-train.tfrecord")], 20, seed=1)
    return tmp_path


def test_clean_split_exit_0(split_root, capsys):
    assert ck.main(["check_split", "--dataset=toy.1@20-10"]) == 0
    out = capsys.readouterr().out
    assert "no leak" in out and "LEAK" not in out
    assert " valid" in out and "test" in out


def _png(image, level):
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def test_planted_test_leak_is_caught_even_re_encoded(split_root, capsys):
    unlabel = split_root / "SSL" / "toy.1@20-unlabel.tfrecord"
    test_images, test_labels = records.load_numpy(str(split_root / "toy-test.tfrecord"))
    kept = list(records.iterate_serialized(str(unlabel)))
    # a test image re-encoded with another PNG compression level, planted after the validation part
    leaked = records.serialize_example(_png(test_images[3], 0), int(test_labels[3]))
    records.write_serialized(str(unlabel), kept[:15] + [leaked] + kept[15:], overwrite=True)
    assert ck.main(["check_split", "--dataset=toy.1@20-10"]) == 1
    out = capsys.readouterr().out
    assert "LEAK: 1 images of test in unlabeled (positions in the first set: 3)" in out
    assert ck.main(["check_split", "--dataset=toy.1@20-20"]) == 1        # now inside the validation part
    assert "LEAK: 1 images of test in valid" in capsys.readouterr().out


def test_overlap_matrix_counts():
    sets = ck.split_sets([b"a", b"b"], [b"v", b"a", b"u", b"u"], [b"t", b"b"], nvalid=1)
    matrix = ck.overlap_matrix(sets)   # order: labeled, unlabeled, valid, test
    assert matrix.tolist() == [[0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    assert ck.leaks(sets) == {"test in labeled": [1], "labeled in unlabeled": [0]}


def test_labeled_in_unlabeled_explicit_files_subprocess(split_root):
    """Exit code 1 from the command line when the labeled file is the whole train set."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.check_split", f"--labeled={split_root / 'toy-train.tfrecord'}",
         f"--unlabeled={split_root / 'SSL' / 'toy.1@20-unlabel.tfrecord'}",
         f"--test={split_root / 'toy-test.tfrecord'}", "--nvalid=5"],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 1, proc.stderr[-500:]
    assert "LEAK: 95 images of labeled in unlabeled" in proc.stdout
    assert "LEAK: 5 images of labeled in valid" in proc.stdout


def test_errors(split_root):
    with pytest.raises(UserError, match="malformed dataset name 'toy@20'"):
        ck.main(["c", "--dataset=toy@20"])
    with pytest.raises(UserError, match=r"missing .*toy.2@20-label.tfrecord"):
        ck.main(["c", "--dataset=toy.2@20-10"])
    with pytest.raises(UserError, match="validation size 500 exceeds the 100 unlabeled records"):
        ck.main(["c", "--dataset=toy.1@20-500"])
    with pytest.raises(UserError, match="nothing to check"):
        ck.main(["c", f"--labeled={split_root / 'toy-train.tfrecord'}"])
    fx.corrupt_file(str(split_root / "toy-test.tfrecord"))
    with pytest.raises(UserError, match="corrupt TFRecord .*toy-test.tfrecord"):
        ck.main(["c", "--dataset=toy.1@20-10"])
