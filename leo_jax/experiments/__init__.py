"""Experiments that train several models and print a comparison (on top of train / eval)."""
