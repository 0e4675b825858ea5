"""Training: optimizer, train state and step, checkpoints, the loop."""
