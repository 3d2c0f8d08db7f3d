"""Shared code for both twotower stages: encoder, data, evaluation, recipes, training loop."""

__version__ = "0.1.0"
