"""Training: the run folder, the Trainer setup, callbacks."""
