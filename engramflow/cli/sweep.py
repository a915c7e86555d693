"""`engramflow sweep SPEC.yaml` (a grid of runs fanned out on Ray) and `engramflow sweep report SWEEP`."""

from __future__ import annotations

from pathlib import Path

import click
import typer
from typer.core import TyperGroup


class _DefaultRun(TyperGroup):
    """`engramflow sweep SPEC.yaml ...` means `engramflow sweep run SPEC.yaml ...`."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().resolve_command(ctx, args)


sweep_app = typer.Typer(cls=_DefaultRun, no_args_is_help=True,
                        help="Sweeps: a grid of runs as Ray tasks on a cluster (`engramflow sweep SPEC.yaml`), "
                             "and their report.")


def _error(message: object) -> typer.Exit:
    from rich.console import Console

    Console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    return typer.Exit(1)


@sweep_app.command("run")
def run(
    spec: Path = typer.Argument(..., help="The sweep spec (YAML: name, base, grid, resources)."),
    ray_address: str | None = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster; default local."),
    max_parallel: int | None = typer.Option(None, min=1, help="At most this many cells at once (default: "
                                            "the spec's, else what the cluster's resources allow)."),
) -> None:
    """Run every cell of SPEC not completed yet (a killed sweep resumes; failed cells run again)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from engramflow.flows.sweep import SpecError, load_spec, sweep_flow
    from engramflow.models import resolve_model
    from engramflow.runtime import pipeline_runtime, task_runner

    try:
        sweep = load_spec(spec, resolve_model=resolve_model)
    except SpecError as err:
        raise _error(escape(str(err))) from None
    with pipeline_runtime(ray_address=ray_address):
        try:
            results = sweep_flow.with_options(task_runner=task_runner())(sweep, max_parallel=max_parallel)
        except SpecError as err:
            raise _error(escape(str(err))) from None
    table = Table("cell", "axes", "run", "status", "host (node)", "seconds", title=f"sweep {sweep.name}",
                  title_justify="left")
    for r in results:
        status = "completed (before)" if r["reused"] else r["status"]
        color = "green" if r["status"] == "completed" else "red"
        where = f"{r.get('hostname') or '—'} ({str(r.get('node_id') or '—')[:8]})"
        seconds = "—" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        table.add_row(str(r["cell"]), escape(", ".join(f"{k}={v}" for k, v in r["axes"].items())), r["run_id"],
                      f"[{color}]{status}[/{color}]", escape(where), seconds)
    console = Console()
    console.print(table)
    failed = [r for r in results if r["status"] != "completed"]
    for r in failed:
        console.print(f"cell {r['cell']} failed: {escape(str(r['error']))}", highlight=False)
    console.print(f"report: engramflow sweep report {sweep.name}", highlight=False)
    if failed:
        raise typer.Exit(1)


@sweep_app.command("report")
def report(
    sweep_id: str = typer.Argument(..., help="The sweep's id (its spec's name)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory (default: "
                                    "<home>/reports/sweeps/<sweep>)."),
) -> None:
    """Every cell's final metrics ranked beside the unedited model; plots per swept axis; degradation curves."""
    from rich.console import Console

    from engramflow.home import get_home
    from engramflow.ledger import default_store
    from engramflow.sweep_report import results_table, write_sweep_report

    store = default_store()
    try:
        path, rows = write_sweep_report(store, sweep_id, out or get_home() / "reports" / "sweeps" / sweep_id)
    except KeyError as err:
        raise _error(err.args[0] if err.args else err) from None
    console = Console()
    console.print(results_table(rows, title=f"sweep {sweep_id}"))
    console.print(f"report: {path}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(sweep_app, name="sweep")
