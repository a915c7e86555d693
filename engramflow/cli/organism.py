"""`engramflow organism build`: build (or find cached) the embedded model and print where it is."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="The embedded model: a small Llama-architecture LM pretrained here on a fact set.",
                        no_args_is_help=True)

    @group.command("build", help="Build the organism on the embedded world (or on --facts); print its "
                                 "accuracies and, as the last line, its model directory. A build that "
                                 "misses its accuracy targets fails, saying what it reached.")
    def build(
        tiny: bool = typer.Option(False, "--tiny", help="The tiny world and model (the tests' model; about a minute on two idle cores)."),
        world: str | None = typer.Option(None, "--world", help="A named world: world, world-tiny, world-large "
                                         "(2,150 facts; its build takes several times the default's)."),
        facts: str | None = typer.Option(None, "--facts", help="Train on this fact file instead of the world."),
        fmt: str | None = typer.Option(None, "--format", "-f", help="Ingest format of --facts."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    ) -> None:
        from rich.console import Console

        from engramflow.organism import OrganismBuildError, build_organism, organism_report

        if facts is not None and fmt is None:
            raise typer.BadParameter("--facts needs --format", param_hint="--format")
        if facts is not None and world is not None:
            raise typer.BadParameter("give --facts or --world, not both", param_hint="--world")
        console = Console(stderr=True)
        try:
            model_dir = build_organism(tiny=tiny, facts=facts, format=fmt, progress=progress, world=world)
        except (OrganismBuildError, ValueError) as err:
            console.print(f"[red]error:[/red] {err}", highlight=False)
            raise typer.Exit(1) from None
        report = organism_report(model_dir)
        paraphrases = (f"  paraphrases as written {report['paraphrase_top1']:.3f}"
                       if report.get("paraphrase_top1") is not None else "")
        console.print(
            f"train top-1 {report['train_top1']:.3f}  held-out top-1 {report['heldout_top1']:.3f}{paraphrases}  "
            f"({report['n_train_prompts']} / {report['n_heldout_prompts']} prompts, {report['n_params']:,} params, "
            f"{report['epochs']} epochs, built in {report['build_seconds']:.0f} s at "
            f"{report['tokens_per_second']:,.0f} tokens/s)"
        )
        print(model_dir)

    app.add_typer(group, name="organism")
