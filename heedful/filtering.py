"""Per-user filtering of votes for DPO, with an audit line for every input row.

Rules (exactly one):
- ``min_eta``: keep user u when eta_hat_u >= X (eta_hat: the fit's posterior mode, or EM's MAP);
- ``min_prob`` + ``tau``: keep u when P(eta_u > tau | y_u) >= p;
- ``keep_fraction``: rank users by eta_mean_u (ties: eta_hat, user_id) and keep the smallest top set
  whose exportable votes reach a fraction F of all exportable votes.

Each input row gets one audit line: ``kept``, or ``dropped`` with the first reason that applies, in the
order of :data:`REASONS`.

Per kept vote: epsilon_u = E[(1 - eta_u) / 2 | y_u] = (1 - eta_mean_u) / 2, the probability that a
coin-flip casual label disagrees with the truth (rDPO's flip rate). The posterior mean, not the mode,
because the mode sits at 0 or 1 for many users and would claim noise-free labels. When the fit has a
position bias rho (casual users pick the first-shown answer with probability rho) and the vote says
which side was shown first: epsilon_n = (1 - eta_mean_u) (rho (1 - q_n) + (1 - rho) q_n), with
q_n = P(the first-shown answer is truly better); rho = 1/2 gives (1 - eta)/2 back.

P(eta_u > tau | y_u) is recomputed from the votes given here, the fit's mu, rho (params.json) and its
Beta(a, b) prior: p(eta | y_u) ~ Beta(eta; a, b) prod_n (eta m_n + (1 - eta) c_n), with
m_n = P(the picked answer is truly better) = mu_AB when A was picked, 1 - mu_AB otherwise (1 or 0 on
a vote with a gold label), c_n = P(this pick | casual) = 1/2, or rho / 1 - rho (picked the first- /
second-shown answer); integrated on a grid in x = logit(eta), tails beyond |x| = 20 in closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special

from heedful.errors import InputError
from heedful.votes import CHOICES, REQUIRED, SIDES

REASONS = (
    "invalid row",
    "duplicate vote id",
    "tie",
    "missing text",
    "multi-turn",
    "user not in fit",
    "user below threshold",
)
TEXT = ("prompt", "response_a", "response_b")
MESSAGES = ("messages_a", "messages_b")


@dataclass(frozen=True)
class Fit:
    """What filtering needs from a fit: per-user eta, per-pair mu (P(model_a better)), the eta prior."""

    users: pd.DataFrame
    pairs: pd.DataFrame
    eta_prior: tuple[float, float]
    rho: float | None = None  # position bias of casual users: P(pick the first-shown answer); None = 1/2
    warnings: tuple[str, ...] = ()
    rho_prior: tuple[float, float] | None = None  # per-user rho_u ~ Beta(a_r, b_r); then rho is its mean


def _rho_of(pb: dict | None) -> dict:
    """Fit fields from params.json's position_bias: one rho, or per-user rho_u ~ Beta(a, b) (rho = its mean)."""
    if not pb:
        return {}
    if pb.get("per_user"):
        a, b = float(pb["a"]), float(pb["b"])
        return {"rho": a / (a + b), "rho_prior": (a, b), "warnings": (
            f"the fit has a per-user position bias: P(eta > tau) integrates each user's rho_u exactly, but epsilon "
            f"and weights use the population mean rho = {a / (a + b):.3f} (users.parquet holds no rho_u)",)}
    return {"rho": float(pb["rho"])}


def load_fit(outdir: str | Path) -> Fit:
    """Read OUTDIR/users.parquet and OUTDIR/params.json written by ``heedful fit``."""
    from heedful.outputs import read_fit

    users, params = read_fit(outdir, ("eta_hat", "eta_mean", "user_id"))
    pp = Path(outdir) / "params.json"
    try:
        pairs = pd.DataFrame(params["mu"])[["model_a", "model_b", "mu"]]
        prior = (float(params["eta_prior"]["a"]), float(params["eta_prior"]["b"]))
        bias = _rho_of(params.get("position_bias"))
    except (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as e:
        raise InputError(f"{pp}: not a heedful params.json ({type(e).__name__}: {e})") from e
    return Fit(users=users, pairs=pairs, eta_prior=prior, **bias)


def fit_of(model) -> Fit:
    """The :class:`Fit` of a fitted :class:`heedful.inference.Attentiveness` (no files needed)."""
    ep = model.eta_prior_
    return Fit(
        users=model.users_,
        pairs=model.pairs_[["model_a", "model_b", "mu"]],
        eta_prior=(float(ep["a"]), float(ep["b"])),
        **_rho_of(getattr(model, "rho_", None)),
    )


@dataclass(frozen=True)
class Rule:
    """Which users to keep; set exactly one of ``min_eta``, ``min_prob`` (with ``tau``), ``keep_fraction``."""

    min_eta: float | None = None
    min_prob: float | None = None
    tau: float | None = None
    keep_fraction: float | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("min_eta", "min_prob", "keep_fraction") if getattr(self, n) is not None]
        if len(given) != 1:
            raise InputError(
                "choose exactly one of --min-eta, --min-prob (with --tau) or --keep-fraction"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if (self.min_prob is None) != (self.tau is None):
            raise InputError("--min-prob and --tau go together: keep users with P(eta > tau) >= min-prob")
        ranges = {
            "min_eta": (0.0, 1.0, "[0, 1]"),
            "min_prob": (0.0, 1.0, "[0, 1]"),
            "tau": (1e-300, 1.0 - 1e-16, "(0, 1)"),
            "keep_fraction": (1e-300, 1.0, "(0, 1]"),
        }
        for name, (lo, hi, text) in ranges.items():
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and lo <= v <= hi):
                raise InputError(f"--{name.replace('_', '-')} must lie in {text}, got {v}")

    def describe(self) -> str:
        if self.min_eta is not None:
            return f"eta_hat >= {self.min_eta:g}"
        if self.min_prob is not None:
            return f"P(eta > {self.tau:g}) >= {self.min_prob:g}"
        return f"most attentive users holding {self.keep_fraction:.0%} of the votes"


@dataclass
class Filtered:
    """Kept votes (the contract's columns + eta_hat, eta_mean, epsilon[, weight]), the audit, counts."""

    kept: pd.DataFrame
    audit: pd.DataFrame
    counts: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    labels_only: bool = False


def _blank(df: pd.DataFrame, col: str) -> np.ndarray:
    if col not in df.columns:
        return np.ones(len(df), dtype=bool)
    s = df[col]
    text = s.astype("string")
    blank = (s.isna() | (text.str.strip() == "")).to_numpy(dtype=bool, na_value=True)
    return blank


def _norm(df: pd.DataFrame, col: str) -> pd.Series:
    return df[col].astype("string").str.strip().str.lower()


def _invalid(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Rows that break the vote contract, and a short note saying why (first failing check)."""
    checks: list[tuple[np.ndarray, str]] = [(_blank(df, c), f"empty {c}") for c in REQUIRED]
    checks.append((~_norm(df, "choice").isin(CHOICES).to_numpy(dtype=bool, na_value=False), "choice not a/b/tie"))
    same = df.model_a.astype("string").str.strip() == df.model_b.astype("string").str.strip()
    checks.append((same.to_numpy(dtype=bool, na_value=False), "model_a equals model_b"))
    for c in ("shown_first", "gold"):
        if c in df.columns:
            ok = _norm(df, c).isin(SIDES).to_numpy(dtype=bool, na_value=False) | _blank(df, c)
            checks.append((~ok, f"{c} not a/b"))
    if "vote_id" in df.columns:
        checks.append((_blank(df, "vote_id"), "empty vote_id"))
    masks = np.stack([m for m, _ in checks])
    bad = masks.any(0)
    note = np.select(list(masks), [n for _, n in checks], default="")
    return bad, note.astype(object)


def _text_mode(df: pd.DataFrame) -> str:
    """'text' (prompt/response columns), 'messages' (only messages_a/b) or 'none' (labels only)."""
    have = [c for c in TEXT if c in df.columns]
    if have and len(have) < 3:
        raise InputError(
            f"votes have {', '.join(have)} but not {', '.join(c for c in TEXT if c not in have)}; "
            "the DPO export needs prompt, response_a and response_b"
        )
    if have:
        return "text"
    return "messages" if all(c in df.columns for c in MESSAGES) else "none"


def _pair_mu(df: pd.DataFrame, pairs: pd.DataFrame) -> np.ndarray:
    """P(the row's model_a is truly better), from the fit's pairs in either orientation; NaN if unknown."""
    fwd = pairs.rename(columns={"mu": "mu_a"})[["model_a", "model_b", "mu_a"]]
    rev = pd.DataFrame({"model_a": pairs.model_b, "model_b": pairs.model_a, "mu_a": 1.0 - pairs.mu})
    table = pd.concat([fwd, rev]).drop_duplicates(["model_a", "model_b"]).astype({"model_a": str, "model_b": str})
    key = pd.DataFrame({"model_a": df.model_a.astype(str).str.strip(), "model_b": df.model_b.astype(str).str.strip()})
    return key.merge(table, on=["model_a", "model_b"], how="left").mu_a.to_numpy(dtype=float)


def posterior_from_votes(df: pd.DataFrame, fit: Fit, tau: float) -> tuple[pd.Series, pd.Series]:
    """Posterior mean of eta_u and P(eta_u > tau | y_u) from these (valid, non-tie) votes under the fit's globals.

    The votes are reduced to sufficient statistics and passed to the same exact posterior the fit uses
    (:func:`heedful.inference.posterior.user_posterior`), with the fit's Beta(a, b), mu (P(model_a better)
    per pair; 1/2 for pairs the fit does not know), and rho or per-user Beta(a_r, b_r).
    Both series are indexed by user id.
    """
    import torch

    from heedful.inference.posterior import user_posterior
    from heedful.model.likelihood import build_plan
    from heedful.suffstats import vote_stats

    stats = vote_stats(df, validated=True)
    mu = _pair_mu(pd.DataFrame(stats.pairs, columns=["model_a", "model_b"]), fit.pairs)
    cpu, f64 = torch.device("cpu"), torch.float64
    post = user_posterior(build_plan(stats, cpu, f64), stats.tensors(cpu, f64), *fit.eta_prior,
                          torch.as_tensor(np.nan_to_num(mu, nan=0.5), dtype=f64), fit.rho, tau=tau,
                          rho_prior=fit.rho_prior, modes=False)
    return pd.Series(post.mean, index=stats.users), pd.Series(post.prob_above, index=stats.users)


def _keep_users(rule: Rule, users: pd.DataFrame, votes_per_user: np.ndarray, prob: np.ndarray | None) -> np.ndarray:
    """Boolean per row of ``users``: kept by the rule."""
    if rule.min_eta is not None:
        return users.eta_hat.to_numpy(dtype=float) >= rule.min_eta
    if rule.min_prob is not None:
        return prob >= rule.min_prob
    order = np.lexsort(
        (
            users.user_key.to_numpy(dtype=str),
            -users.eta_hat.to_numpy(dtype=float),
            -users.eta_mean.to_numpy(dtype=float),
        )
    )
    n = votes_per_user[order]
    before = np.cumsum(n) - n
    keep = np.zeros(len(users), dtype=bool)
    keep[order] = before < rule.keep_fraction * n.sum() - 1e-9
    return keep


def filter_votes(
    votes: pd.DataFrame, fit: Fit, rule: Rule, *, conversational: bool = False, weights: bool = False
) -> Filtered:
    """Audit every row and keep the non-tie votes with text of the users the rule keeps.

    ``weights=True`` adds w_n = P(z_n = 1 | y_n, eta_u = eta_mean_u) = eta m_n / (eta m_n + (1 - eta) c_n).
    It is larger when the user picked the stronger model, so weighting by it writes the model prior
    into the labels (see docs/filtering.md); it is off unless asked for.
    """
    missing = [c for c in REQUIRED if c not in votes.columns]
    if missing:
        raise InputError(f"votes: missing column(s) {', '.join(missing)}; found {', '.join(map(str, votes.columns))}")
    df = votes.reset_index(drop=True)
    n = len(df)
    mode = _text_mode(df)
    warnings: list[str] = list(fit.warnings)
    invalid, note = _invalid(df)
    dup = np.zeros(n, dtype=bool)
    if "vote_id" in df.columns:
        vid = df.vote_id.astype("string").where(~invalid)
        dup = (vid.duplicated(keep="first") & vid.notna()).to_numpy(dtype=bool)
    choice = _norm(df, "choice").fillna("").to_numpy(dtype=object)
    tie = choice == "tie"
    if mode == "text":
        no_text = _blank(df, "prompt") | _blank(df, "response_a") | _blank(df, "response_b")
        if conversational and all(c in df.columns for c in MESSAGES):
            no_text &= _blank(df, "messages_a") | _blank(df, "messages_b")
    elif mode == "messages":
        no_text = _blank(df, "messages_a") | _blank(df, "messages_b") | (not conversational)
    else:
        no_text = np.zeros(n, dtype=bool)
        warnings.append(
            "the votes carry no prompt/response_a/response_b columns: the export holds labels and "
            "ids only (prompt, chosen, rejected are empty); join the texts by vote_id before training"
        )
    multi = np.zeros(n, dtype=bool)
    if not conversational and "turn" in df.columns:
        multi = pd.to_numeric(df.turn, errors="coerce").fillna(1).to_numpy() > 1
    key = df.user_id.astype("string").str.strip().fillna("")
    users = fit.users.assign(user_key=fit.users.user_id.astype("string").str.strip())
    users = users.drop_duplicates("user_key").reset_index(drop=True)
    pos = pd.Index(users.user_key).get_indexer(key)  # row of the vote's user in users, -1 if absent
    in_fit = pos >= 0
    at = np.where(in_fit, pos, 0)

    def per_vote(values: np.ndarray) -> np.ndarray:
        return np.where(in_fit, np.asarray(values, dtype=float)[at], np.nan)

    valid = ~invalid & ~dup
    scored = valid & ~tie & in_fit  # votes in the user's likelihood
    candidate = scored & ~no_text & ~multi
    mu_a = np.full(n, np.nan)
    mu_a[scored] = _pair_mu(df[scored], fit.pairs)
    unknown = scored & np.isnan(mu_a)
    if unknown.any():
        warnings.append(f"{int(unknown.sum())} votes are on pairs the fit does not know; mu = 1/2 taken for them")
    m = np.where(choice == "a", mu_a, 1.0 - mu_a)
    m = np.where(np.isnan(m), 0.5, m)
    if "gold" in df.columns:  # a gold label fixes t: the attentive pick is right (m = 1) or wrong (m = 0)
        gold = _norm(df, "gold").fillna("").to_numpy(dtype=object)
        m = np.where(np.isin(gold, SIDES), (gold == choice).astype(float), m)
    rho = 0.5 if fit.rho is None else fit.rho
    first = _norm(df, "shown_first").fillna("").to_numpy(dtype=object) if "shown_first" in df.columns else None
    if first is None or fit.rho is None:
        c = np.full(n, 0.5)
        q_first = np.full(n, 0.5)
    else:
        c = np.where(first == choice, rho, np.where(np.isin(first, SIDES), 1.0 - rho, 0.5))
        mu_first = np.where(first == "a", mu_a, 1.0 - mu_a)  # P(the first-shown answer is truly better)
        q_first = np.where(np.isin(first, SIDES) & ~np.isnan(mu_first), mu_first, 0.5)

    prob = None
    if rule.min_prob is not None:
        clean = pd.DataFrame({"user_id": key[scored].to_numpy(), "choice": choice[scored],
                              "model_a": df.model_a[scored].astype(str).str.strip().to_numpy(),
                              "model_b": df.model_b[scored].astype(str).str.strip().to_numpy()})
        if first is not None and fit.rho is not None:
            clean["shown_first"] = np.where(np.isin(first[scored], SIDES), first[scored], None)
        if "gold" in df.columns:
            clean["gold"] = np.where(np.isin(gold[scored], SIDES), gold[scored], None)
        mean_s, prob_s = posterior_from_votes(clean, fit, rule.tau)
        a, b = fit.eta_prior   # users of the fit with no scored votes here keep their prior
        mean = mean_s.reindex(users.user_key).fillna(a / (a + b)).to_numpy(dtype=float)
        prob = prob_s.reindex(users.user_key).fillna(float(special.betainc(b, a, 1 - rule.tau))).to_numpy(dtype=float)
        gap = np.abs(mean - users.eta_mean.to_numpy(dtype=float))
        if len(gap) and np.nanmax(gap) > 0.02:
            warnings.append(
                f"posterior means from these votes differ from the fit's eta_mean by up to "
                f"{np.nanmax(gap):.3f}: were these the votes the fit saw?"
            )
    per_user = np.bincount(pos[candidate], minlength=len(users))
    keep = in_fit & _keep_users(rule, users, per_user, prob)[at]

    conds = [invalid, dup, tie, no_text, multi, ~in_fit, ~keep]
    reason = np.select(conds, list(REASONS), default="")
    kept_mask = reason == ""
    eta_hat, eta_mean = per_vote(users.eta_hat), per_vote(users.eta_mean)
    vote_id = (
        df.vote_id.astype("string") if "vote_id" in df.columns else pd.Series(np.arange(n).astype(str), dtype="string")
    )
    audit = pd.DataFrame(
        {
            "row": np.arange(n),
            "vote_id": vote_id.to_numpy(dtype=object),
            "user_id": df.user_id.to_numpy(),
            "choice": choice,
            "status": np.where(kept_mask, "kept", "dropped").astype(object),
            "reason": np.where(kept_mask, None, reason).astype(object),
            "detail": np.where(invalid, note, None),
            "eta_hat": eta_hat,
            "eta_mean": eta_mean,
        }
    )
    if prob is not None:
        audit["prob_above"] = per_vote(prob)
    # flip rate: (1 - eta) P(casual pick != truth) = (1 - eta) (rho (1 - q) + (1 - rho) q), q = P(first-shown better)
    eps = (1.0 - eta_mean) * (rho * (1.0 - q_first) + (1.0 - rho) * q_first)
    kept = df[kept_mask].copy()
    kept.insert(0, "row", np.flatnonzero(kept_mask))
    kept["vote_id"] = vote_id[kept_mask].to_numpy(dtype=object)
    kept["choice"] = choice[kept_mask]
    kept["eta_hat"], kept["eta_mean"], kept["epsilon"] = (
        eta_hat[kept_mask],
        eta_mean[kept_mask],
        eps[kept_mask],
    )
    if weights:
        w = eta_mean * m / (eta_mean * m + (1.0 - eta_mean) * c)
        audit["weight"] = np.where(scored, w, np.nan)
        kept["weight"] = w[kept_mask]
    counts = {"rows": n, "kept": int(kept_mask.sum())}
    counts.update({r: int((reason == r).sum()) for r in REASONS})
    return Filtered(
        kept=kept.reset_index(drop=True),
        audit=audit,
        counts=counts,
        warnings=warnings,
        labels_only=mode == "none",
    )
