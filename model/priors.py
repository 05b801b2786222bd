"""Distribution strings from config, e.g. ``"Beta(3, 5)"``, parsed safely into Pyro distributions.

The string is parsed with :mod:`ast` (which never runs code) and accepted only when it is one call of
an allow-listed name with plain numeric arguments; anything else is a ConfigError.
"""

from __future__ import annotations

import ast
import math
from typing import TYPE_CHECKING

from heedful.errors import ConfigError

if TYPE_CHECKING:
    import pyro.distributions as dist
    import torch

# name -> (its pyro.distributions class, number of arguments, support); Pyro is imported when one is built
ALLOWED: dict[str, tuple[str, int, str]] = {
    "Beta": ("Beta", 2, "unit"),
    "Uniform": ("Uniform", 2, "real"),
    "Gamma": ("Gamma", 2, "positive"),
    "LogNormal": ("LogNormal", 2, "positive"),
    "Exponential": ("Exponential", 1, "positive"),
    "HalfNormal": ("HalfNormal", 1, "positive"),
    "HalfCauchy": ("HalfCauchy", 1, "positive"),
    "Normal": ("Normal", 2, "real"),
}


def _number(node: ast.AST, text: str) -> float:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _number(node.operand, text)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    raise ConfigError(f"distribution {text!r}: arguments must be plain numbers")


def parse_distribution(text: str) -> tuple[str, tuple[float, ...]]:
    """``"Beta(3, 5)"`` -> ``("Beta", (3.0, 5.0))``, checking name, arity and parameter values."""
    if not isinstance(text, str):
        raise ConfigError(f"distribution must be a string like \"Beta(3, 5)\", not {text!r}")
    if len(text) > 200:
        raise ConfigError("distribution string longer than 200 characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ConfigError(f"cannot parse distribution {text!r}; write it like \"Beta(3, 5)\"") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)) or call.keywords:
        raise ConfigError(f"distribution {text!r}: expected Name(number, ...), e.g. \"Beta(3, 5)\"")
    name = call.func.id
    if name not in ALLOWED:
        raise ConfigError(f"distribution {text!r}: unknown name {name!r}; allowed: {', '.join(ALLOWED)}")
    args = tuple(_number(a, text) for a in call.args)
    _, arity, _ = ALLOWED[name]
    if len(args) != arity:
        raise ConfigError(f"distribution {text!r}: {name} takes {arity} argument(s), got {len(args)}")
    if not all(math.isfinite(v) for v in args):
        raise ConfigError(f"distribution {text!r}: arguments must be finite")
    try:
        make_distribution(name, args)
    except ValueError:
        raise ConfigError(f"distribution {text!r}: invalid parameters for {name}") from None
    return name, args


def make_distribution(name: str, args: tuple[float, ...], dtype: torch.dtype | None = None) -> dist.Distribution:
    """The Pyro distribution (float64 unless ``dtype``); torch and Pyro are imported here, on first use."""
    import pyro.distributions
    import torch

    ctor = getattr(pyro.distributions, ALLOWED[name][0])
    return ctor(*(torch.tensor(v, dtype=dtype or torch.float64) for v in args), validate_args=True)


def support_of(name: str) -> str:
    return ALLOWED[name][2]


def beta_of(text: str, what: str) -> tuple[float, float]:
    """Parse a distribution that must live on [0, 1] and return it as Beta(a, b)."""
    name, args = parse_distribution(text)
    if name == "Beta":
        return args[0], args[1]
    if name == "Uniform" and args == (0.0, 1.0):
        return 1.0, 1.0
    raise ConfigError(f"{what}: {text!r} is not a distribution on [0, 1]; use Beta(a, b) or Uniform(0, 1)")
