"""Sequential editing at the papers' scale: 1,000 distinct edits in batches of 100 per method, every
earlier edit re-evaluated after every batch, through the pipeline (`sequential_flow`, recorded in the
store), then one table per method at every 200 edits and a comparison report (`engramflow report`).

    python bench/sequential.py --world world-large                       # the large world's organism
    python bench/sequential.py --facts ../shared/data/counterfact/counterfact-edit.json.gz \\
        --format easyedit-counterfact --records 1300                     # an organism of real facts
    python bench/sequential.py --world world-tiny --n 40 --batch-size 10 --methods memit,scen   # quick

Curves per method: ES, PS, NS of all edits so far, the unrelated probes' top-1, perplexity of the
organism's corpus, and retention (ES) of the first batch; SCEN adds the zsRE protocol's reliability,
generality and locality (its targets). The organism is built once and cached (`build_organism`); with
`--facts` it learns the first `--records` records of the file whose targets are other records' true
objects (`data.selection.with_known_targets`), written under the home's `bench-data/`. Runs resume
(a run's id is a hash of its config), so a killed bench picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from engramflow import home

console = Console(width=160)
METHODS = ("memit", "emmet", "alphaedit", "scen")
# Extra protocols per method (the format's and the drift protocols are always read): SCEN's targets are
# zsRE-style reliability and locality.
EXTRA = {"scen": ("zsre",)}


def fact_file(path: str, fmt: str, records: int) -> Path:
    """The first `records` records of `path` whose targets are other records' true objects, written
    as a file of the same format under the home (the organism and the runs read the same records)."""
    from engramflow.data.ingest import get_loader, load_requests
    from engramflow.data.selection import with_known_targets

    requests, _ = load_requests(path, fmt)
    keep = sorted(r["position"] for r in with_known_targets(requests, records))
    raw = dict(get_loader(fmt).read(path))
    out = home.get_home() / "bench-data" / f"{Path(path).name.split('.')[0]}-{records}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps([raw[i] for i in keep])
    if not out.is_file() or out.read_text() != text:
        out.write_text(text)
    return out


def organism(args: argparse.Namespace) -> tuple[str, str, str]:
    """(model directory, dataset, format) of the bench's organism, built on first use."""
    from engramflow.organism import build_organism

    started = time.perf_counter()
    if args.facts:
        dataset = fact_file(args.facts, args.format, args.records)
        model = build_organism(facts=dataset, format=args.format)
        dataset, fmt = str(dataset), args.format
    else:
        model = build_organism(world=args.world)
        dataset, fmt = args.world, "world"
    report = json.loads((model / "organism.json").read_text())
    console.print(f"organism {model.name}: train top-1 {report['train_top1']:.3f}, held-out {report['heldout_top1']:.3f}"
                  + (f", paraphrases as written {report['paraphrase_top1']:.3f}" if "paraphrase_top1" in report else "")
                  + f"; built in {report['build_seconds']:.0f} s ({time.perf_counter() - started:.0f} s here)")
    return str(model), dataset, fmt


def run_method(method: str, model: str, dataset: str, fmt: str, args: argparse.Namespace) -> tuple[str, float, str | None]:
    """(run id, seconds, error) of one sequential run; a run that fails is recorded as failed."""
    from engramflow.flows.config import RunConfig
    from engramflow.flows.sequential import sequential_flow
    from engramflow.runtime import task_runner
    from engramflow.tasks.evaluate import protocols_for

    protocols = None
    if method in EXTRA:
        protocols = list(dict.fromkeys([*protocols_for(fmt, method), *EXTRA[method]]))
    cfg = RunConfig(algorithm=method, model=model, dataset=dataset, format=fmt, n=args.n,
                    batch_size=args.batch_size, n_probes=args.n_probes, seed=args.seed,
                    hparams=json.loads(args.hparams.get(method, "{}")), protocols=protocols,
                    edit_cpus=args.edit_cpus)
    run_id = cfg.run_id("sequential")
    started = time.perf_counter()
    try:
        sequential_flow.with_options(task_runner=task_runner())(cfg, run_id=run_id)
        error = None
    except Exception as err:  # one method failing (e.g. an ill-conditioned solve) leaves the others to run
        error = f"{type(err).__name__}: {err}"
        console.print(f"[red]{method} failed:[/red] {error}", highlight=False)
    return run_id, time.perf_counter() - started, error


def _series(store: Any, run_id: str, protocol: str) -> dict[str, dict[int, float]]:
    from engramflow.storage import queries as q

    out: dict[str, dict[int, float]] = {}
    for r in q.degradation(store, run_id, protocol).to_pylist():
        if r["value"] is not None:
            out.setdefault(r["metric"], {})[int(r["step"])] = float(r["value"])
    return out


def curve_rows(store: Any, run_id: str, every: int) -> list[dict[str, Any]]:
    """One row per `every` edits (and the unedited model): the run's curves at those steps."""
    from engramflow.report import load_run

    data = load_run(store, run_id)
    zsre = _series(store, run_id, "zsre")
    rows = []
    for step in sorted(data.x):
        edits = data.x[step]
        if step != -1 and edits % every:
            continue
        row = {"edits": edits, "step": step}
        for m in ("es", "ps", "ns"):
            row[m] = data.scores.get(m, {}).get(step)
        for m in ("probe_top1", "perplexity", "rel_norm"):
            row[m] = data.drift.get(m, {}).get(step)
        row["first_batch_es"] = data.retention.get("es", {}).get(step)
        for m in ("efficacy", "generality", "locality"):
            if m in zsre:
                row[m] = zsre[m].get(step)
        rows.append(row)
    return rows


def show(method: str, run_id: str, rows: list[dict[str, Any]], seconds: float, error: str | None) -> None:
    columns = [c for c in ("edits", "es", "ps", "ns", "probe_top1", "perplexity", "first_batch_es", "rel_norm",
                           "efficacy", "generality", "locality") if any(r.get(c) is not None for r in rows)]
    table = Table(*columns, title=f"{method} ({run_id}), {seconds:.0f} s" + (f" — {error}" if error else ""))
    for r in rows:
        table.add_row(*("—" if r.get(c) is None else str(r[c]) if c == "edits" else
                        f"{r[c]:.2f}" if c == "perplexity" else f"{r[c]:.3f}" for c in columns))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="world-large", help="a named world (with no --facts)")
    parser.add_argument("--facts", help="a fact file the organism learns instead of a world")
    parser.add_argument("--format", default="easyedit-counterfact", help="ingest format of --facts")
    parser.add_argument("--records", type=int, default=1300, help="records of --facts the organism learns")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--n", type=int, default=1000, help="distinct edits per method")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--n-probes", type=int, default=100, help="unrelated facts probed after every batch")
    parser.add_argument("--every", type=int, default=200, help="table rows every this many edits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hparams", action="append", default=[], metavar="METHOD=JSON",
                        help="overrides of a method's preset, e.g. emmet='{\"emmet_lambda\": 0.1}'")
    parser.add_argument("--edit-cpus", type=int, help="torch threads of an edit task (default: the idle cores, "
                        "up to 2: OpenMP threads on an oversubscribed CPU spin against each other)")
    parser.add_argument("--out", type=Path, help="where the comparison report goes (default: <home>/reports/...)")
    args = parser.parse_args()
    args.hparams = dict(h.split("=", 1) for h in args.hparams)
    if args.edit_cpus is None:
        from engramflow.organism import idle_threads

        args.edit_cpus = min(2, idle_threads())

    from engramflow.ledger import default_store
    from engramflow.report import compare_report
    from engramflow.runtime import pipeline_runtime

    model, dataset, fmt = organism(args)
    results = {}
    with pipeline_runtime():
        for method in args.methods.split(","):
            results[method] = run_method(method, model, dataset, fmt, args)
    store = default_store()
    summary = {}
    for method, (run_id, seconds, error) in results.items():
        rows = curve_rows(store, run_id, args.every)
        show(method, run_id, rows, seconds, error)
        summary[method] = {"run_id": run_id, "seconds": seconds, "error": error, "curve": rows}
    name = Path(model).name
    out = args.out or home.get_home() / "reports" / f"sequential-{name}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "curves.json").write_text(json.dumps(summary, indent=1))
    run_ids = [r for r, _, _ in results.values()]
    if len(run_ids) > 1:
        console.print(f"report: {compare_report(store, run_ids, out)}", highlight=False, soft_wrap=True)
    console.print(f"plots again: engramflow --home {home.get_home()} report {' '.join(run_ids)}",
                  highlight=False, soft_wrap=True)


if __name__ == "__main__":
    main()
