"""``heedful plot OUTDIR``: posterior plots (PNG) of a fit; see :mod:`heedful.plots`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    @app.command("plot")
    def plot_cmd(
        outdir: Annotated[Path, typer.Argument(help="Folder written by `heedful fit` (users.parquet, posterior.nc).")],
        truth: Annotated[Path | None, typer.Option(
            "--truth", help="True eta per user (the .truth.parquet of `heedful simulate`): adds reliability.png.")
        ] = None,
        output: Annotated[Path | None, typer.Option(
            "-o", "--output", help="Folder for the PNGs (default OUTDIR/plots).")] = None,
        top: Annotated[int, typer.Option(help="Users at each end of the forest plot.")] = 15,
    ) -> None:
        """Trace/rank of the globals, forest of eta intervals, mu posterior vs prior, PPC, reliability (PNG)."""
        from heedful.plots import plot_fit

        console = Console()
        written = plot_fit(outdir, truth, output, top)
        for p in written:
            console.print(f"wrote {p}")
        if not (outdir / "posterior.nc").exists():
            console.print("no posterior.nc (fit with --method svi or nuts for trace, mu, and PPC plots)")
