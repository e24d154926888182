"""Multi-teacher distillation: soft targets from the specialists an image's labels select, and the loss."""
