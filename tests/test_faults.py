"""Faults a hostile but fair user provokes (issue 22), each a clear error, a repair, or a held invariant:
corrupt and missing tensors, a truncated Parquet part, markup in stored text, SQL reaching outside the
store, bad arguments, awkward ingest files, two runs writing shared rows at once, unauthenticated
services, predictable temp dirs, and a Ray worker killed mid-task."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from prefect import flow, task
from typer.testing import CliRunner

from engramflow.data.ingest import IngestError, ingest_file, load_requests
from engramflow.flows.config import RunConfig
from engramflow.ledger import (
    committed_batches,
    default_store,
    ensure_base_version,
    get_version,
    load_artifact,
    materialize,
    revert_edit,
    save_artifact,
)
from engramflow.storage import (
    CorruptTensorError,
    DamagedPartError,
    MissingTensorError,
    NonFiniteTensorError,
    Store,
)
from engramflow.storage.store import _split_safetensors

TINY = dict(dataset="world-tiny", format="world", corpus="world-tiny", n_probes=10)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


def _poison(path: str | Path, value: float = math.nan) -> None:
    """Overwrite the first float of a safetensors file's data with `value`, in place (same size)."""
    blob = Path(path).read_bytes()
    header, _ = _split_safetensors(blob)
    offset = 8 + struct.unpack("<Q", blob[:8])[0]
    name, fmt = next((k, {"F32": "<f", "F64": "<d"}[v["dtype"]]) for k, v in header.items()
                     if k != "__metadata__" and v["dtype"] in ("F32", "F64"))
    start = offset + header[name]["data_offsets"][0]
    packed = struct.pack(fmt, value)
    Path(path).write_bytes(blob[:start] + packed + blob[start + len(packed):])


def _tensor_files(store: Store) -> dict[str, Path]:
    """key -> file of every stored tensor (read from the layout, the store's own checks aside)."""
    return {p.stem: p for p in (Path(store.path) / "tensors").glob("*/*.safetensors")}


def _finite(path: Path) -> bool:
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values() if t.is_floating_point())


def _world_ids(n: int) -> list[str]:
    """`n` requests of the tiny world with distinct subjects, ingested into the session store."""
    ingest_file("world-tiny", "world")
    subjects, chosen = set(), []
    for row in load_requests("world-tiny", "world")[0]:
        if row["subject"] not in subjects:
            subjects.add(row["subject"])
            chosen.append(row["request_id"])
    return chosen[:n]


def _cli(home: Path, *args: str, monkeypatch: pytest.MonkeyPatch):
    from engramflow.cli import app

    monkeypatch.setenv("ENGRAMFLOW_HOME", str(home))  # the CLI sets it; monkeypatch restores the session's
    monkeypatch.delenv("ENGRAMFLOW_STORE", raising=False)
    return CliRunner().invoke(app, ["--home", str(home), *args])


# --- 1. corrupt tensors are never stored, never used -------------------------------------------------
def test_non_finite_tensors_are_never_stored(store: Store) -> None:
    for bad in (math.nan, math.inf):
        with pytest.raises(NonFiniteTensorError, match="'sum_kk'|sum_kk"):
            store.put_tensors({"sum_kk": torch.tensor([[1.0, bad]]), "n": torch.tensor([3])})
    assert _tensor_files(store) == {}


def test_an_edit_that_diverges_is_never_committed(tiny_organism) -> None:
    """A batch whose delta has NaN entries fails naming the layer (its tensor) and the batch; no
    version row, no tensor is written."""
    from engramflow.tasks.edit import edit_batch

    store = default_store()
    base = ensure_base_version(store, str(tiny_organism))
    before = set(_tensor_files(store))
    with pytest.raises(Exception, match=r"layer\.\d+\.") as err:
        edit_batch.fn("fault-nan-run", 0, base, _world_ids(2), "ft", {"ft_lr": float("inf")}, None)
    assert any("batch 0 of run fault-nan-run" in note for note in getattr(err.value, "__notes__", []))
    assert committed_batches(store, "fault-nan-run") == {}
    assert all(_finite(path) for key, path in _tensor_files(store).items() if key not in before)


@pytest.fixture(scope="module")
def ft_version(tiny_organism):
    """A committed one-batch FT version in the session store (FT needs no statistics: fast)."""
    from engramflow.tasks.edit import edit_batch

    store = default_store()
    base = ensure_base_version(store, str(tiny_organism))
    version = edit_batch.fn("fault-ft-run", 0, base, _world_ids(2), "ft", None, None)
    return store, version


def test_a_modified_stored_delta_is_named_not_used(ft_version, tmp_path: Path) -> None:
    store, version = ft_version
    key = version.delta_keys[-1]
    path = _tensor_files(store)[key]
    saved = path.read_bytes()
    try:
        _poison(path)
        with pytest.raises(CorruptTensorError, match=key) as err:
            materialize(store, version)
        assert str(path) in str(err.value) and "doctor" in str(err.value)
        from engramflow.doctor import checkup

        (problem,) = [p for p in checkup(store).problems if p.key == key]
        assert problem.kind == "tensor" and version.version_id in problem.versions
        assert "fault-ft-run" in problem.runs
        # the same content stored again replaces the damaged file (a later run's write repairs it)
        assert save_artifact(store, load_artifact_from(saved)) == key
        assert store.check_tensor(key) is None and _finite(path)
    finally:
        path.write_bytes(saved)


def load_artifact_from(blob: bytes):
    from safetensors.torch import load

    from engramflow.editors.artifacts import from_safetensors

    header, _ = _split_safetensors(blob)
    return from_safetensors(load(blob), header.get("__metadata__", {}))


def test_a_deleted_delta_is_named_and_revert_refuses(ft_version) -> None:
    store, version = ft_version
    key = version.delta_keys[-1]
    path = _tensor_files(store)[key]
    saved = path.read_bytes()
    edit = store.sql(f"select edit_id from edits where delta_key = '{key}' limit 1").to_pylist()[0]["edit_id"]
    try:
        path.unlink()
        with pytest.raises(MissingTensorError, match=key) as err:
            load_artifact(store, key)
        assert str(path) in str(err.value)
        with pytest.raises(MissingTensorError):
            revert_edit(store, edit)  # no new version is recorded on top of a missing artifact
        assert not [v for v in store.read("model_versions").to_pylist() if (v["note"] or "").endswith(edit)]
        from engramflow.doctor import checkup

        (problem,) = [p for p in checkup(store).problems if p.key == key]
        assert problem.kind == "missing-tensor" and problem.versions == [version.version_id]
    finally:
        path.write_bytes(saved)


def test_damaged_cache_files_are_recomputed_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from engramflow.editors.cache import RequestCache

    cache = RequestCache(tmp_path / "cache")
    cache.put("k" * 64, {"delta": torch.ones(4), "h": torch.zeros(4)})
    (path,) = (tmp_path / "cache").rglob("*.safetensors")
    _poison(path, 2.5)  # finite but not what was written
    assert cache.get("k" * 64) is None and not path.exists()
    assert "damaged cache file" in caplog.text
    cache.put("k" * 64, {"delta": torch.ones(4)})
    path.write_bytes(path.read_bytes()[:-3])  # truncated
    assert cache.get("k" * 64) is None
    with pytest.raises(ValueError, match="NaN"):
        cache.put("k" * 64, {"delta": torch.tensor([math.nan])})
    assert cache.get("k" * 64) is None


def test_corrupt_statistics_fail_the_run_then_doctor_repairs(ray_runtime, tiny_organism) -> None:
    """NaN in stored covariance statistics: the next run fails naming the tensor and is recorded as
    failed; `doctor --repair` quarantines the file; the run after that recomputes it and completes."""
    from engramflow.flows.sequential import sequential_flow
    from engramflow.runtime import task_runner

    store = default_store()
    # statistics of their own (max_tokens 12,345): other tests' statistics stay intact
    cfg = RunConfig(algorithm="memit", model=str(tiny_organism), n=2, batch_size=2, stats_tokens=12_345,
                    stats_shards=1, protocols=["counterfact"], **TINY)
    sequential_flow.with_options(task_runner=task_runner())(cfg)
    (row,) = [r for r in store.read("stats").to_pylist() if r["max_tokens"] == 12_345]
    _poison(_tensor_files(store)[row["tensor_key"]])

    again = RunConfig(**{**cfg.__dict__, "seed": 1})
    with pytest.raises(Exception, match=row["tensor_key"]):
        sequential_flow.with_options(task_runner=task_runner())(again)
    status = store.sql(f"select status, params from runs_latest where run_id = '{again.run_id('sequential')}'")
    (run,) = status.to_pylist()
    assert run["status"] == "failed" and row["tensor_key"] in json.loads(run["params"])["error"]

    from engramflow.doctor import checkup, repair

    found = checkup(store)
    (problem,) = [p for p in found.problems if p.key == row["tensor_key"]]
    assert problem.recomputed and "layer" in problem.recomputed and not problem.versions
    repair(store, found)
    assert not store.has_tensors(row["tensor_key"]) and Path(problem.quarantined_to).exists()
    sequential_flow.with_options(task_runner=task_runner())(again)
    assert store.sql(f"select status from runs_latest where run_id = '{again.run_id('sequential')}'"
                     ).to_pylist() == [{"status": "completed"}]
    rows = [r for r in store.read("stats").to_pylist() if r["stats_id"] == row["stats_id"]]
    assert len([r for r in rows if store.has_tensors(r["tensor_key"]) and _finite(_tensor_files(store)[r["tensor_key"]])]) == 1


# --- 2. one damaged Parquet part does not take down the catalogue ------------------------------------
def _metrics(run: str, step: int) -> list[dict]:
    return [{"run_id": run, "model_version": f"v{step}", "request_id": f"q{i}", "protocol": "counterfact",
             "metric": "es", "value": 1.0, "step": step} for i in range(3)]


def test_a_truncated_part_is_named_and_repaired(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    store = Store(str(home / "store"))
    store.append("runs", [{"run_id": "r1", "flow": "sequential", "algorithm": "memit", "status": "completed",
                           "started_at": datetime.now(timezone.utc)}])
    store.append("metrics", _metrics("r1", 0))
    damaged = store.append("metrics", _metrics("r1", 1))
    os.truncate(damaged, os.path.getsize(damaged) // 2)

    assert store.sql("select count(*) as n from runs").to_pylist() == [{"n": 1}]  # the rest still answers
    for read in (lambda: store.sql("select * from metrics"), lambda: store.read("metrics"),
                 lambda: store.sql("select * from runs join metrics using (run_id)")):
        with pytest.raises(DamagedPartError, match="doctor") as err:
            read()
        assert damaged in str(err.value)
    for args in (("report", "r1"), ("history", "anyone"), ("sql", "select * from metrics")):
        out = _cli(home, *args, monkeypatch=monkeypatch)
        assert out.exit_code == 1 and "Traceback" not in out.output, out.output
        assert "doctor" in out.output and Path(damaged).name in out.output.replace("\n", "")
    out = _cli(home, "doctor", monkeypatch=monkeypatch)
    assert out.exit_code == 1 and "part" in out.output
    out = _cli(home, "doctor", "--repair", monkeypatch=monkeypatch)
    assert out.exit_code == 0 and "quarantined" in out.output, out.output
    assert store.sql("select count(*) as n from metrics").to_pylist() == [{"n": 3}]
    quarantined = list((home / "store" / "quarantine").rglob("*.parquet"))
    assert [p.name for p in quarantined] == [Path(damaged).name]
    assert json.loads(next((home / "store" / "quarantine").rglob("manifest.json")).read_text())["problems"]
    assert _cli(home, "doctor", monkeypatch=monkeypatch).exit_code == 0


# --- 3. stored text is printed, never interpreted ----------------------------------------------------
def test_markup_in_stored_text_is_printed_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"subject": "[/bold]", "prompt": "[/bold] lives in", "target_new": "[red]Rome"}))
    assert _cli(home, "ingest", str(facts), "-f", "jsonl", monkeypatch=monkeypatch).exit_code == 0
    out = _cli(home, "sql", "select subject, target_new from requests", monkeypatch=monkeypatch)
    assert out.exit_code == 0 and "[/bold]" in out.output and "[red]Rome" in out.output, out.output
    out = _cli(home, "history", "[/bold]", monkeypatch=monkeypatch)
    assert out.exit_code == 0 and "[/bold]" in out.output, out.output
    out = _cli(home, "sql", "select * from duckdb_settings()", monkeypatch=monkeypatch)
    assert out.exit_code == 0, out.output
    out = _cli(home, "sql", "select subject from requests", "--format", "json", monkeypatch=monkeypatch)
    assert json.loads(out.stdout) == [{"subject": "[/bold]"}]
    out = _cli(home, "sql", "select subject, target_new from requests", "--format", "csv", monkeypatch=monkeypatch)
    assert out.stdout.splitlines() == ["subject,target_new", "[/bold],[red]Rome"]


# --- 4. SQL stays inside the store, within limits ----------------------------------------------------
def test_sql_cannot_read_duckdbs_default_temp_dir(store: Store, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import duckdb

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.txt").write_text("secret")
    for path in (tmp_path / ".tmp" / "secret.txt", ".tmp/secret.txt"):
        with pytest.raises(duckdb.Error, match="disabled by configuration"):
            store.sql(f"select * from read_text('{path}')")


def test_sql_has_time_and_memory_limits(store: Store) -> None:
    import duckdb

    with pytest.raises(duckdb.Error, match="execution time"):
        store.sql("select count(*) from (select * from range(1000000000) order by random())", timeout_s=1)
    setting = store.sql("select current_setting('memory_limit') as m", memory_limit="300MB").to_pylist()[0]["m"]
    assert setting.replace(" ", "").lower().startswith(("286", "300")), setting  # DuckDB prints MiB


# --- 5. bad arguments fail before the runtime starts, writing nothing --------------------------------
@pytest.mark.parametrize(("args", "option"), [
    (["--model", "/nonexistent/model"], "--model"),
    (["--n", "0"], "--n"),
    (["--batch-size", "-5"], "--batch-size"),
    (["--layers", "99"], "--layers"),
    (["--layers", "0,x"], "--layers"),
    (["-a", "nosuch"], "--algorithm"),
    (["-a", "../../../etc/passwd"], "--algorithm"),
    (["--eval", "nosuch"], "--eval"),
    (["--dataset", "missing.json", "--format", "counterfact"], "--dataset"),
    (["--format", "nosuch"], "--format"),
    (["--hparams", '{"bogus": 1}'], "--hparams"),
    (["--dataset", "JSONL", "--format", "csv"], "--dataset"),
])
def test_bad_arguments_fail_naming_the_option_and_record_nothing(tiny_organism, tmp_path: Path, args: list[str],
                                                                 option: str, monkeypatch: pytest.MonkeyPatch) -> None:
    jsonl = tmp_path / "facts.jsonl"
    jsonl.write_text(json.dumps({"subject": "Ada", "prompt": "Ada lives in", "target_new": "Rome"}) + "\n")
    args = [str(jsonl) if a == "JSONL" else a for a in args]
    home = tmp_path / "home"
    start = time.perf_counter()
    out = _cli(home, "edit", "-a", "memit", "--model", "organism-tiny", *args, monkeypatch=monkeypatch)
    assert out.exit_code == 2, out.output
    assert option in out.output, out.output
    assert not (home / "store").exists()  # no runs row, no model_versions row, no requests
    assert not (home / "state").exists()  # no Prefect, no Ray
    assert time.perf_counter() - start < 120  # generous: it must not have waited for services


def test_preset_names_are_never_paths() -> None:
    from engramflow.editors.hparams import load_preset

    for algorithm, model in (("memit", "../../../etc/passwd"), ("../memit", "organism"), ("memit", "/etc/x")):
        with pytest.raises(ValueError, match="not a preset"):
            load_preset(algorithm, model)


# --- 6. ingest edge cases ------------------------------------------------------------------------------
def test_csv_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfsubject,prompt,target_new\r\nAda,Ada lives in,Rome\r\n")
    requests, rejects = load_requests(path, "csv")
    assert [r["subject"] for r in requests] == ["Ada"] and rejects == []


def test_deep_nesting_is_rejected_per_record(tmp_path: Path) -> None:
    good = {"subject": "Ada", "prompt": "Ada lives in", "target_new": "Rome"}
    deep = "[" * 20_000 + "]" * 20_000
    jsonl = tmp_path / "deep.jsonl"
    jsonl.write_text(json.dumps(good) + "\n" + json.dumps({**good, "subject": "Bo", "prompt": "Bo is"})[:-1]
                     + f', "x": {deep}}}\n')
    requests, rejects = load_requests(jsonl, "jsonl")
    assert [r["subject"] for r in requests] == ["Ada"]
    assert [(r["position"], r["reason"]) for r in rejects] == [(1, "nested deeper than 32 levels")]
    listing = tmp_path / "deep.json"
    listing.write_text(f'[{json.dumps({**good, "subject": "Bo", "prompt": "Bo is"})[:-1]}, "x": {deep}}},'
                       f' {json.dumps(good)}, {{"subject": "Cy", "x": {"[" * 40 + "]" * 40}}}]')
    requests, rejects = load_requests(listing, "easyedit-counterfact")
    assert [r["subject"] for r in requests] == ["Ada"]
    assert [r["position"] for r in rejects] == [0, 2] and all("nested" in r["reason"] for r in rejects)


def test_a_format_no_record_matches_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"subject": "Ada", "prompt": "Ada lives in", "target_new": "Rome"}) + "\n")
    with pytest.raises(IngestError, match="--format"):
        load_requests(path, "csv")
    rows = tmp_path / "other.jsonl"
    rows.write_text(json.dumps({"question": "?", "answer": "x"}) + "\n")
    with pytest.raises(IngestError, match="none of its 1 records"):
        load_requests(rows, "jsonl")


def test_an_unreachable_url_is_a_network_error() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(IngestError, match="network error") as err:
        load_requests(f"http://127.0.0.1:{port}/facts.jsonl", "jsonl")
    assert "not found" not in str(err.value)


# --- 7. shared tables are written once, whatever runs at once ----------------------------------------
# Two processes doing what two runs of one home do at once; each waits for `go` so that both have read
# the tables before either writes.
CONCURRENT_JOB = """
import sys, time
from pathlib import Path
from engramflow.data.ingest import ingest_file
from engramflow.ledger import default_store, ensure_base_version
from engramflow.tasks.locate import locate_layers
from engramflow.tasks.stats import stats_shard
model, facts, go, sample = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4].split(",")
base = ensure_base_version(default_store(), model)
while not go.exists():
    time.sleep(0.05)
ingest_file(facts, "jsonl")
stats_shard.fn(base, [0, 1], "world-tiny", 0, 1, 7_777)
locate_layers.fn(base, sample, samples=2)
"""


def test_concurrent_runs_write_shared_rows_once(tiny_organism, tmp_path: Path) -> None:
    """Two runs ingesting the same file, computing the same statistics shard and tracing the same
    sample at once leave one row per request, per statistic and per trace cell."""
    from engramflow.tasks.stats import stats_id

    store = default_store()
    base = ensure_base_version(store, str(tiny_organism))
    facts = tmp_path / "drop.jsonl"
    facts.write_text("".join(json.dumps({"subject": f"Zed{i}", "prompt": f"Zed{i} lives in", "target_new": "Oslo"})
                             + "\n" for i in range(5)))
    go = tmp_path / "go"
    args = [sys.executable, "-c", CONCURRENT_JOB, str(tiny_organism), str(facts), str(go), ",".join(_world_ids(2))]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    time.sleep(1)
    go.touch()
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    ids = [stats_id(base.base_model, layer, "world-tiny", 0, 1, 7_777) for layer in (0, 1)]
    assert sorted(store.sql(f"select stats_id from stats where stats_id in {tuple(ids)}").column(0).to_pylist()) \
        == sorted(ids)
    traces = store.sql("select trace_id, count(*) n, count(distinct (request_id, kind, layer, position)) d "
                       "from traces group by trace_id").to_pylist()
    assert traces and all(t["n"] == t["d"] for t in traces)
    requests = store.sql("select count(*) n, count(distinct request_id) d from requests "
                         "where subject like 'Zed%'").to_pylist()
    assert requests == [{"n": 5, "d": 5}]


# --- 8. local services need credentials; temp dirs are private ----------------------------------------
def test_local_ray_needs_its_token(ray_runtime, tmp_path: Path) -> None:
    if not ray_runtime.local_ray:
        pytest.skip("connected to an external Ray cluster")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # reach the loopback address as the runtime's own children do
    code = f"import ray; ray.init(address='{ray_runtime.ray_address}'); print('CONNECTED')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "CONNECTED" not in out.stdout
    assert "Authentication token is missing or incorrect" in out.stdout + out.stderr
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    assert os.environ["RAY_AUTH_MODE"] == "token" and token.stat().st_mode & 0o777 == 0o600


def test_the_prefect_api_needs_its_auth_string(ray_runtime) -> None:
    import httpx

    if not ray_runtime.started_server:
        pytest.skip("PREFECT_API_URL names a server of the user's")
    from prefect.settings import PREFECT_API_AUTH_STRING

    anonymous = httpx.post(f"{ray_runtime.api_url}/flows/filter", json={}, timeout=30)
    assert anonymous.status_code == 401
    import base64

    auth = PREFECT_API_AUTH_STRING.value()
    auth = auth.get_secret_value() if hasattr(auth, "get_secret_value") else auth
    header = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    assert httpx.post(f"{ray_runtime.api_url}/flows/filter", json={}, headers=header, timeout=30).status_code == 200


def test_ray_temp_dirs_are_private_unpredictable_and_cleaned(ray_runtime) -> None:
    import ray

    if ray_runtime.local_ray:  # Ray makes its own dir world-writable: its parent keeps everyone else out
        temp = Path(ray._private.worker._global_node.get_temp_dir_path())
        assert temp.parent.stat().st_mode & 0o777 == 0o700 and temp.parent.stat().st_uid == os.getuid()
    from engramflow.runtime import OWNER_FILE, new_ray_tmpdir

    a, b = (new_ray_tmpdir().parent for _ in range(2))
    assert a != b and a.parent == b.parent
    assert all(p.stat().st_mode & 0o777 == 0o700 for p in (a, b))
    # a directory left by a driver that was killed (its pid is gone) is removed by the next start
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (a / OWNER_FILE).write_text(str(dead.pid))
    c = new_ray_tmpdir().parent
    assert not a.exists() and b.exists()
    for path in (b, c):
        shutil.rmtree(path)


def test_a_runtime_removes_its_ray_session_files(tmp_path: Path) -> None:
    code = ("import ray\nfrom engramflow.runtime import pipeline_runtime\n"
            "with pipeline_runtime(num_cpus=1) as rt:\n"
            "    print('TMP', ray._private.worker._global_node.get_session_dir_path(), flush=True)\n")
    env = {**os.environ, "ENGRAMFLOW_HOME": str(tmp_path / "home")}
    for key in ("PREFECT_API_URL", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    session = Path(next(line for line in out.stdout.splitlines() if line.startswith("TMP ")).split(" ", 1)[1])
    assert not session.exists() and not session.parent.parent.exists()  # <private parent>/r/session_...


# --- 9. a Ray worker killed mid-task is retried; nothing is applied twice -------------------------------
def test_a_killed_worker_is_retried_and_nothing_applied_twice(ray_runtime, tiny_organism) -> None:
    import psutil

    from engramflow.flows.sequential import sequential_flow
    from engramflow.runtime import task_runner

    killed: list[int] = []
    stop = threading.Event()

    def kill_first_edit_worker() -> None:
        while not stop.is_set() and not killed:
            for proc in psutil.Process().children(recursive=True):
                try:
                    if proc.cmdline() and proc.cmdline()[0].startswith("ray::edit-batch"):
                        proc.send_signal(signal.SIGKILL)  # the title is set when the task starts: mid-task
                        killed.append(proc.pid)
                        return
                except psutil.Error:
                    continue
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_first_edit_worker)
    watcher.start()
    cfg = RunConfig(algorithm="ft", model=str(tiny_organism), n=4, batch_size=2, seed=7, protocols=["counterfact"],
                    **TINY)
    try:
        run_id = sequential_flow.with_options(task_runner=task_runner())(cfg)
    finally:
        stop.set()
        watcher.join()
    assert killed, "no edit worker was seen running"
    store = default_store()
    assert sorted(committed_batches(store, run_id)) == [0, 1]
    n, distinct = store.sql(f"select count(*), count(distinct edit_id) from edits where run_id = '{run_id}'"
                            ).to_pylist()[0].values()
    assert n == distinct == 4
    versions = store.sql(f"select count(*) n from model_versions where run_id = '{run_id}'").to_pylist()
    assert versions == [{"n": 2}]
    assert store.sql(f"select status from runs_latest where run_id = '{run_id}'").to_pylist() == [
        {"status": "completed"}]
    assert get_version(store, committed_batches(store, run_id)[1]).parent_version == committed_batches(store, run_id)[0]


@task(name="fault-appends-then-dies")
def appends_then_dies(log: str) -> int:
    """A side effect a rerun would double (a line appended to `log`); the worker dies the first time."""
    with open(log, "a") as f:
        f.write("ran\n")
    if Path(log).read_text().count("ran") == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return Path(log).read_text().count("ran")


@flow
def appends_flow(log: str, name: str) -> int:
    return appends_then_dies.with_options(name=name).submit(log).result()


def test_only_tasks_declared_safe_are_rerun_when_their_worker_dies(ray_runtime, tmp_path: Path) -> None:
    """Ray reruns a task whose worker died only when the task declared a rerun safe: an undeclared
    task (one whose side effects a rerun would double) fails instead of running twice."""
    from engramflow.runtime import task_runner

    undeclared = tmp_path / "undeclared.log"
    with pytest.raises(Exception, match="(?i)worker|died|crash"):
        appends_flow.with_options(task_runner=task_runner())(str(undeclared), "fault-undeclared")
    assert undeclared.read_text() == "ran\n"  # ran once, never again
    from engramflow.runtime import retry_on_worker_loss

    retry_on_worker_loss(appends_then_dies.with_options(name="fault-declared"))
    declared = tmp_path / "declared.log"
    assert appends_flow.with_options(task_runner=task_runner())(str(declared), "fault-declared") == 2
