"""libml: the shared library of realmix_tf. Importing it sets TensorFlow up for the machine
(libml.platform.setup) before anything imports TensorFlow."""
from libml import platform as _platform

_platform.setup()
