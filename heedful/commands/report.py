"""``heedful report OUTDIR``: one self-contained HTML page from a fit's outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report_cmd(
        outdir: Annotated[Path, typer.Argument(help="Folder written by `heedful fit` (users.parquet, params.json).")],
        output: Annotated[
            Path | None, typer.Option("-o", "--output", help="HTML file (default: OUTDIR/report.html).")
        ] = None,
        title: Annotated[str | None, typer.Option("--title", help="Title of the page.")] = None,
        truth: Annotated[
            Path | None, typer.Option("--truth", help="A simulation's truth file: adds the reliability figure.")
        ] = None,
    ) -> None:
        """Write an offline HTML report: summary, warnings, per-pair mu, eta over users, embedded figures."""
        from heedful.report import write_report

        out = Console()
        path = output if output is not None else outdir / "report.html"
        rep = write_report(outdir, path, title=title, truth=truth)
        size = path.stat().st_size
        out.print(f"[bold]heedful report[/bold]: wrote {path} ({size / 1024:,.0f} KiB, self-contained, "
                  f"{len(rep.figures)} figures, {len(rep.warnings)} warnings)", highlight=False)
        for i, f in enumerate(rep.figures, 1):
            out.print(f"  figure {i}: {f.title} ({f.source})", highlight=False)
        for n in rep.notes:
            out.print(f"  note: {n}", highlight=False)
