"""The `engramflow` command line. Each command group lives in `engramflow/commands/<name>.py`
and exposes `register(app)`; heavy imports (torch, ray, prefect) happen inside the commands so
`engramflow --help` stays fast."""

from __future__ import annotations

import importlib
from pathlib import Path

import typer

from engramflow import home

app = typer.Typer(
    help="Rewrite facts inside language models at scale, with an auditable edit history.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# One module per command group, registered in this order in `--help`.
COMMANDS: list[str] = [
    "ingest",
    "sql",
    "organism",
    "run",
    "demo",
    "report",
    "doctor",
    "continual",
    "alias",
    "export",
    "sweep",
]


def _version(value: bool) -> None:
    if value:
        from engramflow import __version__

        print(f"engramflow {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    home_dir: Path | None = typer.Option(
        None, "--home", envvar="ENGRAMFLOW_HOME", help="Directory for all artifacts and state."
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    home.quiet_env()
    home.set_home(home_dir or home.DEFAULT_HOME)


for _name in COMMANDS:
    importlib.import_module(f"engramflow.cli.{_name}").register(app)
