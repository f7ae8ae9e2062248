"""Training: the loop, its state, the optimizers, checkpoints, evaluation and the progress report."""
