"""`engramflow export NAME|VERSION --out DIR`: a model version as a directory a server loads, with the
manifest of every edit behind it (`edits.json`)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        name: str = typer.Argument(..., help="An alias or a model version id."),
        out: Path = typer.Option(..., "--out", "-o", help="Output directory (new or empty)."),
        fmt: str = typer.Option("hf", "--format", help="Export format: hf (a Hugging Face directory with the "
                                "edits merged into the weights)."),
    ) -> None:
        """Export a version for serving: `AutoModelForCausalLM.from_pretrained(DIR)` loads it with its edits
        in the weights (a SCEN bank is saved beside them: load it with `engramflow.load_edited(DIR)`)."""
        import json

        from rich.console import Console

        from engramflow.export import MANIFEST, export_version
        from engramflow.ledger import default_store

        console = Console()
        try:
            path = export_version(default_store(), name, out, fmt)
        except (KeyError, ValueError, FileExistsError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            Console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False)
            raise typer.Exit(1) from None
        manifest = json.loads((path / MANIFEST).read_text())
        console.print(f"exported {manifest['version']} ({manifest['n_edits']} edits on {manifest['base_model']}) "
                      f"to {path}\nload with {manifest['loader']}", highlight=False, soft_wrap=True)
