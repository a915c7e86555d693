"""`engramflow edit` and `engramflow run edit|sequential|experts`: editing runs through the pipeline
(Prefect flow, stages as Ray tasks), recorded in the store, summarised on the terminal.

Running the same command again resumes the same run (its id is a hash of the options)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import typer

run_app = typer.Typer(help="Run a pipeline flow (Prefect flow, stages as Ray tasks).", no_args_is_help=True)


def _hparams(value: str | None) -> dict:
    """Hyper-parameter overrides from a JSON object or a YAML/JSON file."""
    if not value:
        return {}
    path = Path(value)
    if path.exists():
        import yaml

        return dict(yaml.safe_load(path.read_text()) or {})
    try:
        return dict(json.loads(value))
    except json.JSONDecodeError as err:
        raise typer.BadParameter(f"--hparams: neither a file nor a JSON object ({err})") from None


def execute(flow_name: str, cfg, ray_address: str | None, run_id: str | None = None) -> str:
    """Run a flow on the pipeline runtime and print its summary; returns the run id."""
    from rich.console import Console

    from engramflow import progress
    from engramflow.cli.output import error_line
    from engramflow.data.ingest import IngestError
    from engramflow.editors.artifacts import ArtifactError
    from engramflow.flows.edit import edit_flow
    from engramflow.flows.experts import experts_flow
    from engramflow.flows.sequential import sequential_flow
    from engramflow.ledger import default_store
    from engramflow.report import load_run, summary, summary_table
    from engramflow.runtime import pipeline_runtime, task_runner
    from engramflow.storage import StoreDamageError

    flow = {"edit": edit_flow, "sequential": sequential_flow, "experts": experts_flow}[flow_name]
    progress.use_terminal_sink()
    try:
        with pipeline_runtime(ray_address=ray_address):
            run_id = flow.with_options(task_runner=task_runner())(cfg, run_id=run_id)
    except (StoreDamageError, IngestError, ArtifactError) as err:  # damage or bad data, not a bug: no traceback
        message = "; ".join([str(err), *getattr(err, "__notes__", [])])
        Console(stderr=True).print(error_line(f"the run failed (recorded as failed): {message}"), highlight=False)
        raise typer.Exit(1) from None
    store = default_store()
    Console().print(summary_table([summary(load_run(store, run_id))], title=f"run {run_id}"))
    return run_id


def _options(
    algorithm: str = typer.Option(..., "--algorithm", "-a", help="A registered method: rome, memit, emmet, "
                                  "alphaedit, ft, scen, ..."),
    model: str = typer.Option("organism", help="Hugging Face model dir/id, or 'organism' (embedded)."),
    dataset: str = typer.Option("world", help="Dataset file, or 'world' (the embedded fact world)."),
    format: str = typer.Option("world", "--format", "-f", help="Ingest format of --dataset."),
    n: int = typer.Option(50, help="Number of requests to edit (distinct subjects)."),
    batch_size: int | None = typer.Option(None, help="Requests per batch (default: all n at once)."),
    layers: str = typer.Option("preset", help="'preset', 'auto' (causal tracing) or e.g. '0,1'."),
    window: int = typer.Option(1, help="With --layers auto: how many layers end at the traced peak."),
    hparams: str | None = typer.Option(None, help="Overrides: JSON object or YAML file."),
    corpus: str | None = typer.Option(None, help="Covariance/perplexity corpus (default: the organism's own, else the world's)."),
    n_probes: int = typer.Option(100, help="Unrelated facts probed after every batch."),
    eval: str | None = typer.Option(None, "--eval", help="Evaluation protocols, comma-separated (default: the "
                                    "format's and the method's)."),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu or cuda (stages then request GPUs from Ray)."),
    ray_address: str | None = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster; default local."),
    shards: int | None = typer.Option(None, min=1, help="Parallel tasks a batch's per-request work (targets, "
                                      "experts) is split into, one core or GPU each (default: the method's)."),
    run_id: str | None = typer.Option(None, help="Explicit run id (default: derived from the options)."),
):
    from dataclasses import replace

    from engramflow.flows.config import ConfigError, RunConfig, check_against_model, check_options
    from engramflow.models import resolve_model

    # Every option is checked here, cheapest first, before any service starts or anything is recorded.
    try:
        cfg = RunConfig(algorithm=algorithm, model=model, dataset=dataset, format=format, n=n,
                        batch_size=n if batch_size is None else batch_size, hparams=_hparams(hparams),
                        layers=layers, window=window, corpus=corpus, n_probes=n_probes,
                        protocols=[p.strip() for p in eval.split(",")] if eval else None, seed=seed, device=device,
                        shards=shards)
        check_options(cfg)  # before resolving: `organism` may be built, a missing directory never is
        cfg = replace(cfg, model=resolve_model(model))
        check_against_model(cfg)
    except ConfigError as err:
        raise typer.BadParameter(err.reason, param_hint=err.option) from None
    return cfg, ray_address, run_id


def register(app: typer.Typer) -> None:
    def edit(**kwargs) -> None:
        """Edit N requests (in batches of B) into a model; record version, edits and metrics."""
        cfg, ray_address, run_id = _options(**kwargs)
        execute("sequential", cfg, ray_address, run_id)

    def run_edit(**kwargs) -> None:
        """edit_flow: ingest → statistics → (locate) → edit one batch → evaluate."""
        cfg, ray_address, run_id = _options(**kwargs)
        execute("edit", cfg, ray_address, run_id)

    def run_sequential(**kwargs) -> None:
        """sequential_flow: N requests in batches of B, every earlier edit evaluated after each batch."""
        cfg, ray_address, run_id = _options(**kwargs)
        execute("sequential", cfg, ray_address, run_id)

    def run_experts(**kwargs) -> None:
        """experts_flow: expert training (SCEN by default) as parallel Ray tasks, then indexing neurons,
        then evaluation."""
        cfg, ray_address, run_id = _options(**kwargs)
        execute("experts", cfg, ray_address, run_id)

    # The commands take the same options: typer reads them from `_options`'s signature.
    for fn in (edit, run_edit, run_sequential):
        fn.__signature__ = inspect.signature(_options)
    signature = inspect.signature(_options)
    run_experts.__signature__ = signature.replace(parameters=[
        p.replace(default=typer.Option("scen", "--algorithm", "-a", help="An expert method (default scen)."))
        if p.name == "algorithm" else p for p in signature.parameters.values()])
    app.command("edit")(edit)
    run_app.command("edit")(run_edit)
    run_app.command("sequential")(run_sequential)
    run_app.command("experts")(run_experts)
    app.add_typer(run_app, name="run")
