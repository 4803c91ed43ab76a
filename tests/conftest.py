import os

from libml.base import machine as _platform

_platform.setup()   # before anything imports TensorFlow, as every entry point does
os.environ.setdefault("TF_DETERMINISTIC_OPS", "0")

import atexit
import shutil
import tempfile

import numpy as np
import pytest

from libml.train import precision_probe

# --mixed_precision=auto never times steps in the tests (slow, and flaky on a shared machine):
# the cache folder ($REALMIX_CACHE_DIR, inherited by the subprocesses the tests start; other
# tools' caches stay where they are) holds a fixed answer for this machine: float32 (timings
# 1.0 s vs 2.0 s).
_CACHE_DIR = tempfile.mkdtemp(prefix="realmix_tests_cache_")
atexit.register(shutil.rmtree, _CACHE_DIR, True)
os.environ[precision_probe.CACHE_DIR_ENV] = _CACHE_DIR
FIXED_AUTO_TIMINGS = {"float32": 1.0, "mixed_bfloat16": 2.0}
precision_probe.write_cache(precision_probe.cache_path(), dict(
    precision_probe.machine_key(), seconds_per_step=FIXED_AUTO_TIMINGS,
    probe="fixed by tests/conftest.py", measured="never"), print)


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_precision_measurement(monkeypatch):
    """A test that reaches the real measurement fails at once (inject `measure_fn` instead)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test reached the real precision measurement: inject timings")
    monkeypatch.setattr(precision_probe, "measure", refuse)


@pytest.fixture
def ml_data(tmp_path, monkeypatch):
    """An empty $ML_DATA folder for the test."""
    root = tmp_path / "ml_data"
    (root / "SSL").mkdir(parents=True)
    monkeypatch.setenv("ML_DATA", str(root))
    return root


@pytest.fixture
def rng():
    return np.random.RandomState(0)
