import os

# Hide TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notes) unless the user set a level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
