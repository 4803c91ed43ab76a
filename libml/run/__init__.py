"""A run's folder and its survival: checkpoints, finite checks, lock, args, summaries."""
