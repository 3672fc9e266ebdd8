"""The training stage: estimators, the training step and its branch strategies."""
