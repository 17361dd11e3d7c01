"""Integrations of slimfit with training frameworks.

``slimfit.integrations.transformers``: :class:`SlimFitCallback` and :class:`SlimFitTrainer`
for the Hugging Face ``transformers.Trainer``.
"""
