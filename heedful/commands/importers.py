"""``heedful import-arena`` and ``heedful import-pandalm``: public formats -> a vote table file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def _summary(votes, output: Path) -> str:
    n_users, n_ties = votes.user_id.nunique(), int((votes.choice == "tie").sum())
    return f"wrote {len(votes):,} votes of {n_users:,} users ({n_ties:,} ties) to {output}"


def register(app: typer.Typer) -> None:
    @app.command("import-arena")
    def import_arena(
        battles: Annotated[Path, typer.Argument(help="Chatbot Arena battles: JSON array or JSON lines.")],
        output: Annotated[Path, typer.Option("-o", "--output", help="Vote table (.parquet, .csv, .jsonl).")],
    ) -> None:
        """Chatbot Arena battles -> votes (judge = user; whole conversations kept in messages_a/b)."""
        from heedful.importers import read_arena
        from heedful.outputs import write_table

        votes = read_arena(battles)
        write_table(output, votes)
        Console().print(_summary(votes, output))

    @app.command("import-pandalm")
    def import_pandalm(
        testset: Annotated[Path, typer.Argument(help="PandaLM testset-v1.json.")],
        output: Annotated[Path, typer.Option("-o", "--output", help="Vote table (.parquet, .csv, .jsonl).")],
        judge: Annotated[
            list[str] | None,
            typer.Option(
                "--judge", help="NAME=PATH of a judge file (e.g. gpt-3.5-turbo=gpt-3.5-turbo-testset-v1.json)."
            ),
        ] = None,
    ) -> None:
        """PandaLM test set -> votes (each annotator, and each --judge, is a user; 0 = tie)."""
        from heedful.errors import InputError
        from heedful.importers import read_pandalm
        from heedful.outputs import write_table

        judges = {}
        for j in judge or []:
            name, sep, path = j.partition("=")
            if not sep or not name or not path:
                raise InputError(f"--judge {j!r}: expected NAME=PATH")
            judges[name] = path
        votes = read_pandalm(testset, judges)
        write_table(output, votes)
        skipped = votes.attrs.get("skipped", 0)
        Console().print(
            _summary(votes, output) + (f"; skipped {skipped} judge outputs that are no label" if skipped else "")
        )
