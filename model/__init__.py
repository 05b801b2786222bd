"""The generative user behaviour model: Pyro programs, the exact marginal likelihood, priors.

Names are loaded on first use, so the fast path (``heedful.model.likelihood``) never imports Pyro.
"""

from __future__ import annotations

import importlib

_WHERE = {"vote_model": "behaviour", "count_model": "behaviour", "global_model": "behaviour",
          "QuadraturePlan": "likelihood", "build_plan": "likelihood", "log_marginal": "likelihood",
          "user_log_marginal": "likelihood"}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"heedful.model.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'heedful.model' has no attribute {name!r}")
