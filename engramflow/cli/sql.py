"""`engramflow sql "SELECT ..."`: a read-only DuckDB query over the store, printed as a table."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("sql")
    def sql(
        query: str = typer.Argument(..., help="One read-only statement (SELECT, WITH, DESCRIBE, SHOW, EXPLAIN)."),
        limit: int = typer.Option(200, "--limit", help="Print at most this many rows."),
    ) -> None:
        """Query the artifact store (views: requests, rejects, runs, runs_latest, model_versions, edits,
        metrics, experts, experts_latest)."""
        import duckdb
        from rich.console import Console
        from rich.table import Table

        from engramflow.ledger import default_store
        from engramflow.storage.store import ReadOnlyError

        console = Console()
        try:
            result = default_store().sql(query)
        except (ReadOnlyError, duckdb.Error) as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(1) from None
        table = Table(*result.column_names)
        shown = [column.to_pylist() for column in result.slice(0, limit).columns]
        for row in zip(*shown, strict=True):
            table.add_row(*("" if v is None else str(v) for v in row))
        console.print(table)
        if result.num_rows > limit:
            console.print(f"({result.num_rows} rows, {limit} shown; use --limit)")
