"""The generative user behaviour model: Pyro programs, the exact marginal likelihood, priors."""

from heedful.model.behaviour import count_model, global_model, vote_model
from heedful.model.likelihood import QuadraturePlan, build_plan, log_marginal, user_log_marginal

__all__ = ["vote_model", "count_model", "global_model", "QuadraturePlan", "build_plan", "log_marginal",
           "user_log_marginal"]
