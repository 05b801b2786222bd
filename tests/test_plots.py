"""heedful plot: every PNG is written and is a real, non-empty PNG; the CLI works with and without posterior.nc."""

import pytest
from typer.testing import CliRunner

from heedful.cli import app
from heedful.config import PairPrior, Priors
from heedful.inference import Attentiveness
from heedful.outputs import write_fit, write_inference_data, write_table
from heedful.plots import plot_fit
from heedful.simulate import simulate

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    d = tmp_path_factory.mktemp("fit")
    sim = simulate(120, 12, seed=21)
    write_table(d / "truth.parquet", sim.users)
    priors = Priors(pairs=(PairPrior("strong-model", "weak-model", beta=(8.0, 2.0)),))
    m = Attentiveness("nuts", priors, options={"draws": 60, "warmup": 60, "chains": 2, "seed": 0}).fit(sim.votes)
    write_inference_data(d / "out" / "posterior.nc", m.inference_data_)
    write_fit(d / "out", m.users_, m.params())
    return d


def test_every_plot_is_a_png(fitted):
    written = plot_fit(fitted / "out", fitted / "truth.parquet")
    names = {p.name for p in written}
    assert names == {"trace.png", "rank.png", "forest_eta.png", "mu_prior_posterior.png", "ppc_choice_rate.png",
                     "reliability.png"}
    for p in written:
        data = p.read_bytes()
        assert data[:8] == PNG and len(data) > 5000


def test_cli_plot_without_posterior(tmp_path):
    sim = simulate(100, 10, seed=22)
    m = Attentiveness("marginal", Priors(pairs=(PairPrior("strong-model", "weak-model", mu=0.8),))).fit(sim.votes)
    write_fit(tmp_path, m.users_, m.params())
    r = CliRunner().invoke(app, ["plot", str(tmp_path), "-o", str(tmp_path / "png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "png" / "forest_eta.png").read_bytes()[:8] == PNG
    assert "no posterior.nc" in r.output
