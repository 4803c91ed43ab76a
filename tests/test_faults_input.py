"""Hostile but realistic inputs (issue 25): nothing a user's file contains runs, nothing grows
without bound, and each bad input ends in one line.

Beside tests/test_faults.py (issue 14's faults of a long run); the same standards: every test
here failed before its fix.
"""
import csv
import io as python_io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from libml.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# CIFAR archives: a pickle runs nothing

class _Exploit:
    """Pickles to a call of os.system, as a crafted archive would."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _write_archive(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, python_io.BytesIO(data))


def _cifar_members(batch_of):
    rows = np.zeros([2, 3072], np.uint8)
    good = {b"batch_label": b"x", b"data": rows, b"labels": [1, 2], b"filenames": [b"a", b"b"]}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {n: pickle.dumps(batch_of(n, dict(good)), protocol=2) for n in names}


def _read(path):
    from data_prep import archives
    return archives.read_cifar_archive(str(path), "python", "cifar10")


def test_a_crafted_cifar_archive_runs_nothing_and_is_one_line(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "cifar-10-python.tar.gz"
    _write_archive(path, _cifar_members(
        lambda n, b: {**b, b"data": _Exploit(f"touch {marker}")} if n == "data_batch_3" else b))
    with pytest.raises(UserError) as e:
        _read(path)
    assert not marker.exists()
    message = str(e.value)
    assert "data_batch_3 is not a CIFAR batch (it names posix.system" in message
    assert "nothing in it was run" in message and "\n" not in message


@pytest.mark.parametrize("payload, reason", [
    (lambda b: [b[b"data"]], "it pickles a list, not a dict"),
    (lambda b: {**b, b"data": "text"}, "b'data' is a str, not an array of N x 3072"),
    (lambda b: {**b, b"labels": [1]}, "'labels' is a list, not 2 labels"),
    (lambda b: {**b, b"data": np.zeros([2, 3072], object)}, "dtype('O') is not part of"),
    (lambda b: {**b, b"data": np.zeros([2, 5], np.uint8)}, "shape (2, 5)"),
])
def test_a_cifar_batch_of_the_wrong_type_is_one_line(tmp_path, payload, reason):
    path = tmp_path / "cifar-10-python.tar.gz"
    _write_archive(path, _cifar_members(lambda n, b: payload(b) if n == "test_batch" else b))
    with pytest.raises(UserError) as e:
        _read(path)
    assert f"{path}: test_batch is not a CIFAR batch" in str(e.value)
    assert reason in str(e.value), str(e.value)


def test_labels_outside_the_classes_are_refused(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    _write_archive(path, _cifar_members(lambda n, b: {**b, b"labels": [1, 10]}))
    with pytest.raises(UserError, match=r"labels outside 0\.\.9"):
        _read(path)


def test_real_cifar_pickles_of_numpy_1_and_2_still_read(tmp_path):
    from data_prep import cifar_pickle
    rows = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072) % 256
    batch = {b"data": rows.astype(np.uint8), b"labels": [3, 4]}
    data = pickle.dumps(batch, protocol=2)
    numpy1 = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")   # older writers
    for blob in (data, numpy1):
        got_rows, labels = cifar_pickle.load_batch(blob, "labels", "x")
        np.testing.assert_array_equal(got_rows, rows)
        assert labels.tolist() == [3, 4] and labels.dtype == np.int64
    # Python 2's cPickle (the original archives) stores bytes as strings read with encoding=bytes
    py2 = (b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\n"
           b"ndarray\nq\x03K\x00\x85U\x01b\x87Rq\x04(K\x01K\x01M\x00\x0c\x86cnumpy\ndtype\nq\x05"
           b"U\x02u1K\x00K\x01\x87Rq\x06(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
           b"\x89T\x00\x0c\x00\x00" + bytes(range(256)) * 12 + b"tbU\x06labelsq\x07]q\x08K\x05au.")
    got_rows, labels = cifar_pickle.load_batch(py2, "labels", "x")
    assert got_rows.shape == (1, 3072) and got_rows[0, :256].tolist() == list(range(256))
    assert labels.tolist() == [5]
