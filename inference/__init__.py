"""Fitting algorithms for the behaviour model."""
