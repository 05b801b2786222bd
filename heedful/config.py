"""Priors and fit settings from a TOML file (the format in DESIGN.md), validated into plain objects.

```toml
[population]
eta = "Beta(3, 5)"      # a fixed prior; "learn" (default) estimates a and b

[behaviour]
casual = "uniform"      # coin-flip casual users; "position": they pick the first-shown answer
rho = "learn"           #   with probability rho ("learn", a number, or a prior "Beta(2, 2)")
rho_per_user = "learn"  # optional: each user's own rho_u ~ Beta(a_r, b_r), "learn" or "Beta(2, 2)"

[generators]            # optional
mu = "pairs"            # one mu per pair; "strengths": mu_AB = sigmoid(s_A - s_B)
reference = "llama-13b" # the model whose strength is 0 (default: the first in alphabetical order)
strength_prior = "Normal(0, 3)"   # optional, on every other strength

[[pairs]]               # pairs not listed are learned
model_a = "gpt-4"
model_b = "llama-13b"
mu = 0.8                # known; or mu = "Beta(8, 2)", a prior

[fit]                   # optional
tol = 1e-9
max_iter = 500          # default: 500 for marginal, 2000 for em (EM creeps to boundary MAPs)
mu_interval_warn = 0.25 # warn when a 90% interval for mu is wider than this
profile = "auto"        # profile-likelihood intervals for mu where the Hessian fails; true: every learned
                        # mu; false: never (such intervals are then left empty)
```
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from heedful.errors import ConfigError
from heedful.model.priors import beta_of, parse_distribution

_SECTIONS = {"population", "behaviour", "generators", "pairs", "fit"}
_FIT_KEYS = {"tol": float, "max_iter": int, "mu_interval_warn": float, "casual_threshold": float}


@dataclass(frozen=True)
class PairPrior:
    """What is known about mu for one pair, as written (model_a, model_b in the config's order)."""

    model_a: str
    model_b: str
    mu: float | None = None                       # known value
    beta: tuple[float, float] | None = None       # Beta prior on mu

    def oriented(self, flipped: bool) -> PairPrior:
        """The same knowledge about the pair listed the other way round (mu -> 1 - mu)."""
        if not flipped:
            return self
        return PairPrior(self.model_b, self.model_a,
                         None if self.mu is None else 1.0 - self.mu,
                         None if self.beta is None else (self.beta[1], self.beta[0]))


@dataclass(frozen=True)
class Priors:
    """Population prior for eta (None = learn a and b), casual behaviour, per-pair mu knowledge."""

    eta: tuple[float, float] | None = None
    casual: str = "uniform"
    rho: float | None = None                      # known position bias (casual = "position")
    rho_prior: tuple[float, float] = (1.0, 1.0)   # Beta prior on a learned rho
    rho_user: str | tuple[float, float] | None = None   # per-user rho: "learn" or a fixed Beta(a_r, b_r)
    mu_model: str = "pairs"
    reference: str | None = None
    strength_sd: float = 0.0                      # Normal(0, sd) prior on strengths; 0: none
    pairs: tuple[PairPrior, ...] = ()
    tol: float = 1e-9
    max_iter: int | None = None                  # None: the method's own default
    mu_interval_warn: float = 0.25
    casual_threshold: float = 0.5
    profile: bool | str = "auto"
    source: str = field(default="defaults", compare=False)

    def __post_init__(self) -> None:
        if self.eta is not None and not all(v > 0 and math.isfinite(v) for v in self.eta):
            raise ConfigError(f"population eta prior Beta{self.eta}: a and b must be positive")
        if self.casual not in ("uniform", "position"):
            raise ConfigError(f"behaviour.casual = {self.casual!r}: use \"uniform\" or \"position\"")
        if self.rho is not None and not 0 < self.rho < 1:
            raise ConfigError(f"behaviour.rho = {self.rho}: a known rho must lie strictly between 0 and 1")
        if self.mu_model not in ("pairs", "strengths"):
            raise ConfigError(f"generators.mu = {self.mu_model!r}: use \"pairs\" or \"strengths\"")
        if not (self.tol > 0 and (self.max_iter is None or self.max_iter >= 1) and 0 < self.mu_interval_warn <= 1):
            raise ConfigError("fit settings: tol > 0, max_iter >= 1 and 0 < mu_interval_warn <= 1")
        seen = set()
        for p in self.pairs:
            key = frozenset((p.model_a, p.model_b))
            if key in seen:
                raise ConfigError(f"pairs: {p.model_a} vs {p.model_b} is listed twice")
            seen.add(key)


def _pair(entry: object, i: int) -> PairPrior:
    where = f"pairs[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table with model_a, model_b and mu")
    unknown = set(entry) - {"model_a", "model_b", "mu"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    a, b, mu = entry.get("model_a"), entry.get("model_b"), entry.get("mu")
    if not (isinstance(a, str) and isinstance(b, str) and a.strip() and b.strip()):
        raise ConfigError(f"{where}: model_a and model_b must be non-empty strings")
    if a == b:
        raise ConfigError(f"{where}: model_a and model_b are both {a!r}")
    if mu is None:
        raise ConfigError(f"{where} ({a} vs {b}): mu is missing; give a number in (0, 1) or \"Beta(a, b)\"")
    if isinstance(mu, bool):
        raise ConfigError(f"{where} ({a} vs {b}): mu must be a number or a distribution string")
    if isinstance(mu, (int, float)):
        if not (0.0 < float(mu) < 1.0):
            raise ConfigError(f"{where} ({a} vs {b}): known mu must lie strictly between 0 and 1, got {mu}")
        return PairPrior(a, b, mu=float(mu))
    if isinstance(mu, str):
        if mu.strip().lower() == "learn":
            return PairPrior(a, b)
        return PairPrior(a, b, beta=beta_of(mu, f"{where} ({a} vs {b}) mu"))
    raise ConfigError(f"{where} ({a} vs {b}): mu must be a number or a distribution string")


def priors_from_dict(doc: dict, source: str = "config") -> Priors:
    unknown = set(doc) - _SECTIONS
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(sorted(unknown))}; "
                          f"expected {', '.join(sorted(_SECTIONS))}")
    pop = doc.get("population", {})
    beh = doc.get("behaviour", {})
    fit = doc.get("fit", {})
    gen = doc.get("generators", {})
    for name, sec, keys in (("population", pop, {"eta"}), ("behaviour", beh, {"casual", "rho", "rho_per_user"}),
                            ("generators", gen, {"mu", "reference", "strength_prior"}),
                            ("fit", fit, set(_FIT_KEYS) | {"profile"})):
        if not isinstance(sec, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        bad = set(sec) - keys
        if bad:
            raise ConfigError(f"{source}: [{name}] unknown key(s) {', '.join(sorted(bad))}")
    eta_text = pop.get("eta", "learn")
    if not isinstance(eta_text, str):
        raise ConfigError(f"{source}: population.eta must be \"learn\" or a string like \"Beta(3, 5)\"")
    eta = None if eta_text.strip().lower() == "learn" else beta_of(eta_text, "population.eta")
    pairs = doc.get("pairs", [])
    if not isinstance(pairs, list):
        raise ConfigError(f"{source}: pairs must be an array of tables ([[pairs]])")
    settings = {}
    if "profile" in fit:
        if not (isinstance(fit["profile"], bool) or fit["profile"] == "auto"):
            raise ConfigError(f"{source}: fit.profile must be true, false or \"auto\"")
        settings["profile"] = fit["profile"]
    for k, typ in _FIT_KEYS.items():
        if k in fit:
            v = fit[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{source}: fit.{k} must be a number")
            settings[k] = typ(v)
    casual = beh.get("casual", "uniform")
    if not isinstance(casual, str):
        raise ConfigError(f"{source}: behaviour.casual must be a string")
    rho, rho_prior = None, (1.0, 1.0)
    rho_v = beh.get("rho", "learn")
    if isinstance(rho_v, bool):
        raise ConfigError(f"{source}: behaviour.rho must be \"learn\", a number or \"Beta(a, b)\"")
    if isinstance(rho_v, (int, float)):
        rho = float(rho_v)
    elif isinstance(rho_v, str) and rho_v.strip().lower() != "learn":
        rho_prior = beta_of(rho_v, "behaviour.rho")
    elif not isinstance(rho_v, str):
        raise ConfigError(f"{source}: behaviour.rho must be \"learn\", a number or \"Beta(a, b)\"")
    if (rho is not None or rho_prior != (1.0, 1.0)) and casual != "position":
        raise ConfigError(f"{source}: behaviour.rho is set but behaviour.casual is not \"position\"")
    rho_user = beh.get("rho_per_user")
    if rho_user is not None:
        if not isinstance(rho_user, str):
            raise ConfigError(f"{source}: behaviour.rho_per_user must be \"learn\" or \"Beta(a, b)\"")
        rho_user = "learn" if rho_user.strip().lower() == "learn" else beta_of(rho_user, "behaviour.rho_per_user")
        if casual != "position":
            raise ConfigError(f"{source}: behaviour.rho_per_user is set but behaviour.casual is not \"position\"")
        if "rho" in beh:
            raise ConfigError(f"{source}: give behaviour.rho (one rho) or behaviour.rho_per_user, not both")
    mu_model = gen.get("mu", "pairs")
    reference = gen.get("reference")
    if not isinstance(mu_model, str) or (reference is not None and not isinstance(reference, str)):
        raise ConfigError(f"{source}: generators.mu and generators.reference must be strings")
    strength_sd = 0.0
    if "strength_prior" in gen:
        name, args = parse_distribution(gen["strength_prior"])
        if name != "Normal" or args[0] != 0:
            raise ConfigError(f"{source}: generators.strength_prior must be \"Normal(0, sd)\"")
        strength_sd = args[1]
    return Priors(eta=eta, casual=casual, rho=rho, rho_prior=rho_prior, rho_user=rho_user,
                  mu_model=mu_model.strip().lower(),
                  reference=reference, strength_sd=strength_sd,
                  pairs=tuple(_pair(e, i) for i, e in enumerate(pairs)), source=source, **settings)


def load_priors(path: str | Path | None) -> Priors:
    """Read a priors TOML file; ``None`` gives the defaults (everything learned)."""
    if path is None:
        return Priors()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return priors_from_dict(doc, source=str(path))
