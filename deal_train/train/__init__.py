"""Training machinery: the continual loop, step checkpoints, distributed settings, evaluation, memory profiling."""
