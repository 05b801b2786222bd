"""Property-based tests (hypothesis).

- Any valid vote table fits: eta in [0, 1], no NaN, eta_lo <= eta_mean <= eta_hi, one row per user;
  filtering it audits every input row exactly once.
- Any table with the contract's columns either validates (same rows, normalised values) or raises
  InputError: never another exception.
- The distribution-string parser, fuzzed with free text and with code-shaped strings, only ever
  returns an allow-listed (name, finite numbers) or raises ConfigError, and never evaluates anything.

Run ``pytest tests/test_properties.py --hypothesis-show-statistics`` for the example counts.
"""

from __future__ import annotations

import builtins
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from heedful.errors import ConfigError, InputError
from heedful.model.priors import ALLOWED, parse_distribution
from heedful.votes import validate_votes

MODELS = ["gpt-4", "llama-13b", "claude-2", "mistral-7b"]
FIT_SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def vote_tables(draw) -> pd.DataFrame:
    """1-6 users, 1-30 votes over 1-4 models' pairs (both orders), ties included, at least one non-tie."""
    n = draw(st.integers(1, 30))
    k = draw(st.integers(2, 4))
    rows = draw(st.lists(st.tuples(st.integers(0, 5), st.integers(0, k - 1), st.integers(1, k - 1),
                                   st.sampled_from(["a", "b", "tie", "A", " b "])), min_size=n, max_size=n))
    if all(r[3] == "tie" for r in rows):
        rows[0] = (*rows[0][:3], "a")
    users, ia, shift, choice = zip(*rows, strict=True)
    ia = np.array(ia)
    ib = (ia + np.array(shift)) % k
    return pd.DataFrame({"user_id": [f"u{u}" for u in users], "model_a": np.array(MODELS)[ia],
                         "model_b": np.array(MODELS)[ib], "choice": list(choice)})


def _check_users(users: pd.DataFrame, votes: pd.DataFrame) -> None:
    eta = users[["eta_hat", "eta_mean", "eta_lo", "eta_hi"]].to_numpy(dtype=float)
    assert np.isfinite(eta).all()
    assert ((eta >= 0) & (eta <= 1)).all()
    assert (users.eta_lo <= users.eta_mean + 1e-12).all() and (users.eta_mean <= users.eta_hi + 1e-12).all()
    assert sorted(users.user_id) == sorted(votes.user_id.unique())
    assert users.n_votes.sum() == (votes.choice.str.strip().str.lower() != "tie").sum()


@FIT_SETTINGS
@given(votes=vote_tables(), method=st.sampled_from(["marginal", "em"]))
def test_any_valid_table_fits_inside_the_unit_interval(votes, method):
    from heedful.inference import Attentiveness

    model = Attentiveness(method=method, device="cpu").fit(votes)
    _check_users(model.users_, votes)
    assert all(math.isfinite(v) for v in model.pairs_.mu) and model.pairs_.mu.between(0, 1).all()
    assert math.isfinite(model.log_likelihood_)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(votes=vote_tables(), fraction=st.floats(0.05, 1.0))
def test_the_audit_accounts_for_every_row(votes, fraction):
    from heedful.filtering import Rule, filter_votes, fit_of
    from heedful.inference import Attentiveness

    model = Attentiveness(method="em", device="cpu").fit(votes)
    res = filter_votes(votes, fit_of(model), Rule(keep_fraction=fraction))
    assert len(res.audit) == len(votes) == res.counts["rows"]
    assert res.counts["rows"] == sum(v for k, v in res.counts.items() if k != "rows")
    assert len(res.kept) == res.counts["kept"]


# -- validation never fails with anything but InputError ----------------------------------------------------
odd = st.one_of(st.none(), st.just(""), st.just("  "), st.text(max_size=6), st.integers(-2, 2),
                st.floats(allow_nan=True))


@st.composite
def loose_tables(draw) -> tuple[pd.DataFrame, str | None]:
    """A table of plausible values with 0-2 cells replaced by odd ones (None, blanks, text, numbers, NaN)."""
    extra = draw(st.sampled_from([None, "shown_first", "gold", "vote_id"]))
    valid = [st.sampled_from(["u1", "u2", "u3", " u4 "]), st.permutations(MODELS),
             st.sampled_from(["a", "b", "tie", "A", "Tie "]),
             st.sampled_from(["v1", "v2", "v3", "v4", "v5", "v6"]) if extra == "vote_id"
             else st.sampled_from(["a", "b", "B", "", None])]
    rows = draw(st.lists(st.tuples(*valid).map(lambda t: [t[0], t[1][0], t[1][1], t[2], t[3]]), max_size=8))
    for _ in range(draw(st.integers(0, 2)) if rows else 0):
        rows[draw(st.integers(0, len(rows) - 1))][draw(st.integers(0, 4))] = draw(odd)
    cols = ["user_id", "model_a", "model_b", "choice", extra or "note"]
    return (pd.DataFrame(rows, columns=cols, dtype=object) if rows else pd.DataFrame(columns=cols)), extra


@settings(max_examples=300, deadline=None, derandomize=True)
@given(table=loose_tables())
def test_validation_accepts_or_says_why(table):
    frame, extra = table
    try:
        out = validate_votes(frame)
    except InputError as e:
        event("refused: " + re.sub(r"row \d+.*|\(.*", "", str(e).split(": ", 1)[1]).strip())
        assert "\n" not in str(e)
        return
    event("accepted")
    assert len(out) == len(frame) > 0
    assert set(out.choice) <= {"a", "b", "tie"}
    assert (out.model_a != out.model_b).all()
    if extra in ("shown_first", "gold"):
        assert set(out[extra].dropna()) <= {"a", "b"}
    if extra == "vote_id":
        assert out.vote_id.is_unique


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(votes=vote_tables())
def test_csv_round_trip_reads_what_was_written(votes, tmp_path):
    from heedful.votes import read_votes

    path = tmp_path / "votes.csv"
    votes.to_csv(path, index=False)
    back = read_votes(path)
    assert back.user_id.tolist() == votes.user_id.tolist()
    assert back.choice.tolist() == votes.choice.str.strip().str.lower().tolist()


# -- the distribution-string parser ---------------------------------------------------------------------
MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / "heedful-parser-fuzz-marker"
PAYLOADS = [
    f"__import__('pathlib').Path({str(MARKER)!r}).touch()",
    f"open({str(MARKER)!r}, 'w')",
    "globals().update(PWNED=1)",
    "__builtins__.__dict__['PWNED'] = 1",
    "(lambda: Beta(3, 5))()",
    "Beta.__init__(3, 5)",
    "Beta(3, 5).__class__",
    "().__class__.__bases__[0].__subclasses__()",
    "[x for x in (1, 2)]",
    "Beta(*[3, 5])",
    "Beta(a=3, b=5)",
    "eval('Beta(3, 5)')",
    "exec('1')",
    "Beta(3, 5) if True else 0",
    "Beta(3, 5); import os",
    "Beta(__import__('os').getpid(), 5)",
]
pieces = st.sampled_from(["Beta", "Gamma", "Normal", "Uniform", "(", ")", ",", "3", "5", "-1", "0", "1e309",
                          "nan", "inf", ".", "__class__", "__import__", "lambda", ":", "'os'", "[", "]",
                          "*", "**", "=", " ", "+", "-", "j", "True", "None", "0x10", "1_000"])
code_like = st.lists(pieces, min_size=1, max_size=12).map("".join)
names = st.sampled_from([*ALLOWED, "Dirichlet", "beta", "os.system", "getattr"])
numbers = st.one_of(st.integers(-10, 10).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["1e309", "-0.0", "1_0", "0b1", "True", "'3'", "3j", "x"]))
calls = st.builds(lambda n, args: f"{n}({', '.join(args)})", names, st.lists(numbers, max_size=3))
strings = st.one_of(st.text(max_size=60), code_like, calls, st.sampled_from(PAYLOADS),
                    st.sampled_from(PAYLOADS).map(lambda p: f"Beta({p}, 5)"))


@pytest.fixture
def no_eval(monkeypatch):
    """eval/exec/compile blow up when called from the parser's or the config's module (ast.parse is fine)."""
    import heedful.config
    import heedful.model.priors

    def refuse(*args, **kwargs):
        raise AssertionError("the distribution parser called eval/exec/compile")
    for module in (heedful.model.priors, heedful.config):
        for name in ("eval", "exec", "compile", "__import__"):
            monkeypatch.setattr(module, name, refuse, raising=False)


@pytest.mark.filterwarnings("ignore::SyntaxWarning")
@settings(max_examples=1500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=strings)
def test_parser_accepts_only_allow_listed_calls_and_runs_nothing(text, no_eval):
    try:
        name, args = parse_distribution(text)
    except ConfigError as e:
        event("refused")
        assert "\n" not in str(e) or len(text.splitlines()) > 1
    else:
        event(f"accepted {name}")
        assert name in ALLOWED and len(args) == ALLOWED[name][1]
        assert all(isinstance(a, float) and math.isfinite(a) for a in args)
    assert not MARKER.exists()
    assert not hasattr(builtins, "PWNED") and "PWNED" not in globals()


@pytest.mark.parametrize("text", PAYLOADS)
def test_code_payloads_are_refused(text, no_eval):
    with pytest.raises(ConfigError):
        parse_distribution(text)
    assert not MARKER.exists()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(a=st.floats(1e-3, 1e3), b=st.floats(1e-3, 1e3))
def test_valid_beta_strings_round_trip(a, b):
    assert parse_distribution(f"Beta({a!r}, {b!r})") == ("Beta", (a, b))
