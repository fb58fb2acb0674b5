"""Tracking: the run log (W&B / TensorBoard), plots, fonts and the offline W&B reader."""
