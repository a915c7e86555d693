"""`engramflow alias list|set` and `engramflow rollback NAME`: named model versions and their history
(append-only: setting or rolling back an alias adds a row, nothing is deleted)."""

from __future__ import annotations

import typer

alias_app = typer.Typer(help="Named model versions (aliases) and their history.", no_args_is_help=True)


def _error(message: object) -> typer.Exit:
    from rich.console import Console

    Console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(1)


def _message(err: Exception) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def register(app: typer.Typer) -> None:
    @alias_app.command("list")
    def list_(name: str | None = typer.Argument(None, help="An alias: show its whole history.")) -> None:
        """Every alias and the version it points at, or one alias's history."""
        from rich.console import Console
        from rich.table import Table

        from engramflow.aliases import alias_history, aliases
        from engramflow.ledger import default_store

        store = default_store()
        rows = alias_history(store, name) if name else aliases(store)
        if not rows:
            Console().print(f"no alias {name!r}" if name else "no aliases yet")
            raise typer.Exit(1 if name else 0)
        table = Table("alias", "version", "action", "set by", "method", "set at (UTC)", "note",
                      title=f"history of {name}" if name else "aliases")
        for r in rows:
            table.add_row(r["alias"], r["version"], r["action"], r["set_by"], r["algorithm"] or "",
                          f"{r['set_at']:%Y-%m-%d %H:%M:%S}", r["note"] or "")
        Console().print(table)

    @alias_app.command("set")
    def set_(name: str = typer.Argument(..., help="The alias (created if new)."),
             version: str = typer.Argument(..., help="A recorded model version id."),
             algorithm: str | None = typer.Option(None, "--algorithm", "-a",
                                                  help="The method later ticks edit it with (default: kept).")) -> None:
        """Point an alias at a recorded model version."""
        from rich.console import Console

        from engramflow.aliases import set_alias
        from engramflow.ledger import default_store

        try:
            row = set_alias(default_store(), name, version, "set", "engramflow alias set", algorithm=algorithm)
        except (KeyError, ValueError) as err:
            raise _error(_message(err)) from None
        Console().print(f"{name} -> {row['version']} (was {row['previous_version'] or 'unset'})", highlight=False)

    @app.command("rollback")
    def rollback(name: str = typer.Argument(..., help="The alias to roll back.")) -> None:
        """Point an alias back at its previous good version (a new row; nothing is deleted)."""
        from rich.console import Console

        from engramflow.aliases import rollback as roll_back
        from engramflow.ledger import default_store

        try:
            row = roll_back(default_store(), name)
        except (KeyError, ValueError) as err:
            raise _error(_message(err)) from None
        Console().print(f"{name} -> {row['version']} (rolled back from {row['previous_version']})", highlight=False)

    app.add_typer(alias_app, name="alias")
