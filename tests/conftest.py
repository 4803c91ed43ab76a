import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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
