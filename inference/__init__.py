"""Fitting algorithms for the behaviour model: exact-marginal empirical Bayes (default) and EM."""

from heedful.inference.estimator import METHODS, Attentiveness

__all__ = ["Attentiveness", "METHODS"]
