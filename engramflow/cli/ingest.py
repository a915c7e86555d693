"""`engramflow ingest PATH --format F`: load a fact file into the store's `requests` table."""

from __future__ import annotations

import typer

# How many reject reasons the command shows (all of them are in the `rejects` table).
SHOWN_REJECTS = 5


def register(app: typer.Typer) -> None:
    from engramflow.data.ingest import LOADERS  # stdlib-only at import time: cheap enough for --help

    formats = "\n\n".join(f"{name}: {loader.description}" for name, loader in LOADERS.items())

    @app.command("ingest", help="Normalise a fact file into `requests`; invalid records go to `rejects` "
                                f"with the reason.\n\nFormats:\n\n{formats}")
    def ingest(
        path: str = typer.Argument(..., help="File path or URL (`world` with --format world: the embedded world)."),
        fmt: str = typer.Option(..., "--format", "-f", help=f"One of: {', '.join(LOADERS)}."),
    ) -> None:
        from rich.console import Console
        from rich.table import Table

        from engramflow.cli.output import error_line, plain
        from engramflow.data.ingest import IngestError, ingest_file
        from engramflow.storage import StoreDamageError

        console = Console()
        try:
            result = ingest_file(path, fmt)
        except (IngestError, StoreDamageError) as e:
            Console(stderr=True).print(error_line(e), highlight=False)
            raise typer.Exit(1) from None
        console.print(f"[green]accepted {result.accepted}[/green]  [red]rejected {result.rejected}[/red]  "
                      f"[yellow]duplicates {result.duplicates}[/yellow]")
        if result.rejects:
            table = Table("position", "field", "reason", title=f"first rejects of {len(result.rejects)}")
            for r in result.rejects[:SHOWN_REJECTS]:
                table.add_row(plain(r["position"]), plain(r["field"]), plain(r["reason"]))  # stored text, not markup
            console.print(table)
