"""Scheduled continual editing on the tiny organism: the inbox, corrections, the quality gate and its
bisection, aliases and rollback, export for serving, a tick killed mid-edit, and a deployment served
against a real `prefect server start` that fires on its own."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engramflow.aliases import (
    AliasBusy,
    alias_history,
    alias_lock,
    current_alias,
    live_edits,
    rollback,
    set_alias,
)
from engramflow.data.world import tiny_world
from engramflow.ledger import default_store, ensure_base_version, get_version, record_derived_version
from engramflow.storage import Store
from engramflow.tasks.gate import load_gate

REPO = Path(__file__).resolve().parents[1]


# --- drops ------------------------------------------------------------------------------------------
def world_facts() -> list[dict]:
    """The tiny world's facts as user records, one per subject."""
    out, seen = [], set()
    for record in tiny_world().user_records():
        if record["subject"] not in seen:
            seen.add(record["subject"])
            out.append(record)
    return out


def undoing(record: dict, k: int = 1) -> list[dict]:
    """Requests built to do harm: each restores, through another prompt of the fact's relation, the true
    object of an edited fact (so that edit no longer holds)."""
    templates = [t for t in tiny_world().relations[record["relation"]].templates
                 if t.format(record["subject"]) not in (record["prompt"], *record["paraphrase_prompts"])]
    return [{"subject": record["subject"], "prompt": t.format(record["subject"]), "target_new": record["target_true"],
             "target_true": record["target_new"]} for t in templates[:k]]


def land(inbox: Path, name: str, records: list[dict]) -> Path:
    """Drop a JSONL file into the inbox the way a drop should land: written hidden, then renamed."""
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{name}"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, inbox / name)
    return inbox / name


def gate_file(path: Path) -> Path:
    path.write_text("n_probes: 30\n")
    return path


def top1(model, tok, prompt: str) -> str:
    import torch

    with torch.no_grad():
        ids = tok(prompt, return_tensors="pt").input_ids
        return tok.decode([int(model(ids).logits[0, -1].argmax())]).strip()


# --- fast units -------------------------------------------------------------------------------------
def test_gate_thresholds_have_documented_defaults_and_named_overrides(tmp_path):
    defaults = load_gate()
    assert (defaults.min_es, defaults.min_ps, defaults.max_retention_drop, defaults.max_probe_drop,
            defaults.max_perplexity_rise) == (0.8, 0.6, 0.05, 0.05, 0.1)
    (tmp_path / "g.yaml").write_text("min_es: 0.9\nmax_probe_drop: 0.02\n")
    custom = load_gate(tmp_path / "g.yaml")
    assert custom.min_es == 0.9 and custom.max_probe_drop == 0.02 and custom.min_ps == defaults.min_ps
    (tmp_path / "bad.yaml").write_text("min_ES: 0.9\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*min_ES"):
        load_gate(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="max_retention_drop"):
        load_gate({"max_retention_drop": -1})


def test_rollback_returns_to_the_previous_good_version_and_deletes_nothing(tmp_path):
    store = Store(tmp_path / "store")
    base = ensure_base_version(store, str(tmp_path / "model"))
    v1 = record_derived_version(store, "v1", base, (), None, None)
    v2 = record_derived_version(store, "v2", v1, (), None, None)
    set_alias(store, "prod", base.version_id, "create", "test")
    set_alias(store, "prod", v1.version_id, "promote", "test")
    set_alias(store, "prod", v2.version_id, "promote", "test")
    assert rollback(store, "prod")["version"] == "v1"
    assert rollback(store, "prod")["version"] == base.version_id  # not back to v2, which was rolled back
    with pytest.raises(ValueError, match="no earlier version"):
        rollback(store, "prod")
    assert [r["action"] for r in alias_history(store, "prod")] == ["create", "promote", "promote", "rollback",
                                                                    "rollback"]
    with pytest.raises(KeyError, match="nope"):
        set_alias(store, "prod", "nope", "set", "test")
    with pytest.raises(ValueError, match="alias"):
        set_alias(store, "no spaces", v1.version_id, "set", "test")


def test_batches_never_ask_one_key_for_two_values_and_corrections_come_first():
    from engramflow.editors.requests import as_requests
    from engramflow.flows.continual import drop_format, plan_batches

    facts = world_facts()
    same_subject = [r for r in tiny_world().user_records() if r["subject"] == facts[0]["subject"]]
    requests = as_requests([*same_subject, facts[1], facts[2], facts[3]])
    correction = requests[-1].request_id
    batches = plan_batches(requests, 2, {correction})
    assert batches[0][0] == correction
    by_id = {r.request_id: r for r in requests}
    for batch in batches:
        subjects = [by_id[r].subject for r in batch]
        assert len(subjects) == len(set(subjects)) and len(batch) <= 2
    assert sorted(r for b in batches for r in b) == sorted(by_id)
    assert [drop_format(n) for n in ("a.jsonl", "a.csv.gz", "b.parquet", "c.zsre.json", "d.json")] == [
        "jsonl", "csv", "parquet", "zsre", None]


# --- ticks in this process (session Prefect API and Ray) -----------------------------------------
def _tick(cfg):
    from engramflow.flows.continual import continual_flow
    from engramflow.runtime import task_runner

    return continual_flow.with_options(task_runner=task_runner())(cfg)


def _config(tmp_path, tiny_organism, alias, **kw):
    from engramflow.flows.continual import ContinualConfig

    return ContinualConfig(inbox=str(tmp_path / "inbox"), model=str(tiny_organism), alias=alias,
                           gate=str(gate_file(tmp_path / "gate.yaml")), **kw)


def test_a_second_tick_of_an_alias_skips_while_one_runs_and_says_so(ray_runtime, tiny_organism, tmp_path):
    store = default_store()
    land(tmp_path / "inbox", "d1.jsonl", world_facts()[:2])
    with alias_lock(store, "busy", "tick held-by-test"):
        with pytest.raises(AliasBusy, match="held-by-test"):
            with alias_lock(store, "busy", "tick other", wait=0.5):
                pass
        result = _tick(_config(tmp_path, tiny_organism, "busy"))
    assert result.status == "skipped" and "held-by-test" in result.message and result.exit_code == 0
    row = store.sql(f"select status, detail from ticks where tick_id = '{result.tick_id}'").to_pylist()
    assert row == [{"status": "skipped", "detail": result.message}]
    assert current_alias(store, "busy") is None  # it did nothing, took nothing
    assert store.sql("select count(*) n from drops where alias = 'busy'").to_pylist() == [{"n": 0}]


def test_a_correction_replaces_the_live_edit_and_the_export_serves_it(ray_runtime, tiny_organism, tmp_path):
    """MEMIT: a corrected fact's delta goes whole and the rest of its batch is edited again with the
    correction; an older request of the same drop for one subject and prompt is superseded; a request
    already live is not applied twice. The export loads with plain transformers and answers the
    correction; its manifest lists exactly the edits behind the version."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engramflow.export import export_version

    store = default_store()
    facts = world_facts()
    inbox = tmp_path / "inbox"
    cfg = _config(tmp_path, tiny_organism, "corr")
    land(inbox, "d1.jsonl", facts[:4])
    first = _tick(cfg)
    assert (first.promoted, first.quarantined, first.exit_code) == (4, 0, 0)
    before = get_version(store, current_alias(store, "corr")["version"])
    old = {e.request_id for e in live_edits(store, before)}

    objects = [o for o in tiny_world().objects(facts[0]["relation"])
               if o not in (facts[0]["target_new"], facts[0]["target_true"])]
    correction = {**facts[0], "target_new": objects[0], "target_true": facts[0]["target_new"]}
    stale = {**facts[5], "target_new": next(o for o in tiny_world().objects(facts[5]["relation"])
                                            if o not in (facts[5]["target_new"], facts[5]["target_true"]))}
    land(inbox, "d2.jsonl", [stale, correction, facts[5], facts[1]])
    second = _tick(cfg)
    assert (second.promoted, second.superseded, second.already_live, second.quarantined) == (2, 1, 1, 0)
    after = get_version(store, current_alias(store, "corr")["version"])
    outcomes = {r["request_id"]: r for r in store.sql(
        f"select * from drop_requests where tick_id = '{second.tick_id}'").to_pylist()}
    (corrected_id,) = [r for r, o in outcomes.items() if o["supersedes"]]
    (replaced,) = outcomes[corrected_id]["supersedes"]
    assert replaced in old and outcomes[corrected_id]["outcome"] == "promoted"
    assert sorted(o["outcome"] for o in outcomes.values()) == ["already_live", "promoted", "promoted", "superseded"]
    live = [e.request_id for e in live_edits(store, after)]
    assert len(live) == len(set(live)) == 5  # 3 kept + the correction + the new fact: nothing stacked twice
    assert replaced not in live and corrected_id in live and (old - {replaced}) <= set(live)
    assert before.delta_keys[0] not in after.delta_keys  # the corrected batch's delta went whole

    out = export_version(store, "corr", tmp_path / "export")
    manifest = json.loads((out / "edits.json").read_text())
    assert sorted(e["request_id"] for e in manifest["edits"]) == sorted(live)
    assert manifest["version"] == after.version_id and manifest["base_model"] == str(tiny_organism)
    assert "state" not in manifest and all(e["metrics_at_export"]["es"] is not None for e in manifest["edits"])
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert top1(model, tok, correction["prompt"]) == correction["target_new"]


def test_scen_corrects_one_fact_exactly_and_exports_its_bank(ray_runtime, tiny_organism, tmp_path):
    """SCEN: a correction takes exactly the old expert out of the bank; the export saves the bank beside
    the unedited weights and `engramflow.load_edited` serves it."""
    from transformers import AutoModelForCausalLM

    import engramflow
    from engramflow.export import export_version

    store = default_store()
    facts = world_facts()
    cfg = _config(tmp_path, tiny_organism, "scen", algorithm="scen", batch_size=3)
    land(tmp_path / "inbox", "d1.jsonl", facts[:3])
    assert _tick(cfg).promoted == 3
    before = get_version(store, current_alias(store, "scen")["version"])
    objects = [o for o in tiny_world().objects(facts[0]["relation"])
               if o not in (facts[0]["target_new"], facts[0]["target_true"])]
    correction = {**facts[0], "target_new": objects[0], "target_true": facts[0]["target_new"]}
    land(tmp_path / "inbox", "d2.jsonl", [correction])
    assert _tick(cfg).promoted == 1
    after = get_version(store, current_alias(store, "scen")["version"])
    old, new = [e.request_id for e in live_edits(store, before)], [e.request_id for e in live_edits(store, after)]
    assert len(new) == 3 and new[:2] == old[1:] and old[0] not in new
    assert after.delta_keys == () and after.state_key != before.state_key

    out = export_version(store, "scen", tmp_path / "export")
    manifest = json.loads((out / "edits.json").read_text())
    assert manifest["loader"].startswith("engramflow.load_edited") and manifest["state"]["method"] == "scen"
    assert sorted(e["request_id"] for e in manifest["edits"]) == sorted(new)
    model, tok = engramflow.load_edited(out)
    assert top1(model, tok, correction["prompt"]) == correction["target_new"]
    plain = AutoModelForCausalLM.from_pretrained(out)  # the weights alone: SCEN's edits are in the bank
    assert top1(plain, tok, correction["prompt"]) == facts[0]["target_true"]


# --- subprocesses: a killed tick, a served deployment ------------------------------------------------
# A subprocess starts its own Prefect API and Ray in its own home (a second Ray in this session's home
# would share its temp dir). Statistics over fewer keys keep its cold start short.
SMALL_STATS = ["--hparams", '{"mom2_n_tokens": 20000}']


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "ENGRAMFLOW_HOME": str(home), "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
    for key in ("PREFECT_API_URL", "PREFECT_HOME", "RAY_ADDRESS", "RAY_TMPDIR"):
        env.pop(key, None)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "engramflow", *args]


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _stop(proc: subprocess.Popen, sig: int, timeout: float) -> None:
    """Ask a process group to stop with `sig`; SIGKILL it if it has not after `timeout` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)


def _alias_rows(store: Store, table: str, alias: str, columns: str = "*") -> list[dict]:
    return store.sql(f"select {columns} from {table} where alias = '{alias}' order by recorded_at").to_pylist()


def _alias_edits(store: Store, alias: str) -> list[dict]:
    """`edits` rows of the runs that edited for `alias`."""
    return store.sql(f"select * from edits where run_id in (select run_id from drop_requests "
                     f"where alias = '{alias}')").to_pylist()


def test_a_tick_killed_mid_edit_is_resumed_with_every_request_applied_once(tiny_organism, tmp_path):
    """SIGKILL the whole process group of `engramflow continual tick` once the first of three batches is
    built, tick again, and check the ledger; then the export serves the edits with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engramflow.export import export_version

    inbox = tmp_path / "inbox"
    env = _env(tmp_path / "home")
    land(inbox, "night1.jsonl", world_facts()[10:16])
    cmd = _cli("continual", "tick", "--inbox", str(inbox), "--model", str(tiny_organism), "--alias", "nightly",
               "--batch-size", "2", "--gate", str(gate_file(tmp_path / "gate.yaml")), *SMALL_STATS)
    store = Store(tmp_path / "home" / "store")
    log = tmp_path / "killed.log"
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def first_batch_built() -> bool:
        return bool(store.parts("drops")) and bool(store.sql(
            "select count(*) n from model_versions where version_id like 'cand-%'").to_pylist()[0]["n"])

    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None and not first_batch_built():
            time.sleep(0.2)
        assert proc.poll() is None, "the tick finished before it could be killed:\n" + log.read_text()[-4000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        _kill(proc)
    assert [d["status"] for d in _alias_rows(store, "drops", "nightly")] == ["taken"]
    assert current_alias(store, "nightly")["action"] == "create"  # nothing promoted yet

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, start_new_session=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    drops = _alias_rows(store, "drops", "nightly")
    assert [d["status"] for d in drops] == ["taken", "promoted"]  # taken once, finished by the second tick
    assert drops[0]["tick_id"] != drops[1]["tick_id"]
    edits = _alias_edits(store, "nightly")
    assert len(edits) == len({e["request_id"] for e in edits}) == 6  # every request applied exactly once
    alias = current_alias(store, "nightly")
    live = [e.request_id for e in live_edits(store, get_version(store, alias["version"]))]
    assert sorted(live) == sorted(e["request_id"] for e in edits)
    ticks = store.sql("select tick_id, arg_max(status, updated_at) s from ticks where alias = 'nightly' "
                      "group by 1").to_pylist()
    assert sorted(t["s"] for t in ticks) == ["completed", "running"]  # the killed one never finished

    out = export_version(store, "nightly", tmp_path / "served")
    manifest = json.loads((out / "edits.json").read_text())
    assert sorted(e["request_id"] for e in manifest["edits"]) == sorted(live)
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    held = [e for e in manifest["edits"] if e["metrics_at_export"]["es"] == 1.0]
    assert held and top1(model, tok, held[0]["prompt"]) == held[0]["target_new"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for p, log in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: {p.args[:4]} exited {p.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _final(store: Store, alias: str, source: Path) -> dict | None:
    """The final `drops` row of the drop that came from `source`, once there is one."""
    rows = [d for d in _alias_rows(store, "drops", alias) if d["source"] == str(source) and d["status"] != "taken"]
    return rows[0] if rows else None


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on a free loopback port, its scheduler looking every 2 s."""
    import httpx

    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, start_new_session=True, stdout=log.open("w"),
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait_for(healthy, 120, "prefect server start", [(server, log)])
        yield url
    finally:
        _stop(server, signal.SIGTERM, 20)


def test_a_served_deployment_fires_on_its_own_and_quarantines_a_harmful_drop(tiny_organism, tmp_path,
                                                                            prefect_server):
    """`prefect deploy --all` accepts deployments/prefect.yaml; `engramflow continual serve --every 10s`
    fires on its own while two drops land: the first is promoted, the second (two new facts, three
    requests that undo one of the first drop's edits, one bad record) has its offenders found by
    bisection and quarantined, its good facts promoted, and the alias never carries the offenders."""
    import httpx

    inbox = tmp_path / "inbox"
    env = {**_env(tmp_path / "home"), "PREFECT_API_URL": prefect_server,
           "PREFECT_HOME": str(tmp_path / "prefect-client")}
    pool = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", "engramflow", "--type", "process"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deploy = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
                             "deployments/prefect.yaml"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    (deployed,) = httpx.post(f"{prefect_server}/deployments/filter", json={}).json()
    assert deployed["name"] == "continual-production"
    assert deployed["schedules"][0]["schedule"]["cron"] == "0 3 * * *"

    facts = world_facts()
    first, good = facts[:5], facts[5:7]
    land(inbox, "day1.jsonl", first)
    log = tmp_path / "serve.log"
    serve = subprocess.Popen(_cli("continual", "serve", "--inbox", str(inbox), "--model", str(tiny_organism),
                                  "--alias", "production", "--every", "10s", "--name", "served", "--gate",
                                  str(gate_file(tmp_path / "gate.yaml")), *SMALL_STATS),
                             env=env, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT)
    store = Store(tmp_path / "home" / "store")
    day1, day2 = inbox / "day1.jsonl", inbox / "day2.jsonl"
    try:
        _wait_for(lambda: _final(store, "production", day1), 600, "the first drop to be promoted", [(serve, log)])
        land(inbox, "day2.jsonl", [good[0], *undoing(first[0], 3), {"subject": "nobody"}, good[1]])
        _wait_for(lambda: _final(store, "production", day2), 600, "the second drop to be gated", [(serve, log)])
    finally:
        _stop(serve, signal.SIGINT, 30)

    assert _final(store, "production", day1)["status"] == "promoted"
    second = _final(store, "production", day2)
    assert (second["status"], second["n_promoted"], second["n_quarantined"], second["n_rejected"]) == (
        "partial", 2, 3, 1)
    # fired by the server's schedule, not by hand: completed ticks with their Prefect flow runs
    ticks = store.sql("select distinct tick_id, flow_run_id from ticks where status = 'completed' "
                      "and alias = 'production'").to_pylist()
    assert len(ticks) >= 2 and all(t["flow_run_id"] for t in ticks)
    runs = httpx.post(f"{prefect_server}/flow_runs/filter",
                      json={"flow_runs": {"id": {"any_": [t["flow_run_id"] for t in ticks]}}}).json()
    parents = {r["parent_task_run_id"] for r in runs}
    assert len(runs) >= 2 and None not in parents  # each tick ran inside a scheduled run of the deployment
    served = httpx.post(f"{prefect_server}/deployments/filter",
                        json={"deployments": {"name": {"any_": ["served"]}}}).json()[0]
    scheduled = httpx.post(f"{prefect_server}/flow_runs/filter",
                           json={"deployments": {"id": {"any_": [served["id"]]}}}).json()
    assert sum(1 for r in scheduled if r["auto_scheduled"] and r["state_type"] == "COMPLETED") >= 2

    outcomes = [o for o in _alias_rows(store, "drop_requests", "production") if o["drop_id"] == second["drop_id"]]
    quarantined = [o for o in outcomes if o["outcome"] == "quarantined"]
    assert len(quarantined) == 3 and all("retention" in o["reason"] for o in quarantined)
    failed = [g for g in _alias_rows(store, "gates", "production") if not g["passed"]]
    (cost,) = store.sql(f"select gate_evaluations, bisect_evaluations from ticks where status = 'completed' "
                        f"and tick_id = '{second['tick_id']}'").to_pylist()
    gated = [g for g in _alias_rows(store, "gates", "production") if g["tick_id"] == second["tick_id"]]
    assert cost["gate_evaluations"] == len(gated) and 0 < cost["bisect_evaluations"] == len(gated) - 1
    assert {o["gate_id"] for o in quarantined} <= {g["gate_id"] for g in failed}
    assert all(g["retention_drop"] > g["max_retention_drop"] for g in failed)
    history = alias_history(store, "production")
    assert [h["action"] for h in history] == ["create", "promote", "promote"]
    live = {e.request_id for e in live_edits(store, get_version(store, history[-1]["version"]))}
    assert not live & {o["request_id"] for o in quarantined}  # the alias never carried an offender
    promoted = {o["request_id"] for o in outcomes if o["outcome"] == "promoted"}
    assert len(promoted) == 2 and promoted <= live
    edited = [e["request_id"] for e in _alias_edits(store, "production")]
    assert sorted(edited) == sorted(live) and len(edited) == 7  # each promoted request applied once
    snapshot = json.loads(second["detail"])["snapshot"]
    assert store.sql(f"select field from rejects where source = '{snapshot}'").to_pylist() == [{"field": "prompt"}]

