"""``heedful filter``: keep the votes of attentive users, export TRL DPO records, audit every row."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from heedful.filtering import REASONS, Filtered

WEIGHT_WARNING = (
    "weights P(z = 1 | y) are higher when the user picked the stronger model; training on them "
    "writes the model prior ('the stronger model wins') into the labels. Use them for diagnostics, "
    "not as training weights, unless that is what you want."
)


def print_counts(res: Filtered, console: Console) -> None:
    """The audit counts: kept + every drop reason = input rows."""
    t = Table("rows", "count", box=None)
    t.add_row("kept", f"{res.counts['kept']:,}")
    for r in REASONS:
        t.add_row(f"dropped: {r}", f"{res.counts[r]:,}")
    t.add_row("[bold]input rows[/bold]", f"[bold]{res.counts['rows']:,}[/bold]")
    console.print(t)


def register(app: typer.Typer) -> None:
    @app.command("filter")
    def filter_cmd(
        votes: Annotated[Path, typer.Argument(help="Votes file: .csv, .tsv, .parquet or .jsonl.")],
        fit: Annotated[
            Path, typer.Option("--fit", help="Folder written by `heedful fit` (users.parquet, params.json).")
        ],
        output: Annotated[Path, typer.Option("-o", "--output", help="DPO records: .jsonl or .parquet.")],
        min_eta: Annotated[
            float | None, typer.Option("--min-eta", help="Keep users with eta_hat >= X.")
        ] = None,
        min_prob: Annotated[
            float | None, typer.Option("--min-prob", help="Keep users with P(eta > tau) >= P.")
        ] = None,
        tau: Annotated[float | None, typer.Option("--tau", help="The tau of --min-prob.")] = None,
        keep_fraction: Annotated[
            float | None,
            typer.Option(
                "--keep-fraction", help="Keep the most attentive users holding this fraction of the votes."
            ),
        ] = None,
        audit: Annotated[
            Path | None, typer.Option("--audit", help="Audit of every input row (.parquet/.csv/.jsonl).")
        ] = None,
        fmt: Annotated[
            str, typer.Option("--format", help="standard (strings) or conversational (messages).")
        ] = "standard",
        weights: Annotated[
            bool, typer.Option("--weights", help="Add P(z=1|y) per vote (biased: see docs).")
        ] = False,
    ) -> None:
        """Keep the non-tie votes of attentive users; write TRL DPO records with epsilon = (1 - eta)/2."""
        from heedful.dpo import dpo_records, write_dpo
        from heedful.errors import InputError
        from heedful.filtering import Rule, filter_votes, load_fit
        from heedful.outputs import write_table
        from heedful.votes import read_table

        out, err = Console(), Console(stderr=True)
        rule = Rule(min_eta=min_eta, min_prob=min_prob, tau=tau, keep_fraction=keep_fraction)
        if fmt not in ("standard", "conversational"):
            raise InputError(f"--format must be standard or conversational, not {fmt!r}")
        if output.suffix.lower() not in (".jsonl", ".ndjson", ".parquet", ".pq"):
            raise InputError(f"{output}: the DPO export is .jsonl or .parquet")
        res = filter_votes(
            read_table(votes), load_fit(fit), rule, conversational=fmt == "conversational", weights=weights
        )
        if audit is not None:
            write_table(audit, res.audit)
        write_dpo(output, dpo_records(res.kept, fmt, weights=weights))
        out.print(f"[bold]heedful filter[/bold]: {rule.describe()}")
        print_counts(res, out)
        for w in res.warnings + ([WEIGHT_WARNING] if weights else []):
            err.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
        out.print(
            f"wrote {res.counts['kept']:,} DPO records ({fmt}) to {output}"
            + (f" and the audit of {res.counts['rows']:,} rows to {audit}" if audit else "")
        )
