"""Integrations with training frameworks (``qzo_fx.integrations.transformers.QzoTrainer``)."""
