"""Training: the config, devices, the algorithm base class, the trainer, its reports and modes, evaluation, the measured precision."""
