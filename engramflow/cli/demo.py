"""`engramflow demo`: the main job on the embedded default, end to end.

Build (or reuse) the organism, ingest the world, then in one pipeline runtime run sequential editing
of the same facts with each algorithm (statistics and causal tracing are stages of those flows),
write the comparison report and print a summary table.
"""

from __future__ import annotations

import time

import typer

DEMO_ALGORITHMS = ("memit", "emmet", "alphaedit")


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        n: int = typer.Option(200, help="Facts edited sequentially by each algorithm."),
        batch_size: int = typer.Option(50, help="Facts per batch."),
        algorithms: str = typer.Option(",".join(DEMO_ALGORITHMS), help="Comma-separated algorithms."),
        layers: str = typer.Option("auto", help="'auto' (causal tracing), 'preset' or e.g. '0'."),
        tiny: bool = typer.Option(False, "--tiny", help="The tiny organism and world: 30 facts in batches of 10."),
    ) -> None:
        """Build the organism, ingest the world, edit N facts with each algorithm, report."""
        from rich.console import Console

        from engramflow import home, progress
        from engramflow.data.ingest import ingest_file
        from engramflow.flows.config import RunConfig
        from engramflow.flows.sequential import sequential_flow
        from engramflow.ledger import default_store
        from engramflow.organism import build_organism, organism_report
        from engramflow.report import compare_report, load_run, summary, summary_table, write_report
        from engramflow.runtime import pipeline_runtime, task_runner

        console = Console()
        started = time.perf_counter()
        world = "world-tiny" if tiny else "world"
        if tiny:  # the tiny world has about 50 subjects; each edit takes a distinct one
            n, batch_size = min(n, 30), min(batch_size, 10)

        console.rule("1. the organism")
        model_dir = build_organism(tiny=tiny)
        rep = organism_report(model_dir)
        console.print(f"{model_dir}\ntrain top-1 {rep['train_top1']:.3f}, held-out top-1 {rep['heldout_top1']:.3f}, "
                      f"built in {rep['build_seconds']:.0f} s")

        console.rule("2. ingest the world")
        result = ingest_file(world, "world")
        console.print(f"accepted {result.accepted}, rejected {result.rejected}, duplicates {result.duplicates}")

        console.rule("3. sequential editing (Prefect flows, stages on Ray)")
        run_ids = []
        progress.use_terminal_sink()
        with pipeline_runtime():
            for algorithm in algorithms.split(","):
                cfg = RunConfig(algorithm=algorithm, model=str(model_dir), dataset=world,
                                format="world", corpus=world, n=n, batch_size=batch_size, layers=layers)
                console.print(f"[bold]{algorithm}[/]: {n} facts in batches of {batch_size}")
                run_ids.append(sequential_flow.with_options(task_runner=task_runner())(cfg))

        console.rule("4. report")
        store = default_store()
        out = home.get_home() / "reports" / "demo"
        report = compare_report(store, run_ids, out) if len(run_ids) > 1 else write_report(store, run_ids[0], out)
        summaries = [summary(load_run(store, run_id)) for run_id in run_ids]
        console.print(summary_table(summaries, title=f"{n} sequential edits, batches of {batch_size}"))
        console.print(f"report: {report}")
        console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
