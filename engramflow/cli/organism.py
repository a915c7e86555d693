"""`engramflow organism build`: build (or find cached) the embedded model and print where it is."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="The embedded model: a small Llama-architecture LM pretrained here on a fact set.",
                        no_args_is_help=True)

    @group.command("build", help="Build the organism on the embedded world (or on --facts); print its "
                                 "accuracies and, as the last line, its model directory.")
    def build(
        tiny: bool = typer.Option(False, "--tiny", help="The tiny world and model (the tests' model; about a minute on two idle cores)."),
        facts: str | None = typer.Option(None, "--facts", help="Train on this fact file instead of the world."),
        fmt: str | None = typer.Option(None, "--format", "-f", help="Ingest format of --facts."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    ) -> None:
        from rich.console import Console

        from engramflow.organism import build_organism, organism_report

        if facts is not None and fmt is None:
            raise typer.BadParameter("--facts needs --format", param_hint="--format")
        console = Console(stderr=True)
        model_dir = build_organism(tiny=tiny, facts=facts, format=fmt, progress=progress)
        report = organism_report(model_dir)
        console.print(
            f"train top-1 {report['train_top1']:.3f}  held-out top-1 {report['heldout_top1']:.3f}  "
            f"({report['n_train_prompts']} / {report['n_heldout_prompts']} prompts, {report['n_params']:,} params, "
            f"{report['epochs']} epochs, built in {report['build_seconds']:.0f} s at "
            f"{report['tokens_per_second']:,.0f} tokens/s)"
        )
        print(model_dir)

    app.add_typer(group, name="organism")
