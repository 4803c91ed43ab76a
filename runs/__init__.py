# Sets TensorFlow up for the machine (oneDNN, log level, quiet CUDA probe) before any module of
# this package imports TensorFlow: see libml/base/machine.py.
from libml.base import machine as _platform

_platform.setup()
