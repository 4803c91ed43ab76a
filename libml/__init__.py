"""libml: the shared library of realmix_tf. Importing it sets TensorFlow up for the machine
(libml.base.machine.setup) before anything imports TensorFlow."""
from libml.base import machine as _platform

_platform.setup()
