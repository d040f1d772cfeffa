"""Training: the loop, optimiser and schedule, checkpoints and resume, signals, metrics, the run folder."""
