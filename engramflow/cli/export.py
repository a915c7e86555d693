"""`engramflow export NAME|VERSION --out DIR`: a model version as a directory a server loads, with the
manifest of every edit behind it (`edits.json`); `engramflow import-peft DIR`: a LoRA adapter on MLP down
projections recorded as a model version."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        name: str = typer.Argument(..., help="An alias or a model version id."),
        out: Path = typer.Option(..., "--out", "-o", help="Output directory (new or empty)."),
        fmt: str = typer.Option("hf", "--format", help="Export format: hf (a Hugging Face directory with the "
                                "edits merged into the weights) or peft (a LoRA adapter holding the edits; "
                                "needs the peft package)."),
    ) -> None:
        """Export a version for serving: `AutoModelForCausalLM.from_pretrained(DIR)` loads it with its edits
        in the weights (a SCEN bank is saved beside them: load it with `engramflow.load_edited(DIR)`); with
        --format peft, `PeftModel.from_pretrained(base, DIR)` does."""
        import json

        from rich.console import Console

        from engramflow.export import MANIFEST, export_version
        from engramflow.ledger import default_store

        console = Console()
        try:
            path = export_version(default_store(), name, out, fmt)
        except (KeyError, ValueError, FileExistsError, ImportError) as err:
            raise _error(err) from None
        manifest = json.loads((path / MANIFEST).read_text())
        console.print(f"exported {manifest['version']} ({manifest['n_edits']} edits on {manifest['base_model']}) "
                      f"to {path}\nload with {manifest['loader']}", highlight=False, soft_wrap=True)

    @app.command("import-peft")
    def import_peft(
        adapter: Path = typer.Argument(..., help="A PEFT LoRA adapter directory (adapter_config.json and "
                                       "adapter_model.safetensors)."),
        onto: str | None = typer.Option(None, "--onto", help="An alias, a version id, a model directory or "
                                        "`organism`: the version the adapter goes on (default: the adapter's "
                                        "base_model_name_or_path)."),
        alias: str | None = typer.Option(None, "--alias", help="Point this alias at the new version "
                                         "(`engramflow rollback ALIAS` undoes it)."),
    ) -> None:
        """Record a LoRA adapter on MLP down projections as a model version (its delta on top of --onto),
        so it can be exported, aliased, rolled back and edited further; adapters on other modules are
        refused."""
        from rich.console import Console

        from engramflow.export import import_peft as record_import
        from engramflow.ledger import default_store
        from engramflow.models import ORGANISM_NAMES, resolve_model

        store = default_store()
        if onto in ORGANISM_NAMES:
            onto = resolve_model(onto)
        try:
            version = record_import(store, adapter, onto, alias)
        except (KeyError, ValueError, FileNotFoundError, ImportError) as err:
            raise _error(err) from None
        console = Console()
        console.print(f"recorded {version.version_id} = {version.parent_version} + the adapter in {adapter}"
                      + (f"\n{alias} -> {version.version_id}" if alias else ""), highlight=False, soft_wrap=True)


def _error(err: Exception) -> typer.Exit:
    from rich.console import Console

    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    Console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(1)
