# Sets TensorFlow up for the machine (oneDNN, log level, quiet CUDA probe) before any module of
# this package imports TensorFlow: see libml/platform.py.
from libml import platform as _platform

_platform.setup()
