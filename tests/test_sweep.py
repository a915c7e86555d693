"""Sweeps: the spec, the cell a run of `engramflow run sequential`, a failing cell recorded while the rest
go on, and a real two-node Ray cluster on this machine's loopback (`ray start --head` and `ray start
--address`): cells on both nodes with the metrics of the same runs started alone, and a sweep killed
after some cells that resumes running only the rest."""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from engramflow.flows.sweep import SpecError, load_spec, parse_spec, sweep_flow
from engramflow.ledger import default_store
from engramflow.storage import Store
from engramflow.storage.queries import sweep_cells, sweep_results

REPO = Path(__file__).resolve().parents[1]
# Few edits and short target optimisation: the tests check the machinery, not the edits' quality.
TINY = {"dataset": "world-tiny", "corpus": "world-tiny", "n": 2, "batch_size": 1, "n_probes": 20,
        "stats_tokens": 20_000, "hparams": {"v_num_grad_steps": 25}, "eval": ["counterfact", "probe", "norms"]}


def _spec(tmp_path: Path, spec: dict) -> Path:
    return _write(tmp_path / f"{spec['name']}.yaml", spec)


def _metrics(store: Store, run_id: str) -> dict[tuple, float | None]:
    """A run's metric values, the newest row per measured value."""
    rows = store.sql(f"""SELECT step, request_id, protocol, metric, value FROM metrics WHERE run_id = '{run_id}'
        QUALIFY row_number() OVER (PARTITION BY step, model_version, request_id, protocol, metric
                                   ORDER BY recorded_at DESC) = 1""").to_pylist()
    return {(r["step"], r["request_id"], r["protocol"], r["metric"]): r["value"] for r in rows}


# --- the spec --------------------------------------------------------------------------------------
def test_a_cell_is_the_run_engramflow_run_sequential_starts(tiny_organism):
    """Same options, same RunConfig, same run id: the CLI's defaults are the spec's."""
    from engramflow.cli.run import _options

    defaults = {name: p.default.default for name, p in inspect.signature(_options).parameters.items()}
    cli_cfg, _, _ = _options(**{**defaults, "algorithm": "emmet", "model": str(tiny_organism)})
    (cell,) = parse_spec({"name": "one", "base": {"model": str(tiny_organism)}, "grid": {"algorithm": ["emmet"]}}).cells
    assert cell.config == cli_cfg and cell.run_id == cli_cfg.run_id("sequential")

    options = {"n": 12, "batch_size": 4, "layers": "0,1", "hparams": json.dumps({"mom2_update_weight": 100.0}),
               "dataset": "world-tiny", "corpus": "world-tiny", "n_probes": 7, "seed": 3, "eval": "counterfact,probe"}
    cli_cfg, _, _ = _options(**{**defaults, **options, "algorithm": "memit", "model": str(tiny_organism)})
    spec = {"name": "two", "base": {"model": str(tiny_organism), "dataset": "world-tiny", "corpus": "world-tiny",
                                    "n": 12, "n_probes": 7, "seed": 3, "eval": ["counterfact", "probe"]},
            "grid": {"algorithm": ["memit"], "batch_size": [4], "layers": [[0, 1]],
                     "hparams.mom2_update_weight": [100.0]}}
    (cell,) = parse_spec(spec).cells
    assert cell.run_id == cli_cfg.run_id("sequential")


def test_the_grid_is_the_product_of_its_axes_in_the_spec_order(tmp_path):
    spec = {"name": "grid", "description": "x", "base": {"model": "m", "n": 10, "hparams": {"v_lr": 1.0}},
            "grid": {"algorithm": ["memit", "emmet"], "hparams.mom2_update_weight": [1.0, 10.0, 100.0]},
            "resources": {"num_cpus": 2, "memory": "1.5GiB"}, "max_parallel": 3}
    sweep = load_spec(_spec(tmp_path, spec))
    assert [c.axes for c in sweep.cells[:4]] == [
        {"algorithm": "memit", "hparams.mom2_update_weight": 1.0},
        {"algorithm": "memit", "hparams.mom2_update_weight": 10.0},
        {"algorithm": "memit", "hparams.mom2_update_weight": 100.0},
        {"algorithm": "emmet", "hparams.mom2_update_weight": 1.0}]
    assert len(sweep.cells) == 6 and len({c.run_id for c in sweep.cells}) == 6
    assert sweep.cells[4].config.hparams == {"v_lr": 1.0, "mom2_update_weight": 10.0}
    assert sweep.cells[0].config.batch_size == 10  # as the CLI: all n at once unless a batch size is given
    assert sweep.resources.for_cell(sweep.cells[0].config) == {"num_cpus": 2, "num_gpus": 0,
                                                               "memory": int(1.5 * 2**30)}
    assert sweep.max_parallel == 3


@pytest.mark.parametrize("spec, message", [
    ({"base": {}, "grid": {"algorithm": ["memit"]}}, "name"),
    ({"name": "x", "grid": {"algoritm": ["memit"]}}, "grid.algoritm: unknown run option"),
    ({"name": "x", "grid": {"algorithm": "memit"}}, "grid.algorithm: a non-empty list"),
    ({"name": "x", "grid": {"algorithm": ["memit", "nope"]}}, "cell 1 (algorithm=nope): algorithm: unknown method"),
    ({"name": "x", "base": {"n": 0}, "grid": {"algorithm": ["memit"]}}, "n must be an integer >= 1"),
    ({"name": "x", "grid": {"algorithm": ["memit"], "layers": ["0", "first"]}}, "cell 1 (algorithm=memit, layers=first)"),
    ({"name": "x", "grid": {"algorithm": ["memit"], "n": [5, 5]}}, "cells 0 and 1 are the same run"),
    ({"name": "x", "grid": {"algorithm": ["memit"]}, "resources": {"memory": "lots"}}, "resources.memory"),
    ({"name": "x", "grid": {"algorithm": ["memit"]}, "sweep": 1}, "sweep: unknown key"),
])
def test_a_bad_spec_is_refused_naming_the_field(tmp_path, spec, message):
    path = _write(tmp_path / "bad.yaml", spec)
    with pytest.raises(SpecError, match=f"^{re.escape(str(path))}: .*{re.escape(message)}"):
        load_spec(path)


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_cli_refuses_a_bad_spec_before_starting_anything(tmp_path):
    from engramflow.cli import app

    path = _write(tmp_path / "bad.yaml", {"name": "bad", "grid": {"algorithm": ["memit"], "layers": ["zero"]}})
    result = CliRunner().invoke(app, ["--home", str(tmp_path / "home"), "sweep", str(path)])
    assert result.exit_code == 1
    assert "layers is 'preset', 'auto'" in result.output
    assert not (tmp_path / "home" / "state").exists()  # refused before the Prefect API or Ray started


# --- a sweep in this process, on the session's local Ray -------------------------------------------
def test_a_failing_cell_is_recorded_and_the_rest_go_on(ray_runtime, tiny_organism, tmp_path):
    """Three cells: one completes, one fails when its edit is solved (a negative preservation weight:
    not positive definite), one fails in the shared statistics (a layer the model does not have). Run
    again, the completed cell is not run again and the failed ones are."""
    from engramflow.runtime import task_runner
    from engramflow.sweep_report import write_sweep_report

    spec = {"name": "failing", "base": {"model": str(tiny_organism), **TINY, "seed": 1, "algorithm": "memit"},
            "grid": {"hparams": [{}, {"mom2_update_weight": -1000.0}, {"layers": [7]}]}}
    sweep = load_spec(_spec(tmp_path, spec))
    store = default_store()
    first = sweep_flow.with_options(task_runner=task_runner())(sweep)
    assert [r["status"] for r in first] == ["completed", "failed", "failed"]
    assert "positive definite" in first[1]["error"] or "mom2_update_weight" in first[1]["error"]
    assert "7" in first[2]["error"]
    latest = {r["cell"]: r for r in sweep_cells(store, "failing")}
    assert [latest[i]["status"] for i in range(3)] == ["completed", "failed", "failed"]
    assert latest[0]["node_id"] and latest[0]["hostname"] and latest[0]["finished_at"] > latest[0]["started_at"]
    assert latest[1]["error"] == first[1]["error"]
    runs = {r["run_id"]: r["status"] for r in store.sql("SELECT run_id, status FROM runs_latest").to_pylist()}
    assert runs[sweep.cells[0].run_id] == "completed" and runs[sweep.cells[1].run_id] == "failed"

    rerun_start = datetime.now(timezone.utc)
    second = sweep_flow.with_options(task_runner=task_runner())(sweep)
    assert [(r["status"], r["reused"]) for r in second] == [("completed", True), ("failed", False), ("failed", False)]
    touched = store.sql(f"SELECT DISTINCT run_id FROM runs WHERE updated_at > '{rerun_start.isoformat()}'")
    assert set(touched.column("run_id").to_pylist()) == {sweep.cells[1].run_id}  # cell 2 never became a run
    attempts = store.sql("SELECT cell, count(DISTINCT attempt) AS n FROM sweeps WHERE sweep_id = 'failing' "
                         "GROUP BY cell ORDER BY cell").to_pylist()
    assert [a["n"] for a in attempts] == [2, 2, 2]

    # the report: every cell, the completed one ranked, its numbers those of the documented query
    report, rows = write_sweep_report(store, "failing", tmp_path / "report")
    text = report.read_text()
    assert "| 1 | 0 |" in text and "## Failed cells" in text and "positive definite" in text.replace("\n", " ")
    (done,) = [r for r in rows if r["status"] == "completed"]
    long = [r for r in sweep_results(store, "failing").to_pylist() if r["cell"] == 0]
    es = next(r for r in long if (r["protocol"], r["metric"]) == ("counterfact", "es"))
    assert done["es"] == pytest.approx(es["value"]) and done["es_unedited"] == pytest.approx(es["unedited"])
    assert done["edits"] == 2 and done["rank"] == 1


def test_a_grid_recorded_under_a_name_is_not_replaced_by_another(ray_runtime, tiny_organism, tmp_path):
    from engramflow.runtime import task_runner

    base = {"model": str(tiny_organism), **TINY, "seed": 2}
    store = default_store()
    one = parse_spec({"name": "named", "base": base, "grid": {"algorithm": ["emmet"], "layers": ["9"]}})
    sweep_flow.with_options(task_runner=task_runner())(one)  # fails in the shared stages: quick
    other = parse_spec({"name": "named", "base": base, "grid": {"algorithm": ["emmet"], "layers": ["8"]}})
    with pytest.raises(SpecError, match="recorded with another grid"):
        sweep_flow.with_options(task_runner=task_runner())(other)
    assert [r["run_id"] for r in sweep_cells(store, "named")] == [one.cells[0].run_id]


# --- a real two-node cluster -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster_sweep(tiny_organism, tmp_path_factory):
    """A head and a second node (1 CPU each) on 127.0.0.1; a 4-cell sweep against it killed (SIGKILL to
    its process group) once a cell has completed, then run again to the end."""
    from engramflow.localcluster import local_cluster

    tmp = tmp_path_factory.mktemp("cluster-sweep")
    home = tmp / "home"
    spec = _write(tmp / "cluster.yaml", {
        "name": "cluster", "base": {"model": "organism-tiny", **TINY},
        "grid": {"algorithm": ["memit", "emmet"], "layers": ["0", "0,1"]}, "max_parallel": 2})
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS")}
    env.update(ENGRAMFLOW_HOME=str(home), PYTHONPATH=str(REPO))
    with local_cluster(nodes=2, cpus_per_node=1, env=env) as cluster:
        cmd = [sys.executable, "-m", "engramflow", "sweep", str(spec), "--ray-address", cluster.address]
        store = Store(str(home / "store"))
        log = (tmp / "first.log").open("w")
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.5)
                if store.parts("sweeps") and "completed" in store.read("sweeps").column("status").to_pylist():
                    break
            assert proc.poll() is None, "the sweep ended before it could be killed:\n" + (tmp / "first.log").read_text()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
        time.sleep(3)  # Ray ends the dead driver's workers
        sweep = load_spec(spec, resolve_model=lambda _: str(tiny_organism))
        runs = {r["run_id"]: r["status"] for r in store.sql("SELECT run_id, status FROM runs_latest").to_pylist()}
        done_before = {c.index for c in sweep.cells if runs.get(c.run_id) == "completed"}
        rerun_start = datetime.now(timezone.utc)
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, start_new_session=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    return {"store": store, "sweep": sweep, "done_before": done_before, "rerun_start": rerun_start,
            "output": again.stdout}


def test_a_sweep_on_two_nodes_runs_cells_on_both_with_the_metrics_of_runs_alone(cluster_sweep, ray_runtime):
    from engramflow.flows.sequential import sequential_flow
    from engramflow.runtime import task_runner

    store, sweep = cluster_sweep["store"], cluster_sweep["sweep"]
    latest = sweep_cells(store, "cluster")
    assert [r["status"] for r in latest] == ["completed"] * 4
    assert len({r["node_id"] for r in latest}) == 2 and all(r["hostname"] for r in latest)
    alone = default_store()  # this session's own home: the same runs, started one by one on a local Ray
    for cell in sweep.cells:
        assert sequential_flow.with_options(task_runner=task_runner())(cell.config) == cell.run_id
        ours, theirs = _metrics(store, cell.run_id), _metrics(alone, cell.run_id)
        assert set(ours) == set(theirs) and len(ours) > 50
        for key, value in ours.items():
            assert value == pytest.approx(theirs[key], abs=1e-5, nan_ok=True), (cell.axes, key)


def test_a_killed_sweep_resumes_running_only_the_rest(cluster_sweep):
    store, sweep, done_before = cluster_sweep["store"], cluster_sweep["sweep"], cluster_sweep["done_before"]
    assert 0 < len(done_before) < 4
    rows = store.sql("SELECT * FROM sweeps WHERE sweep_id = 'cluster' ORDER BY updated_at").to_pylist()
    last_attempt = rows[-1]["attempt"]
    reused = {r["cell"] for r in rows if r["attempt"] == last_attempt and r["reused"]}
    ran = {r["cell"] for r in rows if r["attempt"] == last_attempt and r["status"] == "running"}
    assert reused == done_before and ran == {0, 1, 2, 3} - done_before
    start = cluster_sweep["rerun_start"].isoformat()
    touched = set(store.sql(f"SELECT DISTINCT run_id FROM runs WHERE updated_at > '{start}'").column("run_id").to_pylist())
    assert touched == {c.run_id for c in sweep.cells if c.index not in done_before}
    for cell in sweep.cells:  # every edit applied once, none lost; every version evaluated once
        edits, distinct = store.connect().execute(
            f"SELECT count(*), count(DISTINCT request_id) FROM edits WHERE run_id = '{cell.run_id}'").fetchone()
        assert edits == distinct == 2
    assert "(before)" in cluster_sweep["output"]  # the CLI marks the cells it did not run again
