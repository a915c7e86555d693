"""Sweep throughput on a real Ray cluster of one node and of two (1 CPU each, `ray start` head and worker
on this machine's loopback): the same 8-cell sweep, each time into a fresh store, cells per minute.

    python bench/sweep_scaling.py [--model organism-tiny] [--n 6] [--batch-size 3] [--steps 100]

Prints, per cluster: the whole sweep's wall time and cells per minute; its parts: the shared stages
(ingest, statistics, first-batch targets, once per key before any cell), the fan-out (first cell
submitted to last finished), per-cell start-up (to running from when the cell could run: Ray
scheduling, a worker process, the Prefect task) and per-cell work (running to finished); then the
ceiling those parts put on N nodes.
It also prints the machine's load and busiest processes before and after, since the machine may be
shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine_load() -> str:
    """Load averages and the busiest processes not started by this benchmark."""
    load = Path("/proc/loadavg").read_text().split()[:3]
    ps = subprocess.run(["ps", "-eo", "pid,pcpu,etimes,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    own = {str(os.getpid())}
    top = [line[:110] for line in ps.splitlines()[1:] if line.split()[0] not in own
           and float(line.split()[1]) >= 5.0][:6]
    return f"load {' '.join(load)} (2 cores)" + "".join(f"\n    {line}" for line in top)


def run(nodes: int, spec: dict, model_dir: str) -> dict:
    """The sweep on a fresh cluster of `nodes` nodes, into a fresh home; its timings."""
    from engramflow.flows.sweep import parse_spec, sweep_flow
    from engramflow.ledger import default_store
    from engramflow.localcluster import local_cluster
    from engramflow.runtime import pipeline_runtime, task_runner
    from engramflow.storage.queries import sweep_cells

    home = tempfile.mkdtemp(prefix="sweep-bench-")
    os.environ["ENGRAMFLOW_HOME"] = home  # the cluster's workers get it from the job's environment
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    sweep = parse_spec(spec, resolve_model=lambda _: model_dir)
    before = machine_load()
    with local_cluster(nodes=nodes, cpus_per_node=1, env=env) as cluster:
        with pipeline_runtime(ray_address=cluster.address):
            start = time.time()
            results = sweep_flow.with_options(task_runner=task_runner())(sweep)
            wall = time.time() - start
    rows = sweep_cells(default_store(), sweep.name)
    failed = [r for r in results if r["status"] != "completed"]
    if failed:
        raise SystemExit(f"{len(failed)} cell(s) failed: {failed[0]['error']}")
    submitted = {r["cell"]: r["submitted_at"].timestamp() for r in results}
    started = {r["cell"]: r["started_at"].timestamp() for r in rows}
    finished = {r["cell"]: r["finished_at"].timestamp() for r in rows}
    # Start-up: from the moment a cell could run (submitted, and its node's one CPU free) to its first
    # line of work; the time it queued behind another cell is not start-up.
    startup = []
    for node in {r["node_id"] for r in rows}:
        free = 0.0
        for cell in sorted((r["cell"] for r in rows if r["node_id"] == node), key=started.get):
            startup.append(started[cell] - max(submitted[cell], free))
            free = finished[cell]
    return {
        "nodes": nodes, "wall": wall, "cells": len(results),
        "shared": min(submitted.values()) - start,
        "fanout": max(finished.values()) - min(submitted.values()),
        "startup": startup,
        "work": [finished[c] - started[c] for c in started],
        "hosts": len({r["node_id"] for r in rows}),
        "before": before, "after": machine_load(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="organism-tiny")
    parser.add_argument("--dataset", default="world-tiny")
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="target optimisation steps (v_num_grad_steps)")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from engramflow import home
    from engramflow.models import resolve_model

    home.quiet_env()
    model_dir = resolve_model(args.model)  # built before timing anything
    # 8 cells of equal work: two methods x four preservation weights, the same edits (their first batch's
    # targets are shared: computed once in the shared stages).
    spec = {"name": "scaling", "base": {"model": args.model, "dataset": args.dataset, "corpus": args.dataset,
                                        "n": args.n, "batch_size": args.batch_size, "n_probes": 20,
                                        "hparams": {"v_num_grad_steps": args.steps}},
            "grid": {"algorithm": ["memit", "emmet"], "hparams.mom2_update_weight": [50.0, 100.0, 250.0, 500.0]}}
    runs = [run(nodes, spec, model_dir) for nodes in (1, 2)]

    console = Console(width=150)
    table = Table(title=f"8-cell sweep, {args.model}, {args.n} edits in batches of {args.batch_size}, "
                        f"{args.steps} target steps; 1 CPU per node", title_justify="left")
    for column in ("cluster", "nodes used", "wall s", "cells/min", "shared stages s", "fan-out s",
                   "fan-out cells/min", "cell start-up s (mean)", "cell work s (mean)"):
        table.add_column(column, justify="right")
    for r in runs:
        table.add_row(f"{r['nodes']} node(s) x 1 CPU", str(r["hosts"]), f"{r['wall']:.0f}",
                      f"{60 * r['cells'] / r['wall']:.2f}", f"{r['shared']:.0f}", f"{r['fanout']:.0f}",
                      f"{60 * r['cells'] / r['fanout']:.2f}",
                      f"{statistics.mean(r['startup']):.1f}", f"{statistics.mean(r['work']):.1f}")
    console.print(table)
    one, two = runs
    console.print(f"speed-up, two nodes over one: {one['wall'] / two['wall']:.2f}x whole sweep, "
                  f"{one['fanout'] / two['fanout']:.2f}x fan-out (goal 1.8x)")
    shared, startup, work = two["shared"], statistics.mean(two["startup"]), statistics.mean(two["work"])
    console.print("ceiling on N nodes from these parts (cells of equal work, shared stages not spread): "
                  f"T(N) = {shared:.0f} s + ceil(8/N) x ({startup:.1f} + {work:.1f}) s; "
                  + ", ".join(f"N={n}: {(shared + 8 * (startup + work)) / (shared + -(-8 // n) * (startup + work)):.2f}x"
                              for n in (2, 4, 8)))
    for r in runs:
        console.print(f"{r['nodes']} node(s), machine before: {r['before']}\n  after: {r['after']}", highlight=False)


if __name__ == "__main__":
    sys.exit(main())
