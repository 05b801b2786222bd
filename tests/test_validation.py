"""Malformed inputs through the real CLI: one line on stderr, exit code 2, no traceback, no output files.

The case list below is the single source of docs/validation.md: ``python tests/test_validation.py``
prints the table, and ``test_docs_table_is_current`` fails when the doc and this list disagree.
Every case runs ``heedful.cli.main`` in-process (as the console script does) in a fresh folder, so
messages show relative paths exactly as a user would see them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from heedful.simulate import simulate

GOOD = "user_id,model_a,model_b,choice\nu1,gpt-4,llama-13b,a\nu2,gpt-4,llama-13b,b\nu3,llama-13b,gpt-4,tie\n"
HEAD = "user_id,model_a,model_b,choice\n"
FIT = ("fit", "votes.csv", "-o", "out")
DOC = Path(__file__).resolve().parents[1] / "docs" / "validation.md"


def _parquet(frame: pd.DataFrame) -> bytes:
    import io
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def _csv(*rows: str, head: str = HEAD) -> str:
    return head + "".join(r + "\n" for r in rows)


def _config(text: str) -> dict[str, str]:
    return {"votes.csv": GOOD, "priors.toml": text}


CFG = (*FIT, "--config", "priors.toml")


@dataclass(frozen=True)
class Case:
    """One malformed input: the files to create, the command, and the exact line it must print."""

    id: str
    what: str
    files: dict[str, str | bytes]
    args: tuple[str, ...]
    message: str
    code: int = 2
    outputs: tuple[str, ...] = field(default=("out", "dpo.jsonl", "sim.csv"))

    @property
    def command(self) -> str:
        return "heedful " + " ".join(a if " " not in a else repr(a) for a in self.args)


CASES: list[Case] = [
    # --- columns --------------------------------------------------------------------------------------
    Case("missing-column", "no `choice` column", {"votes.csv": "user_id,model_a,model_b\nu1,x,y\n"}, FIT,
         "heedful: error: votes.csv: missing column(s) choice; found user_id, model_a, model_b"),
    Case("misspelt-columns", "misspelt `usr_id`, upper-case `Choice`",
         {"votes.csv": "usr_id,model_a,model_b,Choice\nu1,x,y,a\n"}, FIT,
         "heedful: error: votes.csv: missing column(s) user_id, choice ('usr_id' looks like 'user_id'; "
         "'Choice' looks like 'choice'); found usr_id, model_a, model_b, Choice"),
    Case("wrong-delimiter", "a tab-separated file named `.csv`",
         {"votes.csv": GOOD.replace(",", "\t")}, FIT,
         "heedful: error: votes.csv: missing column(s) user_id, model_a, model_b, choice (one column with "
         "separators in its name: is the file delimited as its suffix says?); found "
         "user_id\tmodel_a\tmodel_b\tchoice"),
    Case("duplicate-header", "`choice` twice in the header",
         {"votes.csv": "user_id,model_a,model_b,choice,choice\nu1,x,y,a,b\n"}, FIT,
         "heedful: error: votes.csv: column 'choice' appears twice in the header"),
    # --- values ---------------------------------------------------------------------------------------
    Case("choice-unknown", "`choice` = `sideways`", {"votes.csv": _csv("u1,x,y,a", "u2,x,y,sideways")}, FIT,
         "heedful: error: votes.csv: column 'choice': row 2 has 'sideways'; expected a, b or tie"),
    Case("choice-numeric", "`choice` coded 0/1", {"votes.csv": _csv("u1,x,y,1", "u2,x,y,0")}, FIT,
         "heedful: error: votes.csv: column 'choice': row 1 has '1'; expected a, b or tie (2 such rows)"),
    Case("choice-empty", "an empty `choice`", {"votes.csv": _csv("u1,x,y,a", "u2,x,y,")}, FIT,
         "heedful: error: votes.csv: column 'choice': row 2 is empty (null)"),
    Case("user-empty", "an empty `user_id`", {"votes.csv": _csv("u1,x,y,a", ",x,y,b", ",x,y,a")}, FIT,
         "heedful: error: votes.csv: column 'user_id': row 2 is empty (null) (2 such rows)"),
    Case("user-blank", "a `user_id` of spaces", {"votes.csv": _csv("u1,x,y,a", "  ,x,y,b")}, FIT,
         "heedful: error: votes.csv: column 'user_id': row 2 is blank"),
    Case("user-nan-parquet", "a null `user_id` in Parquet",
         {"votes.parquet": _parquet(pd.DataFrame({"user_id": ["u1", None], "model_a": ["x", "x"],
                                                  "model_b": ["y", "y"], "choice": ["a", "b"]}))},
         ("fit", "votes.parquet", "-o", "out"),
         "heedful: error: votes.parquet: column 'user_id': row 2 is empty (null)"),
    Case("model-empty", "an empty `model_b`", {"votes.csv": _csv("u1,x,y,a", "u2,x,,b")}, FIT,
         "heedful: error: votes.csv: column 'model_b': row 2 is empty (null)"),
    Case("same-model", "`model_a` == `model_b`", {"votes.csv": _csv("u1,x,y,a", "u2,x,x,b")}, FIT,
         "heedful: error: votes.csv: columns 'model_a'/'model_b': row 2 compares 'x' with itself"),
    Case("same-model-spaces", "`model_a` == `model_b` up to spaces",
         {"votes.csv": _csv("u1,x,y,a", 'u2," gpt-4","gpt-4 ",b')}, FIT,
         "heedful: error: votes.csv: columns 'model_a'/'model_b': row 2 compares 'gpt-4' with itself"),
    Case("vote-id-duplicate", "a repeated `vote_id`",
         {"votes.csv": _csv("u1,x,y,a,v1", "u2,x,y,b,v2", "u3,x,y,b,v1", head=HEAD.strip() + ",vote_id\n")},
         FIT, "heedful: error: votes.csv: column 'vote_id': row 3 repeats vote id 'v1' of row 1"),
    Case("vote-id-empty", "an empty `vote_id`",
         {"votes.csv": _csv("u1,x,y,a,v1", "u2,x,y,b,", head="user_id,model_a,model_b,choice,vote_id\n")},
         FIT, "heedful: error: votes.csv: column 'vote_id': row 2 is empty; vote ids must be unique"),
    Case("shown-first-bad", "`shown_first` = `left`",
         {"votes.csv": _csv("u1,x,y,a,a", "u2,x,y,b,left", head="user_id,model_a,model_b,choice,shown_first\n")},
         FIT, "heedful: error: votes.csv: column 'shown_first': row 2 has 'left'; expected a or b"),
    Case("gold-bad", "`gold` = `yes`",
         {"votes.csv": _csv("u1,x,y,a,", "u2,x,y,b,yes", head="user_id,model_a,model_b,choice,gold\n")},
         FIT, "heedful: error: votes.csv: column 'gold': row 2 has 'yes'; expected a or b"),
    Case("only-ties", "every vote a tie", {"votes.csv": _csv("u1,x,y,tie", "u2,x,y,tie")}, FIT,
         "heedful: error: every vote is a tie: there is nothing to fit (ties are left out of the likelihood)"),
    # --- files ----------------------------------------------------------------------------------------
    Case("not-utf8", "Latin-1 text (`é` as byte 0xE9)", {"votes.csv": _csv("u1,x,y,a", "u2,x,y,b").encode()
                                                           + b"Jos\xe9,x,y,a\n"}, FIT,
         "heedful: error: votes.csv: not UTF-8 text at line 4 (byte 52); re-encode it as UTF-8"),
    Case("broken-row-extra", "a row with an extra field in the middle",
         {"votes.csv": _csv("u1,x,y,a", "u2,x,y,b,oops", "u3,x,y,a")}, FIT,
         "heedful: error: votes.csv: row 2 has 5 field(s), the header has 4 (a stray delimiter or an unquoted "
         "value?)"),
    Case("broken-row-short", "a row with a missing field in the middle",
         {"votes.csv": _csv("u1,x,y,a", "u2,x,b", "u3,x,y,a")}, FIT,
         "heedful: error: votes.csv: row 2 has 3 field(s), the header has 4 (an unclosed quote?)"),
    Case("unclosed-quote", "an unclosed quote", {"votes.csv": _csv("u1,x,y,a", '"u2,x,y,b', "u3,x,y,a")}, FIT,
         "heedful: error: votes.csv: row 2 has 1 field(s), the header has 4 (an unclosed quote?)"),
    Case("empty-file", "a file of 0 bytes", {"votes.csv": ""}, FIT, "heedful: error: votes.csv: the file is empty"),
    Case("header-only", "a header and no rows", {"votes.csv": HEAD}, FIT,
         "heedful: error: votes.csv: no rows (only a header)"),
    Case("jsonl-broken", "a JSON-lines file with a broken line",
         {"votes.jsonl": '{"user_id": "u1", "model_a": "x", "model_b": "y", "choice": "a"}\n{"user_id": "u2",\n'},
         ("fit", "votes.jsonl", "-o", "out"),
         "heedful: error: votes.jsonl: cannot read as jsonl: line 2 is not valid JSON (Expecting property name "
         "enclosed in double quotes, column 18)"),
    Case("jsonl-not-object", "a JSON-lines file with a line that is a list",
         {"votes.jsonl": '{"user_id": "u1", "model_a": "x", "model_b": "y", "choice": "a"}\n[1, 2]\n'},
         ("fit", "votes.jsonl", "-o", "out"),
         "heedful: error: votes.jsonl: cannot read as jsonl: line 2 is a JSON list, not an object"),
    Case("parquet-corrupt", "a `.parquet` that is not Parquet", {"votes.parquet": "user_id,model_a\n"},
         ("fit", "votes.parquet", "-o", "out"),
         "heedful: error: votes.parquet: cannot read as parquet: Could not open Parquet input source "
         "'votes.parquet': Parquet magic bytes not found in footer. Either the file is corrupted or this is not a "
         "parquet file."),
    Case("unknown-format", "a `.xlsx` file", {"votes.xlsx": "x"}, ("fit", "votes.xlsx", "-o", "out"),
         "heedful: error: votes.xlsx: cannot tell the format from the name; use .csv, .tsv, .parquet or .jsonl"),
    Case("no-such-file", "a votes path that does not exist", {}, FIT, "heedful: error: votes.csv: no such file"),
    Case("folder-without-votes", "a folder holding no vote files", {"logs/notes.txt": "x"},
         ("fit", "logs", "-o", "out"),
         "heedful: error: logs: the folder holds no .parquet, .csv, .tsv or .jsonl files"),
    Case("glob-matches-nothing", "a quoted glob that matches no file", {"votes.csv": GOOD},
         ("fit", "logs/*.parquet", "-o", "out"), "heedful: error: logs/*.parquet: no file matches this pattern"),
    # --- config ---------------------------------------------------------------------------------------
    Case("config-unknown-distribution", "`eta = \"Dirichlet(1, 1)\"`",
         _config('[population]\neta = "Dirichlet(1, 1)"\n'), CFG,
         "heedful: error: distribution 'Dirichlet(1, 1)': unknown name 'Dirichlet'; allowed: Beta, Uniform, "
         "Gamma, LogNormal, Exponential, HalfNormal, HalfCauchy, Normal"),
    Case("config-negative-parameter", "`eta = \"Beta(-1, 5)\"`", _config('[population]\neta = "Beta(-1, 5)"\n'),
         CFG, "heedful: error: distribution 'Beta(-1, 5)': invalid parameters for Beta"),
    Case("config-non-numeric-parameter", "`eta = \"Beta(a, 5)\"`", _config('[population]\neta = "Beta(a, 5)"\n'),
         CFG, "heedful: error: distribution 'Beta(a, 5)': arguments must be plain numbers"),
    Case("config-code-import", "`eta = \"__import__('os').system('touch pwned')\"`",
         _config("[population]\neta = \"__import__('os').system('touch pwned')\"\n"), CFG,
         "heedful: error: distribution \"__import__('os').system('touch pwned')\": expected Name(number, ...), "
         "e.g. \"Beta(3, 5)\""),
    Case("config-code-lambda", "`mu = \"(lambda: Beta(3, 5))()\"`",
         _config('[[pairs]]\nmodel_a = "gpt-4"\nmodel_b = "llama-13b"\nmu = "(lambda: Beta(3, 5))()"\n'), CFG,
         "heedful: error: distribution '(lambda: Beta(3, 5))()': expected Name(number, ...), e.g. \"Beta(3, 5)\""),
    Case("config-code-attribute", "`eta = \"Beta.__init__(3, 5)\"`",
         _config('[population]\neta = "Beta.__init__(3, 5)"\n'), CFG,
         "heedful: error: distribution 'Beta.__init__(3, 5)': expected Name(number, ...), e.g. \"Beta(3, 5)\""),
    Case("config-syntax", "`eta = \"Beta(3x, 5)\"` (not an expression)", _config('[population]\neta = "Beta(3x, 5)"\n'),
         CFG, "heedful: error: cannot parse distribution 'Beta(3x, 5)'; write it like \"Beta(3, 5)\""),
    Case("config-mu-out-of-range", "a known `mu = 1.5`",
         _config('[[pairs]]\nmodel_a = "gpt-4"\nmodel_b = "llama-13b"\nmu = 1.5\n'), CFG,
         "heedful: error: pairs[0] (gpt-4 vs llama-13b): known mu must lie strictly between 0 and 1, got 1.5"),
    Case("config-fit-negative", "`[fit] tol = -1`", _config("[fit]\ntol = -1\n"), CFG,
         "heedful: error: fit settings: tol > 0, max_iter >= 1 and 0 < mu_interval_warn <= 1"),
    Case("config-fit-non-numeric", "`[fit] max_iter = \"many\"`", _config('[fit]\nmax_iter = "many"\n'), CFG,
         "heedful: error: priors.toml: fit.max_iter must be a number"),
    Case("config-not-toml", "a config that is not TOML", _config("[population\neta = 1\n"), CFG,
         "heedful: error: priors.toml: not valid TOML: Expected ']' at the end of a table declaration "
         "(at line 1, column 12)"),
    Case("config-unknown-section", "a misspelt section `[popluation]`", _config('[popluation]\neta = "learn"\n'),
         CFG, "heedful: error: priors.toml: unknown section(s) popluation; expected behaviour, fit, generators, "
         "pairs, population"),
    Case("config-missing", "a config path that does not exist", {"votes.csv": GOOD}, CFG,
         "heedful: error: priors.toml: no such config file"),
    Case("config-pair-twice", "a pair listed twice, in both orders",
         _config('[[pairs]]\nmodel_a = "gpt-4"\nmodel_b = "llama-13b"\nmu = 0.8\n'
                 '[[pairs]]\nmodel_a = "llama-13b"\nmodel_b = "gpt-4"\nmu = 0.3\n'), CFG,
         "heedful: error: pairs: llama-13b vs gpt-4 is listed twice"),
    Case("config-conflict-rho", "`rho` set while `casual = \"uniform\"` (conflicting options)",
         _config('[behaviour]\ncasual = "uniform"\nrho = 0.7\n'), CFG,
         "heedful: error: priors.toml: behaviour.rho is set but behaviour.casual is not \"position\""),
    # --- options --------------------------------------------------------------------------------------
    Case("option-unknown-method", "`--method magic`", {"votes.csv": GOOD}, (*FIT, "--method", "magic"),
         "heedful: error: --method must be one of marginal, em, svi, nuts, not 'magic'"),
    Case("option-bad-dtype", "`--dtype float16`", {"votes.csv": GOOD}, (*FIT, "--dtype", "float16"),
         "heedful: error: --dtype must be one of float64, float32, not 'float16'"),
    Case("option-output-is-file", "`-o` naming an existing file", {"votes.csv": GOOD},
         ("fit", "votes.csv", "-o", "votes.csv"),
         "heedful: error: votes.csv: is a file; -o/--output names the output folder", outputs=()),
    Case("option-unknown", "an option `fit` does not have", {"votes.csv": GOOD}, (*FIT, "--users", "3"),
         "heedful: error: No such option: --users (Possible options: --seed) (see 'heedful fit --help')"),
    Case("option-not-a-number", "`simulate --users many`", {},
         ("simulate", "--users", "many", "--votes-per-user", "3", "-o", "sim.csv"),
         "heedful: error: Invalid value for '--users': Input should be a valid integer, unable to parse string "
         "as an integer (see 'heedful simulate --help')"),
    Case("option-negative", "`simulate --users -5`", {},
         ("simulate", "--users", "-5", "--votes-per-user", "3", "-o", "sim.csv"),
         "heedful: error: --users and --votes-per-user must be at least 1"),
    Case("option-negative-prior", "`simulate --eta-prior \"Beta(-1, 5)\"`", {},
         ("simulate", "--users", "5", "--votes-per-user", "3", "--eta-prior", "Beta(-1, 5)", "-o", "sim.csv"),
         "heedful: error: distribution 'Beta(-1, 5)': invalid parameters for Beta"),
    Case("option-mu-out-of-range", "`simulate --mu 1.5`", {},
         ("simulate", "--users", "5", "--votes-per-user", "3", "--mu", "1.5", "-o", "sim.csv"),
         "heedful: error: --mu must lie strictly between 0 and 1, got 1.5"),
    Case("filter-without-fit", "`filter --fit` naming a folder with no fit", {"votes.csv": GOOD},
         ("filter", "votes.csv", "--fit", "out", "--min-eta", "0.5", "-o", "dpo.jsonl"),
         "heedful: error: out/users.parquet: no such file; run `heedful fit VOTES -o out` first"),
    Case("filter-conflicting-rules", "`filter --min-eta` with `--keep-fraction` (conflicting options)",
         {"votes.csv": GOOD}, ("filter", "votes.csv", "--fit", "out", "--min-eta", "0.5", "--keep-fraction", "0.5",
                               "-o", "dpo.jsonl"),
         "heedful: error: choose exactly one of --min-eta, --min-prob (with --tau) or --keep-fraction "
         "(got min_eta, keep_fraction)"),
]

# Inputs that are valid but thin: the fit runs (exit 0), says why in params.json's warnings, writes no NaN.
ACCEPTED: list[tuple[str, str, dict[str, str], tuple[str, ...], str]] = [
    ("single-vote", "one vote in all", {"votes.csv": _csv("u1,gpt-4,llama-13b,a")}, FIT, "not identified"),
    ("single-user", "one user with several votes",
     {"votes.csv": _csv(*[f"u1,gpt-4,llama-13b,{c}" for c in "aababaaab"])}, FIT, "not identified"),
    ("config-pair-absent", "a config pair that never occurs in the votes",
     _config('[[pairs]]\nmodel_a = "gpt-4"\nmodel_b = "mistral-7b"\nmu = 0.8\n'), CFG,
     "config pair gpt-4 vs mistral-7b never occurs in the votes; ignored"),
]


def _make(folder: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")


def run_cli(args: tuple[str, ...], capsys, monkeypatch) -> tuple[int, str, str]:
    """``heedful ARGS`` through heedful.cli.main in this process: (exit code, stdout, stderr)."""
    from heedful.cli import main

    monkeypatch.setattr(sys, "argv", ["heedful", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input(case: Case, tmp_path, capsys, monkeypatch):
    _make(tmp_path, case.files)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(case.args, capsys, monkeypatch)
    assert (code, err) == (case.code, case.message + "\n"), out
    assert "Traceback" not in out + err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before   # nothing written
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("choice-unknown", "config-code-import")],
                         ids=lambda c: c.id)
def test_debug_shows_the_traceback(case: Case, tmp_path, capsys, monkeypatch):
    from heedful.errors import InputError

    _make(tmp_path, case.files)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="expected"):
        run_cli(("--debug", *case.args), capsys, monkeypatch)


def test_console_script_one_line_and_debug(tmp_path):
    """The installed entry point, in a subprocess: one line and exit 2; with --debug a traceback."""
    _make(tmp_path, {"votes.csv": _csv("u1,x,y,a", "u2,x,y,sideways")})
    cmd = [sys.executable, "-c", "from heedful.cli import main; main()"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([*cmd, *FIT], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("heedful: error: votes.csv: column 'choice': row 2 has 'sideways'")
    d = subprocess.run([*cmd, "--debug", *FIT], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert d.returncode == 1 and "Traceback" in d.stderr and "InputError" in d.stderr
    assert not (tmp_path / "out").exists()


def test_console_entry_leaves_fast_with_every_output_written(tmp_path):
    """``python -m heedful`` (the console script's entry): after a fit it skips the interpreter's teardown,
    yet exits 0 with the whole summary on stdout and both files in place; errors still exit 2."""
    sim = simulate(60, 6, seed=3).votes
    sim.to_csv(tmp_path / "votes.csv", index=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "heedful", "fit", "votes.csv", "-o", "out"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.rstrip().endswith("params.json")               # the last line of the summary arrived
    assert json.loads((tmp_path / "out" / "params.json").read_text())["n_users"] == 60
    assert len(pd.read_parquet(tmp_path / "out" / "users.parquet")) == 60
    bad = subprocess.run([*cmd[:4], "missing.csv", "-o", "out2"], cwd=tmp_path, capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("heedful: error:")


@pytest.mark.parametrize("name,what,files,args,warning", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_thin_but_valid_input_warns(name, what, files, args, warning, tmp_path, capsys, monkeypatch):
    _make(tmp_path, files)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    params = json.loads((tmp_path / "out" / "params.json").read_text())
    assert any(warning in w for w in params["warnings"]), params["warnings"]
    users = pd.read_parquet(tmp_path / "out" / "users.parquet")
    eta = users[["eta_hat", "eta_mean", "eta_lo", "eta_hi"]].to_numpy()
    assert ((eta >= 0) & (eta <= 1)).all()                          # no NaN, inside [0, 1]
    assert all(0 < r["mu"] < 1 or r["mu"] in (0.0, 1.0) for r in params["mu"])


# --- a broken row deep in a large file (the small version of benchmarks/broken_csv.py) -----------------
def _big_csv(path: Path, rows: int, broken_at: int) -> None:
    import numpy as np

    i = np.arange(1, rows + 1)
    lines = pd.Series("u" + (i % 997).astype(str) + ",gpt-4,llama-13b," + np.where(i % 3, "a", "b") + ",v"
                      + i.astype(str))
    lines.iloc[broken_at - 1] += ",stray"
    path.write_text("user_id,model_a,model_b,choice,vote_id\n" + "\n".join(lines) + "\n", encoding="utf-8")


def test_broken_row_deep_in_a_csv_read_in_blocks(tmp_path, monkeypatch):
    """read_votes streams in blocks; the row number is counted across blocks."""
    import heedful.votes as hv

    _big_csv(tmp_path / "votes.csv", 60_000, 45_678)
    monkeypatch.setattr(hv, "BLOCK_SIZE", 1 << 16)            # ~30 blocks
    with pytest.raises(hv.InputError) as e:
        hv.read_votes(tmp_path / "votes.csv")
    assert str(e.value) == (f"{tmp_path / 'votes.csv'}: row 45678 has 6 field(s), the header has 5 "
                            "(a stray delimiter or an unquoted value?)")


@pytest.mark.parametrize("fault,message", [
    ("choice", "column 'choice': row 45678 has 'sideways'; expected a, b or tie"),
    ("vote_id", "column 'vote_id': row 45678 repeats vote id 'v12' of row 12"),
    ("model_b", "columns 'model_a'/'model_b': row 45678 compares 'gpt-4' with itself"),
])
def test_bad_value_deep_in_a_csv_validated_block_by_block(fault, message, tmp_path, monkeypatch):
    """read_votes validates each block as it arrives; rows are counted from the start of the file."""
    import heedful.votes as hv

    path = tmp_path / "votes.csv"
    _big_csv(path, 60_000, 1)
    lines = path.read_text().splitlines()
    lines[1] = lines[1].removesuffix(",stray")
    user, a, b, choice, vid = lines[45_678].split(",")
    fixed = {"choice": (user, a, b, "sideways", vid), "vote_id": (user, a, b, choice, "v12"),
             "model_b": (user, a, a, choice, vid)}[fault]
    lines[45_678] = ",".join(fixed)
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(hv, "BLOCK_SIZE", 1 << 16)            # ~30 blocks
    with pytest.raises(hv.InputError) as e:
        hv.read_votes(path)
    assert str(e.value) == f"{path}: {message}"
    monkeypatch.setattr(hv, "BLOCK_SIZE", 1 << 24)            # one block: the same message
    with pytest.raises(hv.InputError) as e1:
        hv.read_votes(path)
    assert str(e1.value) == str(e.value)


def test_blocks_give_the_same_frame_as_one_read(tmp_path, monkeypatch):
    import heedful.votes as hv

    path = tmp_path / "votes.csv"
    _big_csv(path, 30_000, 1)
    path.write_text(path.read_text().replace(",stray", "", 1))
    whole = hv.validate_votes(hv.read_table(path))
    monkeypatch.setattr(hv, "BLOCK_SIZE", 1 << 15)
    pd.testing.assert_frame_equal(hv.read_votes(path), whole)


def test_broken_row_deep_in_a_large_csv_cli(tmp_path, capsys, monkeypatch):
    _big_csv(tmp_path / "votes.csv", 150_000, 123_456)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(FIT, capsys, monkeypatch)
    assert code == 2 and not (tmp_path / "out").exists()
    assert err == ("heedful: error: votes.csv: row 123456 has 6 field(s), the header has 5 "
                   "(a stray delimiter or an unquoted value?)\n")


def test_broken_row_past_the_first_block_streamed(tmp_path):
    ingest = pytest.importorskip("heedful.ingest")
    _big_csv(tmp_path / "votes.csv", 150_000, 123_456)
    with pytest.raises(ingest.InputError, match="row 123456 has 6 field"):
        ingest.stream_vote_stats(tmp_path / "votes.csv", chunk_rows=1000)     # 1 MiB blocks


# --- the documentation table -------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\t", "\\t").replace("\n", " ")


def markdown_table() -> str:
    lines = ["| # | input | command | exit | message (stderr, one line) |", "|---|---|---|---|---|"]
    for i, c in enumerate(CASES, 1):
        lines.append(f"| {i} | {_cell(c.what)} | `{_cell(c.command)}` | {c.code} | `{_cell(c.message)}` |")
    lines += ["", "Valid but thin inputs are not errors: the fit runs (exit 0) and says so in `params.json`'s "
              "`warnings`; no NaN reaches `users.parquet`.", "",
              "| input | command | warning contains |", "|---|---|---|"]
    for _, what, _, args, warning in ACCEPTED:
        lines.append(f"| {_cell(what)} | `heedful {' '.join(args)}` | `{_cell(warning)}` |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- begin: generated by tests/test_validation.py -->", "<!-- end: generated -->"


def test_docs_table_is_current():
    text = DOC.read_text(encoding="utf-8")
    assert text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip() == markdown_table().strip(), \
        "docs/validation.md is stale: run `python tests/test_validation.py --write`"


def test_at_least_25_cases():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


if __name__ == "__main__":
    table = markdown_table()
    if "--write" in sys.argv:
        text = DOC.read_text(encoding="utf-8")
        DOC.write_text(text[:text.index(BEGIN) + len(BEGIN)] + "\n" + table + text[text.index(END):],
                       encoding="utf-8")
    else:
        print(table, end="")
