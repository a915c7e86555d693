"""`engramflow doctor [--repair]`: check every table part, stored tensor and cache file of the home;
report what is damaged and what depends on it; with --repair, quarantine it (engramflow.doctor)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(
        repair: bool = typer.Option(False, "--repair", help="Move damaged files to a quarantine folder (with a "
                                    "manifest) so the next run recomputes what can be recomputed."),
    ) -> None:
        """Check the store and caches of the home: damaged Parquet parts, corrupt or missing tensors, damaged
        cache files, and which model versions and runs depend on them. Exit 1 if damage is left."""
        from rich.console import Console

        from engramflow import doctor as dr
        from engramflow.cli.output import plain, print_rows
        from engramflow.ledger import default_store

        console = Console()
        store = default_store()
        result = dr.checkup(store)
        console.print(plain(f"checked {result.parts} table parts, {result.tensors} tensors, {result.cache_files} "
                            f"cache files in {store.root}"))
        if result.healthy:
            console.print("[green]no damage found[/green]")
            return
        if repair:
            dr.repair(store, result)
        rows = [[p.kind, p.table or p.key or "", p.path, p.reason,
                 ", ".join(p.versions) or "", ", ".join(p.runs) or "", p.recomputed or "",
                 p.quarantined_to or ""] for p in result.problems]
        print_rows(["kind", "table / key", "file", "why", "versions that need it", "runs", "recomputed by the next "
                    "run", "quarantined to"], rows, title=f"{len(result.problems)} damaged or missing file(s)",
                   console=console)
        lost = sorted({v for p in result.problems for v in p.versions})
        if lost:
            console.print(plain(f"{len(lost)} model version(s) cannot be materialised any more: rerun their runs "
                                "under a new --run-id"))
        if repair:
            console.print(plain(f"quarantined to {result.quarantine} (manifest.json lists what and why)"))
            return
        console.print(plain("run `engramflow doctor --repair` to quarantine them"))
        raise typer.Exit(1)
