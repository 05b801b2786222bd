"""The ``heedful`` command line: simulate, fit, demo (and the commands registered by other modules).

Errors in the input print one line and exit with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from heedful.errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find the attentive users in comparison-mode preference votes.")
err = Console(stderr=True)
out = Console()
_STATE = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False
          ) -> None:
    _STATE["debug"] = debug


def _parse_beta(text: str, what: str) -> tuple[float, float]:
    from heedful.model.priors import beta_of
    return beta_of(text, what)


@app.command()
def simulate(
    users: Annotated[int, typer.Option("--users", help="Number of users.")],
    votes_per_user: Annotated[float, typer.Option("--votes-per-user", help="Votes per user (mean if heavy-tailed).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Votes file (.parquet, .csv, .jsonl).")],
    mu: Annotated[float, typer.Option(help="P(the stronger model's answer is truly better), one pair.")] = 0.8,
    eta_prior: Annotated[str, typer.Option("--eta-prior", help="Population prior of eta.")] = "Beta(3, 5)",
    pairs: Annotated[int, typer.Option(help="Number of model pairs (mu spread over [0.6, 0.9] when > 1).")] = 1,
    vote_counts: Annotated[str, typer.Option("--vote-counts", help="fixed, geometric or lognormal.")] = "fixed",
    tie_rate: Annotated[float, typer.Option("--tie-rate", help="Share of votes that are ties.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Simulate a comparison-mode log; writes the votes and OUTPUT's stem + '.truth.parquet' (true eta)."""
    from heedful.outputs import write_table
    from heedful.simulate import default_pairs
    from heedful.simulate import simulate as run

    sim = run(users, votes_per_user, mu=mu, eta_prior=_parse_beta(eta_prior, "--eta-prior"),
              pairs=default_pairs(pairs, mu), vote_counts=vote_counts, tie_rate=tie_rate, seed=seed)
    truth = output.with_name(output.name.split(".")[0] + ".truth.parquet")
    write_table(output, sim.votes)
    write_table(truth, sim.users)
    out.print(f"wrote {len(sim.votes):,} votes of {users:,} users to {output} and the true eta to {truth}")


def _fit_and_write(votes_path: Path, outdir: Path, config: Path | None, method: str, device: str, dtype: str,
                   options: dict | None = None, dask: str | None = None):
    """Counts straight from the file(s) (streamed in chunks, or by a Dask cluster), then fit and write."""
    from heedful.config import load_priors

    priors = load_priors(config)
    t0 = time.perf_counter()
    collecting = _pause_collector(pause=not dask)   # a Dask client makes garbage of its own: not paused there
    try:
        fitting = _import_in_background("heedful.inference")   # torch and the fit's modules load while votes are read
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                      transient=True, disable=not err.is_terminal) as bar:
            task = bar.add_task(f"reading {votes_path}", total=None)
            if dask:
                from heedful.distributed import dask_vote_stats
                votes = dask_vote_stats(votes_path, dask)
            else:
                from heedful.ingest import stream_vote_stats
                votes = stream_vote_stats(votes_path)
            t_read = time.perf_counter() - t0
            bar.update(task, description=f"fitting {votes.n_rows:,} rows ({method})")

            def progress(it: int, obj: float) -> None:
                bar.update(task, description=f"fitting ({method}): iteration {it}, objective {obj:,.3f}")

            fitting.join()
            _resume_collector(collecting)
            from heedful.inference import Attentiveness
            from heedful.outputs import write_fit, write_inference_data

            model = Attentiveness(method=method, priors=priors, device=device, dtype=dtype, progress=progress,
                                  options=options).fit(votes)
            model.timings_ = {"read_and_count": t_read, **model.timings_}
            bar.update(task, description="writing")
            if model.inference_data_ is not None:
                write_inference_data(outdir / "posterior.nc", model.inference_data_)
            write_fit(outdir, model.users_, model.params())
    finally:
        _restore_collector(collecting)
    _summary(model, outdir, time.perf_counter() - t0)
    return model


def _pause_collector(pause: bool = True) -> bool:
    """Stop Python's cyclic garbage collector while torch is imported beside the read; returns whether it ran.

    The import makes a few hundred thousand long-lived objects, and each full collection it set off scanned
    them all: at 10M votes 4 full collections took 0.28-0.30 s of the two busy cores and 550 younger ones
    0.1 s. Nothing the read makes needs the collector (its arrays are freed by reference counting)."""
    running = gc.isenabled()
    if pause:
        gc.disable()
    return running


def _resume_collector(running: bool) -> None:
    """After the import: everything alive now (modules, the counts) moves to the permanent generation, so the
    fit's collections never scan it again, and the collector runs as before."""
    gc.freeze()
    if running:
        gc.enable()


def _restore_collector(running: bool) -> None:
    """At the end of the fit (or on an error): the frozen objects go back to the collector, which runs again if
    it ran before (a caller in the same process, such as a test, finds it as it was)."""
    gc.unfreeze()
    if running:
        gc.enable()


def _import_in_background(module: str) -> threading.Thread:
    """Start importing ``module`` in a daemon thread (about a second for torch, mostly spent outside the GIL
    loading libraries); the caller joins it before use. An import that fails there fails again in the
    caller's own import, with the usual message."""
    def load() -> None:
        with contextlib.suppress(Exception):
            importlib.import_module(module)

    thread = threading.Thread(target=load, name=f"import {module}", daemon=True)
    thread.start()
    return thread


def _summary(model, outdir: Path, elapsed: float) -> None:
    p = model.params()
    ep = model.eta_prior_
    out.print(f"[bold]heedful fit[/bold] ({p['method']}): {p['n_users']:,} users, {p['n_votes']:,} votes, "
              f"{p['n_ties']:,} ties, {p['n_pairs']} pair(s); {p['iterations']} iterations, "
              f"{'converged' if p['converged'] else '[red]not converged[/red]'}, {elapsed:.1f} s")
    t = Table("pair", "mu", "90% interval", "votes", "ties", "mu is", box=None)
    for r in model.pairs_.head(20).itertuples():
        t.add_row(f"{r.model_a} vs {r.model_b}", f"{r.mu:.3f}", f"[{r.mu_lo:.3f}, {r.mu_hi:.3f}]",
                  f"{r.n_votes:,}", f"{r.n_ties:,}", r.source)
    out.print(t)
    if len(model.pairs_) > 20:
        out.print(f"... and {len(model.pairs_) - 20} more pairs in params.json")
    learned = "learned" if ep["learned"] else "fixed"
    iv = (f", a in [{ep['a_lo']:.2f}, {ep['a_hi']:.2f}], b in [{ep['b_lo']:.2f}, {ep['b_hi']:.2f}]"
          if "a_lo" in ep else "")
    out.print(f"eta prior ({learned}): Beta({ep['a']:.3f}, {ep['b']:.3f}), mean {ep['mean']:.3f}{iv}")
    out.print(f"users who look inattentive (posterior mean eta < {p['casual_threshold']:g}): "
              f"{p['n_inattentive']:,} of {p['n_users']:,}")
    for w in p["warnings"]:
        out.print(f"[yellow]warning:[/yellow] {w}")
    out.print(f"wrote {outdir / 'users.parquet'} and {outdir / 'params.json'}")


def _parse_options(items: list[str]) -> dict:
    """``KEY=VALUE`` strings -> {key: int | float | bool | str}."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--option {item!r}: write KEY=VALUE, e.g. --option form=full")
        v = value.strip()
        low = v.lower()
        if low in ("true", "yes", "false", "no"):
            out[key.strip()] = low in ("true", "yes")
            continue
        for cast in (int, float):
            try:
                out[key.strip()] = cast(v)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = v
    return out


@app.command()
def fit(
    votes: Annotated[Path, typer.Argument(help="Votes file: .csv, .tsv, .parquet or .jsonl.")],
    outdir: Annotated[Path, typer.Option("-o", "--output", help="Output folder for users.parquet and params.json.")],
    config: Annotated[Path | None, typer.Option("--config", help="Priors TOML file.")] = None,
    method: Annotated[str, typer.Option(help="marginal (default), em, svi or nuts.")] = "marginal",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float64 (default) or float32.")] = "float64",
    draws: Annotated[int | None, typer.Option(help="nuts: draws per chain; svi: posterior draws.")] = None,
    warmup: Annotated[int | None, typer.Option(help="nuts: warm-up steps per chain.")] = None,
    chains: Annotated[int | None, typer.Option(help="nuts: number of chains.")] = None,
    seed: Annotated[int | None, typer.Option(help="svi/nuts: random seed.")] = None,
    option: Annotated[list[str] | None, typer.Option(
        "--option", help="a method option KEY=VALUE, repeatable (marginal, em: warm=false; em: solver=newton|em; "
                         "svi/nuts: e.g. form=full, per_vote=true, tie=false, guide=logit-normal; see "
                         "docs/posterior.md).")] = None,
    dask: Annotated[str | None, typer.Option(
        "--dask", help="Count the votes on a Dask cluster: a scheduler ADDRESS, or 'local' for a local cluster "
                       "(needs the dask extra); the fit itself runs here.")] = None,
) -> None:
    """Fit the behaviour model; write OUTDIR/users.parquet and OUTDIR/params.json (+ posterior.nc for svi/nuts).

    VOTES may be one file, a folder of vote files or a quoted glob ('logs/*.parquet'); files are read in
    chunks, so memory grows with users x pairs, not with votes.
    """
    options = {k: v for k, v in dict(draws=draws, warmup=warmup, chains=chains, seed=seed).items() if v is not None}
    options.update(_parse_options(option or []))
    _fit_and_write(votes, outdir, config, method, device, dtype, options, dask)


@app.command()
def demo(
    outdir: Annotated[Path, typer.Option("-o", "--output", help="Folder for the demo's files.")] = Path("demo-out"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    users: Annotated[int, typer.Option("--users", help="Simulated users.")] = 2000,
    votes_per_user: Annotated[float, typer.Option("--votes-per-user", help="Mean votes per user (heavy-tailed).")] = 12,
    position_bias: Annotated[float, typer.Option(
        "--position-bias", help="P(a casual user picks the first-shown answer); 0.5 = a coin.")] = 0.5,
    data: Annotated[Path | None, typer.Option("--data", help="MT-bench folder (default: ../shared/data).")] = None,
) -> None:
    """Real-text demo: MT-bench questions and answers, simulated users -> fit -> filter -> dpo.jsonl, vs the truth."""
    import numpy as np

    from heedful.dpo import dpo_records, write_dpo
    from heedful.filtering import Rule, filter_votes, load_fit
    from heedful.mtbench import agreement, default_data_dir, simulate_mtbench
    from heedful.outputs import write_table

    data_dir = data if data is not None else default_data_dir()
    if data_dir is None:
        out.print("[yellow]demo: ../shared/data/mt-bench not found: using synthetic placeholder text "
                  "(the statistics are the same; the DPO records are not real text)[/yellow]")
    sim, corpus = simulate_mtbench(users, votes_per_user, data_dir=data_dir, rho=position_bias, seed=seed)
    votes_path = outdir / "votes.parquet"
    write_table(votes_path, sim.votes)
    write_table(outdir / "truth.parquet", sim.users)
    src = f"MT-bench ({data_dir})" if corpus.real else "synthetic text"
    out.print(f"demo: simulated {len(sim.votes):,} votes of {len(sim.users):,} users on {src} -> {votes_path}")
    config = None
    if position_bias != 0.5:
        config = outdir / "priors.toml"
        config.write_text('[behaviour]\ncasual = "position"\n', encoding="utf-8")
    model = _fit_and_write(votes_path, outdir / "fit", config, "marginal", "auto", "float64")
    u = model.users_.merge(sim.users, on="user_id")
    inside = float(np.mean((u.true_eta >= u.eta_lo) & (u.true_eta <= u.eta_hi)))
    corr = float(np.corrcoef(u.eta_mean, u.true_eta)[0, 1])
    out.print(f"demo: correlation of eta_mean with the true eta {corr:.3f}; "
              f"90% intervals hold the true eta for {inside:.1%} of users")
    fit = load_fit(outdir / "fit")
    n_all, agree_all = agreement(sim.votes)
    t = Table("kept by", "votes kept", "share", "labels agreeing with the truth", box=None)
    t.add_row("all non-tie votes", f"{n_all:,}", "100%", f"{agree_all:.1%}")
    rules = [Rule(min_eta=0.5), Rule(min_prob=0.9, tau=0.5), Rule(keep_fraction=0.5)]
    results = [filter_votes(sim.votes, fit, r) for r in rules]
    for r, res in zip(rules, results, strict=True):
        n, agree = agreement(sim.votes, res.kept.row.to_numpy())
        t.add_row(r.describe(), f"{n:,}", f"{n / n_all:.0%}", f"{agree:.1%}")
    att_users = sim.users.user_id[sim.users.true_type == "attentive"]
    att = sim.votes[(sim.votes.choice != "tie") & sim.votes.user_id.isin(att_users)]
    t.add_row("(oracle: users of the attentive type)", f"{len(att):,}", f"{len(att) / n_all:.0%}",
              f"{(att.choice == att.true_better).mean():.1%}")
    out.print(t)
    main_res = results[1]
    records = dpo_records(main_res.kept)
    write_dpo(outdir / "dpo.jsonl", records)
    write_table(outdir / "audit.parquet", main_res.audit)
    counts = ", ".join(f"{k} {v:,}" for k, v in main_res.counts.items() if v and k not in ("rows", "kept"))
    out.print(f"demo: wrote {len(records):,} DPO records ({rules[1].describe()}) to {outdir / 'dpo.jsonl'}; "
              f"audit of {main_res.counts['rows']:,} rows: kept {main_res.counts['kept']:,}, dropped {counts}")
    if len(records):
        import json

        r0 = json.loads(records.iloc[:1].to_json(orient="records", force_ascii=False))[0]
        out.print("demo: a DPO record (texts cut to 80 characters here):")
        out.print({k: (v[:80] + "..." if isinstance(v, str) and len(v) > 80 else v) for k, v in r0.items()},
                  soft_wrap=True)


def _register_commands() -> None:
    import importlib
    import pkgutil

    import heedful.commands

    for m in sorted(pkgutil.iter_modules(heedful.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"heedful.commands.{m.name}").register(app)


_register_commands()


def _one_line(text: object) -> str:
    """A message on one line: newlines (from parsers and libraries) folded into spaces."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _say(text: str) -> None:
    print(_one_line(text), file=sys.stderr, flush=True)


def _on_signal(signum: int, frame) -> None:
    """SIGINT/SIGTERM unwind as KeyboardInterrupt (temporary files are removed); the signal is noted."""
    _STATE["signal"] = signum
    raise KeyboardInterrupt


def entry() -> None:
    """The console script (and ``python -m heedful``): :func:`main`, then, after a command that succeeded,
    leave without the interpreter's teardown.

    Every output is written, closed and renamed into place before ``main`` returns (a Dask cluster is
    closed too); the teardown would only free a fit's arrays, tensors and modules one by one, about
    0.6 s at 10M votes. Errors and interrupts leave through ``SystemExit`` as usual; an unflushable
    stdout (a closed pipe) exits 120, as the teardown would. Large freed blocks stay in the heap for reuse
    (:func:`heedful.memory.keep_freed_memory`; ``HEEDFUL_KEEP_MEMORY=0`` turns that off).
    """
    from heedful.memory import keep_freed_memory

    keep_freed_memory()
    main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:          # a closed pipe: what Python's own teardown reports with 120
        os._exit(120)
    os._exit(0)


def main() -> None:
    """Entry point: input errors print one line (``heedful: error: ...``) and exit 2; ``--debug`` re-raises.

    Usage errors (unknown or malformed options) exit 2 with one line too; interrupts exit 130 (SIGINT)
    or 143 (SIGTERM) after removing temporary files; anything else is an internal error (exit 1).
    """
    import signal

    debug = "--debug" in sys.argv[1:]
    _STATE["signal"] = None
    held = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with contextlib.suppress(ValueError):   # not the main thread: keep the default handlers
        for sig in held:
            signal.signal(sig, _on_signal)
    try:
        _run(debug)
    finally:
        with contextlib.suppress(ValueError, TypeError):
            for sig, handler in held.items():
                signal.signal(sig, handler)


def _run(debug: bool) -> None:
    import signal

    try:
        rv = app(standalone_mode=False, prog_name="heedful")
        if _STATE["signal"] is not None or rv == 130:   # typer turns KeyboardInterrupt into a returned 130
            raise KeyboardInterrupt
        if isinstance(rv, int) and not isinstance(rv, bool) and rv:
            sys.exit(rv)
    except InputError as e:
        if debug:
            raise
        _say(f"heedful: error: {e}")
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        if debug:
            raise
        signum = _STATE["signal"] or signal.SIGINT
        _say(f"heedful: interrupted ({signal.Signals(signum).name}); nothing was written for the unfinished step")
        sys.exit(128 + signum)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.TyperException as e:     # click usage errors: one line, their own exit code (2)
        if debug:
            raise
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        if message.strip():          # no message: click has already shown the help (no arguments)
            _say(f"heedful: error: {message}{hint}")
        sys.exit(getattr(e, "exit_code", 2))
    except OSError as e:
        if debug:
            raise
        _say(f"heedful: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}")
        sys.exit(1)
    except Exception as e:
        if debug:
            raise
        _say(f"heedful: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)")
        sys.exit(1)
