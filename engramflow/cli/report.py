"""`engramflow report RUN [RUN ...]`, `engramflow history SUBJECT`, `engramflow revert EDIT_ID`:
reports, the audit trail of a subject, and removing an edit's delta from a run's newest version."""

from __future__ import annotations

from pathlib import Path

import typer


def _error(message: object) -> typer.Exit:
    from rich.console import Console

    Console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(1)


def _message(err: Exception) -> str:
    """A KeyError's message without the quotes `str(KeyError)` adds."""
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        runs: list[str] = typer.Argument(..., help="Run id(s); several runs give a comparison report."),
        out: Path | None = typer.Option(None, "--out", "-o",
                                        help="Output directory (default: <home>/reports/<run>)."),
    ) -> None:
        """Write PNG plots and a markdown summary of a run (or overlay several runs)."""
        from rich.console import Console

        from engramflow.home import get_home
        from engramflow.ledger import default_store
        from engramflow.report import compare_report, load_run, summary, summary_table, write_report

        store = default_store()
        unique = list(dict.fromkeys(runs))
        name = unique[0] if len(unique) == 1 else "compare-" + "-".join(unique)
        target = out or get_home() / "reports" / name
        try:
            path = write_report(store, unique[0], target) if len(unique) == 1 else compare_report(store, unique, target)
            summaries = [summary(load_run(store, r)) for r in unique]
        except KeyError as err:
            raise _error(_message(err)) from None
        console = Console()
        console.print(summary_table(summaries, title="final numbers"))
        console.print(f"report: {path}", highlight=False, soft_wrap=True)

    @app.command("history")
    def history(
        subject: str = typer.Argument(..., help="The subject (exact, case-insensitive)."),
        contains: bool = typer.Option(False, "--contains", help="Match subjects containing the text."),
    ) -> None:
        """Every edit that touched a subject, and whether it still holds (latest ES/PS of its run)."""
        from rich.console import Console
        from rich.table import Table

        from engramflow.ledger import default_store
        from engramflow.report import fmt, subject_history

        rows = subject_history(default_store(), subject, contains)
        console = Console()
        if not rows:
            console.print(f"no edits touched a subject {'containing' if contains else 'named'} {subject!r}")
            return
        table = Table("edit", "run", "algorithm", "batch", "layers", "‖Δ‖", "prompt", "true → new",
                      "ES", "PS", "holds", title=f"edits of {subject!r} (ES/PS: latest evaluation of the run)")
        for r in rows:
            if not r["in_latest"]:
                holds = "[yellow]reverted[/yellow]"
            elif r["es_latest"] is None:
                holds = "not evaluated"
            else:
                holds = "[green]yes[/green]" if r["es_latest"] >= 0.5 else "[red]no[/red]"
            table.add_row(r["edit_id"], r["run_id"], r["algorithm"], str(r["batch_index"]),
                          ",".join(map(str, r["layers"])), fmt(r["delta_norm"]), r["prompt"],
                          f"{r['target_true'] or '?'} → {r['target_new']}", fmt(r["es_latest"]),
                          fmt(r["ps_latest"]), holds)
        console.print(table)

    @app.command("revert")
    def revert(
        edit_id: str = typer.Argument(..., help="The edit to remove (an `edits.edit_id`)."),
        run: str | None = typer.Option(None, "--run", help="Revert from this run's newest version "
                                                           "(default: the edit's own run)."),
    ) -> None:
        """Record a new model version: the run's newest version without the delta that carried the edit."""
        from rich.console import Console
        from rich.table import Table

        from engramflow.ledger import default_store, revert_edit
        from engramflow.tasks.evaluate import evaluate_revert

        store = default_store()
        try:
            result = revert_edit(store, edit_id, run)
        except (KeyError, ValueError) as err:
            raise _error(_message(err)) from None
        console = Console()
        with console.status("evaluating the new version"):
            evaluate_revert(store, result.version)
        console.print(f"new version [bold]{result.version.version_id}[/bold] = {result.parent.version_id} "
                      f"without edit {result.edit['edit_id']} (artifact {result.removed_key[:12]}…)",
                      highlight=False)
        if result.also_removed:
            table = Table("edit", "batch", "subject", "prompt", "true → new",
                          title=f"{len(result.also_removed)} other edit(s) removed with it: one delta carries a "
                                "whole batch, solved jointly, so one request cannot be removed alone")
            for e in result.also_removed:
                table.add_row(e["edit_id"], str(e["batch_index"]), e["subject"] or "?", e["prompt"] or "?",
                              f"{e['target_true'] or '?'} → {e['target_new'] or '?'}")
            console.print(table)
