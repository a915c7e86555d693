"""`engramflow sql "SELECT ..."`: a read-only DuckDB query over the store, printed as a table, CSV or JSON."""

from __future__ import annotations

import typer

from engramflow.cli.output import Format


def register(app: typer.Typer) -> None:
    @app.command("sql")
    def sql(
        query: str = typer.Argument(..., help="One read-only statement (SELECT, WITH, DESCRIBE, SHOW, EXPLAIN)."),
        limit: int = typer.Option(200, "--limit", min=0, help="Print at most this many rows (table format)."),
        fmt: Format = typer.Option(Format.table, "--format", help="table (rich), csv or json (all rows)."),
        memory_limit: str = typer.Option("2GB", "--memory-limit", help="DuckDB memory limit of the query."),
        timeout: float = typer.Option(300, "--timeout", min=0, help="Stop the query after this many seconds "
                                      "(0: no limit)."),
    ) -> None:
        """Query the artifact store (views: requests, rejects, runs, runs_latest, model_versions, edits,
        metrics, experts, experts_latest, stats, traces)."""
        import duckdb
        from rich.console import Console

        from engramflow.cli.output import error_line, print_rows
        from engramflow.ledger import default_store
        from engramflow.storage import ReadOnlyError, StoreDamageError

        console = Console(stderr=True)
        try:
            result = default_store().sql(query, memory_limit=memory_limit or None, timeout_s=timeout or None)
        except (ReadOnlyError, StoreDamageError, duckdb.Error) as e:
            console.print(error_line(e), highlight=False)
            raise typer.Exit(1) from None
        shown = result if fmt != Format.table else result.slice(0, limit)
        rows = list(zip(*(column.to_pylist() for column in shown.columns), strict=True))
        print_rows(result.column_names, rows, fmt.value)
        if fmt == Format.table and result.num_rows > limit:
            console.print(f"({result.num_rows} rows, {limit} shown; use --limit)")
