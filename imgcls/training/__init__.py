"""Training machinery: checkpoints, distributed setup, optimisers, metrics, EMA, guards, signals, run info."""
