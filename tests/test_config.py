"""Priors from TOML: parsed through an allow-list, oriented to canonical pairs, clear errors."""

import pytest

from heedful.config import PairPrior, Priors, load_priors, priors_from_dict
from heedful.errors import ConfigError
from heedful.inference.globals import global_spec
from heedful.model.priors import parse_distribution
from heedful.simulate import simulate
from heedful.suffstats import vote_stats


def test_full_config_round_trip(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[population]\neta = "Beta(3, 5)"\n[behaviour]\ncasual = "position"\nrho = "Beta(2, 2)"\n'
                    '[[pairs]]\nmodel_a = "weak-model"\nmodel_b = "strong-model"\nmu = 0.2\n'
                    '[[pairs]]\nmodel_a = "x"\nmodel_b = "y"\nmu = "Beta(8, 2)"\n[fit]\ntol = 1e-7\n')
    p = load_priors(path)
    assert p.eta == (3.0, 5.0) and p.casual == "position" and p.rho_prior == (2.0, 2.0) and p.tol == 1e-7
    assert p.pairs[0] == PairPrior("weak-model", "strong-model", mu=0.2)
    assert p.pairs[1].beta == (8.0, 2.0)
    spec = global_spec(vote_stats(simulate(20, 5, seed=0).votes), p)
    # the config lists the pair reversed: canonical (strong-model, weak-model) gets mu = 1 - 0.2
    assert spec.mu_known[0] == pytest.approx(0.8)
    assert any("x vs y never occurs" in w for w in spec.warnings)


@pytest.mark.parametrize("text, fragment", [
    ("Beta(3)", "takes 2 argument"),
    ("Beta(-1, 2)", "invalid parameters"),
    ("Beta(a, 2)", "plain numbers"),
    ("Wishart(3, 5)", "unknown name"),
    ("__import__('os').system('true')", "expected Name(number"),
    ("Beta(3, 5); import os", "cannot parse"),
    ("(lambda: 1)()", "expected Name(number"),
    ("Beta(1e400, 2)", "finite"),
    ("Beta(3, 5).sample()", "expected Name(number"),
])
def test_bad_distribution_strings_are_rejected(text, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        parse_distribution(text)


@pytest.mark.parametrize("doc, fragment", [
    ({"popluation": {}}, "unknown section"),
    ({"population": {"eta": 3}}, "population.eta"),
    ({"population": {"eta": "Gamma(2, 2)"}}, "not a distribution on"),
    ({"pairs": [{"model_a": "x", "model_b": "x", "mu": 0.8}]}, "both 'x'"),
    ({"pairs": [{"model_a": "x", "model_b": "y", "mu": 1.5}]}, "strictly between"),
    ({"pairs": [{"model_a": "x", "model_b": "y"}]}, "mu is missing"),
    ({"pairs": [{"model_a": "x", "model_b": "y", "mu": 0.8}, {"model_a": "y", "model_b": "x", "mu": 0.3}]},
     "listed twice"),
    ({"behaviour": {"casual": "lazy"}}, "uniform"),
    ({"behaviour": {"rho": 0.6}}, "casual is not"),
    ({"fit": {"tol": "small"}}, "must be a number"),
])
def test_bad_configs_are_rejected(doc, fragment):
    with pytest.raises(ConfigError, match=fragment):
        priors_from_dict(doc)


def test_defaults_learn_everything():
    p = Priors()
    assert p.eta is None and p.pairs == () and p.casual == "uniform"
