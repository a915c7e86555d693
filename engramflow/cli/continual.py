"""`engramflow continual tick|serve`: scheduled continual editing of a named model (docs/continual.md).

`tick` runs one tick in the foreground (for cron and tests): exit 0 when everything accepted was
promoted or nothing was new, 3 when the gate kept any of a drop back. `serve` serves the tick as a
Prefect deployment on an interval or a cron schedule against the server at PREFECT_API_URL."""

from __future__ import annotations

import os
import re
from pathlib import Path

import typer

from engramflow.cli.run import _hparams

continual_app = typer.Typer(help="Scheduled continual editing: inbox -> edit -> quality gate -> promote.",
                            no_args_is_help=True)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(value: str) -> float:
    """Seconds from `90`, `30s`, `10m`, `2h` or `1d` (BadParameter naming the value otherwise)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value or "")
    if not match or float(match.group(1)) <= 0:
        raise typer.BadParameter(f"--every {value!r}: give a positive number of seconds, or e.g. 30s, 10m, 2h, 1d")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _inbox(path: str) -> str:
    """The inbox as the flow takes it; a local one must be a directory (checked before anything starts)."""
    if "://" not in path and not Path(path).is_dir():
        raise typer.BadParameter(f"{path} is not a directory", param_hint="--inbox")
    return _local(path)


def _local(path: str | None) -> str | None:
    """An absolute path for a local path (the served flow runs elsewhere); URLs as they are."""
    return path if path is None or "://" in path else str(Path(path).resolve())


def register(app: typer.Typer) -> None:
    @continual_app.command("tick")
    def tick(
        inbox: str = typer.Option(..., help="Folder or fsspec URL the drops land in."),
        model: str = typer.Option("organism", help="The model an alias's first tick starts from (a Hugging Face "
                                  "directory, or 'organism')."),
        alias: str = typer.Option(..., help="The named model version to keep current, e.g. production."),
        algorithm: str | None = typer.Option(None, "--algorithm", "-a", help="A registered method (default: the "
                                             "alias's own, memit for a new alias)."),
        gate: str | None = typer.Option(None, "--gate", help="YAML file overriding the gate's thresholds."),
        format: str | None = typer.Option(None, "--format", "-f", help="Ingest format of every drop (default: "
                                          "by suffix: .jsonl, .csv, .parquet, or .<format>.json)."),
        batch_size: int = typer.Option(50, min=1, help="Requests per edited batch."),
        hparams: str | None = typer.Option(None, help="Method overrides: JSON object or YAML file."),
        corpus: str | None = typer.Option(None, help="Statistics / perplexity corpus (default: the organism's "
                                          "world)."),
        wait: float = typer.Option(0.0, min=0, help="Seconds to wait for a running tick of the alias, then skip."),
        device: str = typer.Option("cpu", help="cpu or cuda."),
        ray_address: str | None = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster; default local."),
    ) -> None:
        """One tick in the foreground: take what is new, edit, gate, promote. Exit 3 when the gate kept
        any request back (the alias then points at the best version that held)."""
        from rich.console import Console

        from engramflow.flows.continual import ContinualConfig, continual_flow
        from engramflow.models import resolve_model
        from engramflow.runtime import pipeline_runtime, task_runner
        from engramflow.tasks.gate import load_gate

        try:
            load_gate(gate)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--gate") from None
        cfg = ContinualConfig(inbox=_inbox(inbox), model=resolve_model(model), alias=alias, algorithm=algorithm,
                              gate=_local(gate), format=format, batch_size=batch_size, hparams=_hparams(hparams),
                              corpus=corpus, wait=wait, device=device)
        with pipeline_runtime(ray_address=ray_address):
            result = continual_flow.with_options(task_runner=task_runner())(cfg)
        Console().print(tick_table(result))
        raise typer.Exit(result.exit_code)

    @continual_app.command("example-drop")
    def example_drop(
        out: Path = typer.Argument(..., help="The JSONL file to write (e.g. inbox/day1.jsonl)."),
        world: str = typer.Option("world", help="An embedded world: world (the organism's) or world-tiny."),
        n: int = typer.Option(20, min=1, help="Facts, one per subject."),
        offset: int = typer.Option(0, min=0, help="Start at this subject (a later drop takes the next ones)."),
    ) -> None:
        """Write N counterfactual edits of the embedded world as a drop in the user JSONL format (written
        under a hidden name and renamed, as a drop should land)."""
        import json

        from engramflow.data.world import named_world

        facts = named_world(world)
        if facts is None:
            raise typer.BadParameter(f"--world {world!r}: use world or world-tiny")
        records, subjects = [], set()
        for record in facts.user_records():
            if record["subject"] not in subjects:
                subjects.add(record["subject"])
                records.append(record)
        chosen = records[offset: offset + n]
        if len(chosen) < n:
            raise typer.BadParameter(f"the {world} world has {len(records)} subjects: --offset {offset} --n {n} "
                                     "asks for more")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen))
        os.replace(tmp, out)
        typer.echo(f"{out}: {n} facts of {world} (subjects {offset}..{offset + n - 1})")

    @continual_app.command("serve")
    def serve(
        inbox: str = typer.Option(..., help="Folder or fsspec URL the drops land in."),
        model: str = typer.Option("organism", help="The model an alias's first tick starts from."),
        alias: str = typer.Option(..., help="The named model version to keep current."),
        every: str | None = typer.Option(None, help="Interval: 90, 30s, 10m, 2h, 1d."),
        cron: str | None = typer.Option(None, help="Cron expression (UTC), e.g. '0 3 * * *'."),
        algorithm: str | None = typer.Option(None, "--algorithm", "-a", help="A registered method."),
        gate: str | None = typer.Option(None, "--gate", help="YAML file overriding the gate's thresholds."),
        format: str | None = typer.Option(None, "--format", "-f", help="Ingest format of every drop."),
        batch_size: int = typer.Option(50, min=1, help="Requests per edited batch."),
        hparams: str | None = typer.Option(None, help="Method overrides: JSON object or YAML file."),
        corpus: str | None = typer.Option(None, help="Statistics / perplexity corpus."),
        device: str = typer.Option("cpu", help="cpu or cuda."),
        ray_address: str | None = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster; default local."),
        name: str | None = typer.Option(None, help="Deployment name (default: continual-<alias>)."),
    ) -> None:
        """Serve the tick as a Prefect deployment on a schedule, against the server at PREFECT_API_URL
        (`prefect server start`: the ephemeral API never fires schedules). Runs until interrupted."""
        from prefect.deployments.runner import EntrypointType

        from engramflow.aliases import check_alias_name
        from engramflow.flows.continual import scheduled_tick
        from engramflow.tasks.gate import load_gate

        if not os.environ.get("PREFECT_API_URL"):
            raise typer.BadParameter(
                "PREFECT_API_URL is not set: start a server (`prefect server start --host 127.0.0.1`) and set "
                "PREFECT_API_URL=http://127.0.0.1:4200/api; Prefect's ephemeral API registers a deployment but "
                "never fires its schedule")
        if (every is None) == (cron is None):
            raise typer.BadParameter("give exactly one of --every and --cron")
        try:
            check_alias_name(alias)
            load_gate(gate)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
        parameters = {"inbox": _inbox(inbox), "model": _local(model) if Path(model).exists() else model,
                      "alias": alias, "algorithm": algorithm, "gate": _local(gate), "format": format,
                      "batch_size": batch_size, "hparams": _hparams(hparams), "corpus": corpus, "device": device,
                      "ray_address": ray_address}
        scheduled_tick.serve(
            name=name or f"continual-{alias}", interval=parse_interval(every) if every else None, cron=cron,
            parameters=parameters, tags=["engramflow", "continual", alias], limit=1,
            description=f"Continual editing of {alias}: {inbox} -> gate -> promote",
            entrypoint_type=EntrypointType.MODULE_PATH)

    app.add_typer(continual_app, name="continual")


def tick_table(result) -> object:
    """A tick's result as a rich table."""
    from rich.table import Table

    table = Table("", "", title=f"tick {result.tick_id} of {result.alias}: {result.status}", show_header=False)
    for label, value in (("alias", f"{result.version_before} -> {result.version_after}"),
                         ("drops", str(len(result.drops))), ("promoted", str(result.promoted)),
                         ("quarantined", str(result.quarantined)), ("superseded", str(result.superseded)),
                         ("already live", str(result.already_live)), ("rejected records", str(result.rejected)),
                         ("candidates edited", f"{result.edit_seconds:.1f} s"),
                         ("gate evaluations", f"{result.gate_evaluations} ({result.gate_seconds:.1f} s)"),
                         ("finding offenders", f"{result.bisect_evaluations} evaluations, "
                                               f"{result.bisect_seconds:.1f} s"),
                         ("seconds", f"{result.seconds:.1f}")):
        table.add_row(label, value)
    table.caption = result.message
    return table
