"""heedful report: one self-contained HTML page holding the fit's tables and figures."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from heedful.config import PairPrior, Priors
from heedful.errors import InputError
from heedful.inference import Attentiveness
from heedful.outputs import write_fit
from heedful.report import build_report, write_report
from heedful.simulate import default_pairs, simulate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEEDFUL = str(Path(sys.executable).with_name("heedful"))  # the installed console script


@pytest.fixture(scope="module")
def fit_dir(tmp_path_factory) -> Path:
    """A small marginal fit with three pairs, one of them with mu known, and ties."""
    sim = simulate(300, 8, pairs=default_pairs(3, 0.8), vote_counts="geometric", tie_rate=0.05, seed=3)
    priors = Priors(pairs=(PairPrior("model-00", "model-01", mu=0.6),))
    model = Attentiveness(priors=priors).fit(sim.votes)
    out = tmp_path_factory.mktemp("fit")
    write_fit(out, model.users_, model.params())
    return out


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def test_report_holds_tables_and_embedded_figures(fit_dir: Path) -> None:
    rep = build_report(fit_dir)
    page = rep.html
    params = json.loads((fit_dir / "params.json").read_text())
    users = pd.read_parquet(fit_dir / "users.parquet")
    # summary, pairs and users sections with the fit's numbers
    for anchor in ("summary", "warnings", "pairs", "eta", "users", "figures"):
        assert f'id="{anchor}"' in page
    assert f"{params['n_users']:,}" in page and f"{params['n_votes']:,}" in page
    for p in params["mu"]:
        assert f"{p['model_a']} vs {p['model_b']}" in page
        assert f"{p['mu']:.3f}" in page
    assert ">known<" in page and ">learned<" in page
    top = users.sort_values("eta_mean", ascending=False).user_id.iloc[0]
    assert f"<td>{top}</td>" in page
    # every warning of the fit is shown (ties were counted)
    assert params["warnings"] and all(w in rep.warnings for w in params["warnings"])
    assert "tie votes were counted" in page
    # the figures are real PNGs embedded in the page, one per Figure, each with its caption
    imgs = _images(page)
    assert len(imgs) == len(rep.figures) >= 3
    assert all(i.startswith(PNG_MAGIC) and len(i) > 5000 for i in imgs)
    assert {"mu", "eta-distribution", "user-intervals"} <= {f.key for f in rep.figures}
    for f in rep.figures:
        assert f"id='fig-{f.key}'" in page and f.title in page


def test_report_is_self_contained(fit_dir: Path) -> None:
    page = build_report(fit_dir).html
    # no external resources: no scripts, no links or images pointing outside the page
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)=['"](?!data:|#)""", page)
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page


def test_report_escapes_html(tmp_path: Path, fit_dir: Path) -> None:
    params = json.loads((fit_dir / "params.json").read_text())
    params["warnings"] = params["warnings"] + ["<script>alert(1)</script>"]
    (tmp_path / "params.json").write_text(json.dumps(params))
    (tmp_path / "users.parquet").write_bytes((fit_dir / "users.parquet").read_bytes())
    page = build_report(tmp_path).html
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_report_missing_outputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="params.json|users.parquet"):
        build_report(tmp_path)


def test_write_report_default_path(fit_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "r.html"
    rep = write_report(fit_dir, out)
    assert out.read_text(encoding="utf-8") == rep.html


def test_cli_report(fit_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    r = subprocess.run([HEEDFUL, "report", str(fit_dir), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "figure 1: mu per pair" in r.stdout
    assert len(_images(out.read_text(encoding="utf-8"))) >= 3
    bad = subprocess.run([HEEDFUL, "report", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no such file" in bad.stderr


def test_report_draws_profiles_and_posterior_figures(tmp_path: Path) -> None:
    """Profile curves in params.json and a posterior.nc (sampling methods) add their figures."""
    import numpy as np

    from heedful.outputs import write_inference_data

    sim = simulate(200, 6, seed=5)
    model = Attentiveness(options={"profile": True}).fit(sim.votes)
    write_fit(tmp_path, model.users_, model.params())
    assert model.params()["profiles"]
    az = pytest.importorskip("arviz")
    rng = np.random.default_rng(0)
    chains, draws, users = 2, 50, len(model.users_)
    obs = rng.uniform(0, 1, users)
    idata = az.from_dict(
        posterior={"a": rng.gamma(3, 1, (chains, draws)), "b": rng.gamma(5, 1, (chains, draws)),
                   "mu": rng.beta(8, 2, (chains, draws, 1))},
        observed_data={"choice_rate": obs},
        posterior_predictive={"choice_rate": rng.uniform(0, 1, (chains, draws, users))},
        coords={"pair": ["strong-model vs weak-model"], "user": model.users_.user_id.to_numpy()},
        dims={"mu": ["pair"], "choice_rate": ["user"]})
    write_inference_data(tmp_path / "posterior.nc", idata)
    rep = build_report(tmp_path, with_plots_module=False)
    keys = {f.key for f in rep.figures}
    assert {"profiles", "trace", "ppc"} <= keys
    assert len(_images(rep.html)) == len(rep.figures)


def test_report_sampler_diagnostics_table(tmp_path: Path, fit_dir: Path) -> None:
    """A sampling fit's diagnostics (params.json) become a table per global, not a JSON dump."""
    params = json.loads((fit_dir / "params.json").read_text())
    params.update(method="nuts", converged=False, diagnostics={
        "globals": {"a": {"mean": 3.1, "sd": 0.4, "r_hat": 1.002, "ess_bulk": 812.0, "ess_tail": 640.0}},
        "users": {"n_summarised": 300, "max_r_hat": 1.004, "worst_r_hat": ["eta[u1]", "eta[u2]"]},
        "divergences": 0, "warnings": ["r_hat > 1.01 for a"], "chains": 4})
    (tmp_path / "params.json").write_text(json.dumps(params))
    (tmp_path / "users.parquet").write_bytes((fit_dir / "users.parquet").read_bytes())
    rep = build_report(tmp_path)
    assert "<th>r_hat</th>" in rep.html and "<td>a</td>" in rep.html and "1.002" in rep.html
    assert "eta[u1], eta[u2]" in rep.html and "href='#diagnostics'" in rep.html
    assert any("nuts fit did not pass its checks" in w for w in rep.warnings)


def test_report_embeds_heedful_plots_figures(fit_dir: Path, tmp_path: Path) -> None:
    """With heedful.plots installed, its PNGs (forest; reliability with a truth file) are embedded too."""
    pytest.importorskip("heedful.plots")
    users = pd.read_parquet(fit_dir / "users.parquet")
    truth = tmp_path / "truth.parquet"
    pd.DataFrame({"user_id": users.user_id, "true_eta": users.eta_mean}).to_parquet(truth)
    rep = build_report(fit_dir, truth=truth)
    from_plots = {f.key for f in rep.figures if f.source == "heedful.plots"}
    assert {"plots-forest_eta", "plots-reliability"} <= from_plots
    assert len(_images(rep.html)) == len(rep.figures)
    assert all(f.png.startswith(PNG_MAGIC) for f in rep.figures)
