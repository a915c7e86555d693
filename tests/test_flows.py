"""End-to-end flows on the tiny organism through Prefect + Ray, queried with DuckDB, and the
resume-after-SIGKILL ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from engramflow.flows.config import RunConfig
from engramflow.flows.edit import edit_flow
from engramflow.flows.experts import experts_flow
from engramflow.flows.sequential import sequential_flow
from engramflow.ledger import committed_batches, default_store
from engramflow.storage import Store
from engramflow.storage.queries import degradation, drift, history

TINY = dict(dataset="world-tiny", format="world", corpus="world-tiny", stats_tokens=20_000, n_probes=30)


def _run(flow, cfg: RunConfig) -> str:
    from engramflow.runtime import task_runner

    return flow.with_options(task_runner=task_runner())(cfg)


@pytest.fixture(scope="module")
def sequential_run(ray_runtime, tiny_organism) -> tuple[Store, str, RunConfig]:
    # two target shards: each batch's targets are optimised by two parallel tasks, then read by the edit
    cfg = RunConfig(algorithm="memit", model=str(tiny_organism), n=12, batch_size=4, shards=2, **TINY)
    return default_store(), _run(sequential_flow, cfg), cfg


def test_sequential_flow_records_every_batch_once(sequential_run):
    store, run_id, cfg = sequential_run
    assert sorted(committed_batches(store, run_id)) == [0, 1, 2]
    con = store.connect()
    n_edits, n_distinct = con.execute(
        f"select count(*), count(distinct request_id) from edits where run_id = '{run_id}'").fetchone()
    assert n_edits == n_distinct == cfg.n
    # the versions form a chain: each batch's version_before is the previous batch's version_after
    chain = con.execute(f"select distinct batch_index, version_before, version_after from edits "
                    f"where run_id = '{run_id}' order by batch_index").fetchall()
    for (_, _, after), (_, before, _) in zip(chain, chain[1:], strict=False):
        assert before == after
    status, params = con.execute(f"select status, params from runs_latest where run_id = '{run_id}'").fetchone()
    assert status == "completed"
    settings = json.loads(params)["settings"]  # the method's resolved settings, recorded with the run
    assert (settings["preset"], settings["layers"], settings["layers_from"]) == ("memit-organism", [0], "preset")


def test_sequential_flow_edits_take_and_retention_is_measured(sequential_run):
    store, run_id, _ = sequential_run
    rows = degradation(store, run_id).to_pylist()
    steps = sorted({r["step"] for r in rows})
    assert steps == [-1, 0, 1, 2]
    es = {r["step"]: r for r in rows if r["metric"] == "es"}
    # the unedited model is scored on all requests; after every batch, all edits so far (retention)
    assert [es[s]["n"] for s in steps] == [12, 4, 8, 12]
    # the edits took: 0.0 before, 0.67 after 12 MEMIT edits on the tiny organism (measured)
    assert es[-1]["value"] <= 0.25 and es[2]["value"] >= 0.5
    probe = {r["step"]: r["value"] for r in drift(store, run_id).to_pylist() if r["metric"] == "probe_top1"}
    assert set(probe) == {-1, 0, 1, 2}  # -1 = the unedited model


def test_history_finds_an_edited_subject(sequential_run):
    store, run_id, _ = sequential_run
    subject = store.connect().execute(
        f"select r.subject from edits e join requests r using (request_id) where e.run_id = '{run_id}' limit 1"
    ).fetchone()[0]
    rows = history(store, subject).to_pylist()
    assert any(r["run_id"] == run_id and r["es_latest"] is not None for r in rows)


def test_a_run_whose_preset_changed_since_its_batches_is_refused_not_mixed(ray_runtime, tiny_organism):
    """A run's id is a hash of its options, so after a preset changes the same options name the old run:
    going on would stack batches edited with new settings on batches edited with the old. Refused,
    naming the setting, with nothing of the run changed; its recorded settings stay the old ones."""
    from engramflow.flows.batches import SettingsChanged
    from engramflow.ledger import record_run

    store = default_store()
    cfg = RunConfig(algorithm="memit", model=str(tiny_organism), n=4, batch_size=2, seed=3, **TINY)
    run_id = _run(sequential_flow, cfg)
    params = json.loads(store.sql(f"select params from runs_latest where run_id = '{run_id}'").to_pylist()[0]["params"])
    # the run as an earlier preset would have recorded it: another learning rate for the targets
    older = {**params, "settings": {**params["settings"], "v_lr": params["settings"]["v_lr"] * 2}}
    record_run(store, run_id, "sequential", cfg.algorithm, cfg.model, cfg.dataset, older, "completed")
    versions = store.sql("select count(*) as n from model_versions").to_pylist()[0]["n"]
    with pytest.raises(SettingsChanged, match=r"v_lr .* -> .*--run-id"):
        _run(sequential_flow, cfg)
    assert store.sql("select count(*) as n from model_versions").to_pylist()[0]["n"] == versions
    rows = store.sql(f"select status, params from runs_latest where run_id = '{run_id}'").to_pylist()
    assert rows[0]["status"] == "failed" and "settings" not in json.loads(rows[0]["params"])
    with pytest.raises(SettingsChanged):  # and again: the refusal did not record the new settings
        _run(sequential_flow, cfg)
    # under another id the same options run with today's settings
    from engramflow.runtime import task_runner

    again = sequential_flow.with_options(task_runner=task_runner())(cfg, run_id + "-again")
    assert sorted(committed_batches(store, again)) == [0, 1]


def test_edit_flow_single_batch_with_located_layer(ray_runtime, tiny_organism):
    store = default_store()
    cfg = RunConfig(algorithm="rome", model=str(tiny_organism), n=1, layers="auto", **TINY)
    run_id = _run(edit_flow, cfg)
    assert list(committed_batches(store, run_id)) == [0]
    layers = store.connect().execute(f"select layers from edits where run_id = '{run_id}'").fetchone()[0]
    traced = store.connect().execute("select count(*) from traces").fetchone()[0]
    assert traced > 0 and len(layers) == 1
    params = store.connect().execute(f"select params from runs_latest where run_id = '{run_id}'").fetchone()[0]
    settings = json.loads(params)["settings"]
    assert settings["layers"] == list(layers) and settings["layers_from"] == "causal tracing (--layers auto)"


def _ledger(store: Store, run_id: str) -> tuple[int, int, int]:
    con = store.connect()
    edits, distinct = con.execute(f"select count(*), count(distinct edit_id) from edits where run_id = '{run_id}'").fetchone()
    per_version = con.execute(f"select max(c) from (select model_version, count(distinct recorded_at) c from metrics "
                          f"where run_id = '{run_id}' group by 1)").fetchone()[0]
    return edits, distinct, per_version


def test_resume_after_sigkill_applies_no_edit_twice_and_loses_none(tiny_organism, tmp_path):
    """Kill the whole process group of a running `engramflow run sequential` once its first batch
    is committed, run the same command again, and check the ledger."""
    home = tmp_path / "home"
    env = {**os.environ, "ENGRAMFLOW_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)  # the subprocess starts its own runtime
    cmd = [sys.executable, "-m", "engramflow", "run", "sequential", "-a", "memit", "--n", "12",
           "--batch-size", "3", "--model", "organism-tiny", "--dataset", "world-tiny", "--corpus", "world-tiny",
           "--n-probes", "20"]
    store = Store(str(home / "store"))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        run_ids: set[str] = set()
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if store.parts("model_versions"):
                run_ids = {r for r in store.read("model_versions").column("run_id").to_pylist() if r}
                if run_ids and committed_batches(store, next(iter(run_ids))):
                    break
        assert proc.poll() is None, "the run finished before it could be killed:\n" + proc.stdout.read().decode()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (run_id,) = run_ids
    done_before = committed_batches(store, run_id)
    assert 0 < len(done_before) < 4

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, start_new_session=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    done_after = committed_batches(store, run_id)
    assert sorted(done_after) == [0, 1, 2, 3]
    assert all(done_after[i] == v for i, v in done_before.items())  # committed versions kept as they were
    edits, distinct, evaluations_per_version = _ledger(store, run_id)
    assert edits == distinct == 12  # no edit applied twice, none lost
    assert evaluations_per_version == 1  # metrics continued, never doubled
    versions = store.read("model_versions").to_pylist()
    assert len([v for v in versions if v["run_id"] == run_id]) == 4


def test_infeasible_gpu_request_fails_fast(ray_runtime, tiny_organism):
    """On a GPU-less Ray, a run asking for CUDA fails with a clear error instead of hanging."""
    with pytest.raises(Exception, match="(?i)gpu|unschedulable|infeasible"):
        _run(sequential_flow, RunConfig(algorithm="memit", model=str(tiny_organism), n=2, batch_size=2, device="cuda",
                                           **TINY))



def test_experts_flow_trains_scen_batch_after_batch(ray_runtime, tiny_organism):
    """SCEN through the pipeline: parallel expert tasks, indexing, one bank per version; the second
    batch keeps the first batch's experts bit for bit; routing is recorded beside the usual metrics."""
    import torch

    from engramflow.ledger import get_version, load_artifact

    store = default_store()
    cfg = RunConfig(algorithm="scen", model=str(tiny_organism), n=6, batch_size=3, **TINY)
    run_id = _run(experts_flow, cfg)
    versions = committed_batches(store, run_id)
    assert sorted(versions) == [0, 1]
    first = load_artifact(store, get_version(store, versions[0]).state_key)
    second = load_artifact(store, get_version(store, versions[1]).state_key)
    assert len(first) == 3 and len(second) == 6 and second.ids[:3] == first.ids
    assert torch.equal(second.a[:3], first.a) and torch.equal(second.b[:3], first.b)
    con = store.connect()
    n_experts = con.execute(f"select count(distinct request_id) from experts where run_id = '{run_id}'").fetchone()[0]
    assert n_experts == 6
    routing = con.execute(f"select avg(value) from metrics where run_id = '{run_id}' and protocol = 'scen' "
                          "and metric = 'routing' and step = 1").fetchone()[0]
    es = con.execute(f"select avg(value) from metrics where run_id = '{run_id}' and metric = 'es' "
                     "and step = 1").fetchone()[0]
    assert routing >= 0.8 and es >= 0.8
    # reverting one fact removes exactly its expert: its prompt falls back to the base weights
    from engramflow.editors.scen import route
    from engramflow.ledger import fetch_requests, materialize, revert_edit

    edit = con.execute(f"select edit_id, request_id from edits where run_id = '{run_id}' and batch_index = 0 "
                       "limit 1").fetchone()
    reverted = revert_edit(store, edit[0])
    model, tok = materialize(store, reverted.version)
    requests = fetch_requests(store, second.ids)
    routes = route(model, tok, [r.prompt for r in requests])
    assert routes[second.ids.index(edit[1])] is None
    assert len(load_artifact(store, reverted.version.state_key)) == 5
