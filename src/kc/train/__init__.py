"""The one trainer (loop, checkpoints, resume) and the stages built on it."""
