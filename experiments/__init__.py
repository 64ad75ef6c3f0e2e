"""Experiments run from a checkout of the repository (``python experiments/NAME.py``); not installed."""
