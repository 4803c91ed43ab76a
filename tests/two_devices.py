"""Runs a test script in a fresh Python process whose CPU is split into logical devices
(TensorFlow can split it only before it initialises its devices), bounded by a timeout."""
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = """
import tensorflow as tf

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * {n})
"""


def run_script(code: str, devices: int = 2, timeout: float = 300, env=None) -> str:
    """Runs `code` after splitting the CPU into `devices` logical devices; returns its stdout.
    Fails (AssertionError with the script's stderr) on a non-zero exit or a timeout."""
    script = PRELUDE.format(n=devices) + textwrap.dedent(code)
    environment = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    try:
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                                text=True, env=environment, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise AssertionError(f"script timed out after {timeout} s:\n{err[-3000:]}") from None
    assert result.returncode == 0, f"script failed:\n{result.stderr[-4000:]}"
    return result.stdout


def toy_mirrored(batch: int) -> str:
    """Script lines (after PRELUDE) that make `strategy`, a MirroredStrategy over the two CPU
    devices, and `data`: 32 random 8x8x3 labeled images of 4 classes zipped with 32 unlabeled
    pairs of views, repeated, in global batches of `batch`."""
    return f"""
import numpy as np
from realmix_tf.realmix import RealMix

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
rng = np.random.RandomState(0)
lab = tf.data.Dataset.from_tensor_slices({{"image": rng.uniform(-1, 1, (32, 8, 8, 3)).astype("f4"),
                                          "label": rng.randint(0, 4, 32)}})
unl = tf.data.Dataset.from_tensor_slices({{"image": rng.uniform(-1, 1, (32, 2, 8, 8, 3)).astype("f4")}})
data = tf.data.Dataset.zip((lab, unl)).repeat().batch({batch}, drop_remainder=True)
"""
