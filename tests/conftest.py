import os

from libml import platform as _platform

_platform.setup()   # before anything imports TensorFlow, as every entry point does
os.environ.setdefault("TF_DETERMINISTIC_OPS", "0")

import numpy as np
import pytest


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
