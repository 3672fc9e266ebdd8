"""Passes that build the training step's branch graphs."""
