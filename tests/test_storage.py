"""The artifact store: schemas, atomic appends, empty views, content-addressed tensors, read-only SQL."""

from __future__ import annotations

import json
import struct
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
import torch

from engramflow.ledger import default_store
from engramflow.storage import SCHEMAS, ReadOnlyError, SchemaError, Store
from engramflow.storage.store import _content_key, _split_safetensors

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _edit(i: int, **kw: object) -> dict[str, object]:
    row: dict[str, object] = {
        "edit_id": f"e{i}", "run_id": "r1", "request_id": f"q{i}", "algorithm": "memit", "layers": [3, 4],
        "batch_index": i // 4, "version_before": "v0", "version_after": "v1", "delta_key": None,
        "delta_norm": 0.5 * i, "seconds": 0.1,
    }
    row.update(kw)
    return row


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


def test_append_and_read_keep_the_schema(store: Store) -> None:
    path = store.append("edits", [_edit(i) for i in range(5)])
    assert path is not None and Path(path).name.startswith("part-") and path.endswith(".parquet")
    table = store.read("edits")
    assert table.schema == SCHEMAS["edits"]
    assert table.num_rows == 5
    assert table.column("layers").to_pylist()[0] == [3, 4]
    applied = table.column("applied_at").to_pylist()
    assert all(t.tzinfo is not None and abs(datetime.now(timezone.utc) - t) < timedelta(minutes=5) for t in applied)
    # a pyarrow table with narrower types is cast to the schema
    narrow = pa.table({"run_id": ["r1"], "model_version": ["v1"], "protocol": ["counterfact"], "metric": ["es"],
                       "value": pa.array([1], pa.int8()), "step": pa.array([2], pa.int16())})
    store.append("metrics", narrow)
    metrics = store.read("metrics")
    assert metrics.schema == SCHEMAS["metrics"] and metrics.column("value").to_pylist() == [1.0]
    assert store.append("edits", []) is None and len(store.parts("edits")) == 1


@pytest.mark.parametrize(("rows", "message"), [
    ([_edit(0, edit_idd="x")], "unknown column(s) ['edit_idd']"),
    ([_edit(0, batch_index="three")], "column 'batch_index'"),
    ([_edit(0, layers=["a"])], "column 'layers'"),
    ([_edit(0, run_id=None)], "column 'run_id' is required"),
    ([{k: v for k, v in _edit(0).items() if k != "algorithm"}], "column 'algorithm' is required"),
    (["not a dict"], "row 0 is a str"),
])
def test_schema_errors_name_table_and_column(store: Store, rows: list, message: str) -> None:
    with pytest.raises(SchemaError) as err:
        store.append("edits", rows)
    assert "'edits'" in str(err.value) and message in str(err.value)
    assert store.parts("edits") == []


def test_unknown_table(store: Store) -> None:
    with pytest.raises(KeyError, match="unknown table 'edit'"):
        store.append("edit", [_edit(0)])


def test_every_table_has_an_empty_typed_view(store: Store) -> None:
    con = store.connect()
    for table, schema in SCHEMAS.items():
        relation = con.sql(f"SELECT * FROM {table}")
        assert relation.columns == schema.names, table
        assert relation.to_arrow_table().num_rows == 0
        assert store.read(table).schema == schema
    assert con.sql("SELECT count(*) FROM runs_latest").fetchall() == [(0,)]
    assert con.sql("SELECT count(*) FROM experts_latest").fetchall() == [(0,)]
    # typed even when empty: list and timestamp columns behave as such in SQL
    assert con.sql("SELECT len(layers), applied_at + INTERVAL 1 DAY FROM edits").fetchall() == []


def test_views_follow_appends_and_latest_state(store: Store) -> None:
    run = {"run_id": "r1", "flow": "sequential", "params": json.dumps({"n": 4}), "started_at": T0}
    store.append("runs", [{**run, "status": "running", "updated_at": T0}])
    store.append("runs", [{**run, "status": "completed", "finished_at": T0 + timedelta(hours=1),
                           "updated_at": T0 + timedelta(hours=1)}])
    store.append("runs", [{**run, "run_id": "r2", "status": "running", "updated_at": T0}])
    latest = store.sql("SELECT run_id, status, json_extract(params, '$.n')::INT AS n FROM runs_latest ORDER BY run_id")
    assert latest.to_pylist() == [{"run_id": "r1", "status": "completed", "n": 4},
                                  {"run_id": "r2", "status": "running", "n": 4}]
    expert = {"expert_id": "x1", "run_id": "r1", "request_id": "q1", "layer": 2, "expert_key": "k"}
    store.append("experts", [{**expert, "created_at": T0}])
    store.append("experts", [{**expert, "created_at": T0 + timedelta(seconds=1), "removed": True}])
    assert store.sql("SELECT removed FROM experts_latest").to_pylist() == [{"removed": True}]


def test_hidden_temp_files_are_never_read(store: Store) -> None:
    store.append("edits", [_edit(0)])
    table_dir = Path(store.table_dir("edits"))
    (table_dir / f".tmp-{uuid.uuid4().hex}").write_bytes(b"PAR1 half a parquet file")
    assert store.read("edits").num_rows == 1
    assert store.sql("SELECT count(*) AS n FROM edits").to_pylist() == [{"n": 1}]


def test_failed_write_leaves_nothing_behind(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer dying mid-file must leave neither a partial part nor its temp file."""
    import pyarrow.parquet as pq

    real_write = pq.write_table

    def dying_write(table: pa.Table, where: str, **kw: object) -> None:
        real_write(table.slice(0, 1), where, **kw)  # some bytes reach the disk, then the process "dies"
        raise OSError("disk full")

    store.append("edits", [_edit(0)])
    monkeypatch.setattr(pq, "write_table", dying_write)
    with pytest.raises(OSError, match="disk full"):
        store.append("edits", [_edit(1), _edit(2)])
    assert [p.name.startswith("part-") for p in Path(store.table_dir("edits")).iterdir()] == [True]
    assert store.read("edits").column("edit_id").to_pylist() == ["e0"]


def test_concurrent_readers_see_only_whole_parts(store: Store) -> None:
    batch, parts = 40, 25
    errors: list[BaseException] = []
    seen: list[int] = []
    done = threading.Event()

    def write() -> None:
        try:
            for b in range(parts):
                store.append("edits", [_edit(b * batch + i) for i in range(batch)])
        except BaseException as e:  # reported by the assertion below
            errors.append(e)
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    while not done.is_set():
        try:
            seen.append(store.sql("SELECT count(*) AS n FROM edits").column("n")[0].as_py())
            seen.append(store.read("edits").num_rows)
        except BaseException as e:
            errors.append(e)
            break
    writer.join()
    assert errors == []
    assert all(n % batch == 0 for n in seen), seen  # never part of a part
    assert store.read("edits").num_rows == batch * parts
    assert not [p for p in Path(store.table_dir("edits")).iterdir() if p.name.startswith(".tmp-")]


def test_listing_a_table_while_a_writer_creates_its_directory(store: Store) -> None:
    """A reader polling a table another process is about to create sees no parts, never an error.

    Arrow lists first and checks existence second, so a directory created in between used to raise
    FileNotFoundError despite `allow_not_found` (it failed the resume test in CI). The writer here
    creates and removes the directory in a loop to hit that window many times.
    """
    table_dir = Path(store.table_dir("model_versions"))
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            table_dir.mkdir(parents=True, exist_ok=True)
            table_dir.rmdir()

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        listings = [store.parts("model_versions") for _ in range(5000)]
    finally:
        stop.set()
        writer.join()
    assert listings == [[]] * 5000


def test_tensors_round_trip_and_content_addressing(store: Store) -> None:
    tensors = {"u": torch.randn(8, 2), "v": torch.randn(16, 2).to(torch.bfloat16), "i": torch.arange(5)}
    meta = {"layer": "3", "algorithm": "memit", "kind": "delta"}
    key = store.put_tensors(tensors, meta)
    assert store.has_tensors(key)
    back = store.get_tensors(key)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    assert store.tensor_metadata(key) == meta
    # same content -> same key, one file; different content or metadata -> another key
    assert store.put_tensors({k: t.clone() for k, t in tensors.items()}, dict(reversed(meta.items()))) == key
    assert store.put_tensors({**tensors, "u": tensors["u"] + 1}, meta) != key
    assert store.put_tensors(tensors, {**meta, "layer": "4"}) != key
    assert len(list((Path(store.path) / "tensors").rglob("*.safetensors"))) == 3
    assert not list((Path(store.path) / "tensors").rglob(".tmp-*"))
    missing = "0" * 64
    assert not store.has_tensors(missing)
    with pytest.raises(KeyError, match=missing):
        store.get_tensors(missing)
    with pytest.raises(ValueError, match="not a tensor key"):
        store.get_tensors("../../etc/passwd")


def test_content_key_ignores_header_key_order() -> None:
    """safetensors writes metadata in hash-map order; equal content must still get one key."""
    from safetensors.torch import save

    blob = save({"a": torch.ones(3)}, metadata={"x": "1", "y": "2", "z": "3"})
    header, data = _split_safetensors(blob)
    reordered = json.dumps(dict(reversed(header.items()))).encode()
    other = struct.pack("<Q", len(reordered)) + reordered + bytes(data)
    assert other != blob
    assert _content_key(other) == _content_key(blob)


@pytest.mark.parametrize("query", [
    "SELECT count(*) FROM edits",
    "WITH x AS (SELECT * FROM edits) SELECT count(*) FROM x",
    "FROM requests",
    "DESCRIBE edits",
    "SHOW TABLES",
    "SUMMARIZE metrics",
    "EXPLAIN SELECT * FROM runs_latest",
])
def test_sql_runs_read_only_statements(store: Store, query: str) -> None:
    assert isinstance(store.sql(query), pa.Table)


@pytest.mark.parametrize("query", [
    "CREATE TABLE t (a INT)",
    "INSERT INTO edits SELECT * FROM edits",
    "DROP VIEW edits",
    "COPY (SELECT 1) TO '{out}'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}'",
    "ATTACH '{out}' AS other",
    "SET enable_external_access = true",
    "PRAGMA enable_profiling",
    "INSTALL httpfs",
    "SELECT 1; COPY (SELECT 1) TO '{out}'",
])
def test_sql_refuses_anything_else(store: Store, tmp_path: Path, query: str) -> None:
    out = tmp_path / "written.csv"
    with pytest.raises(ReadOnlyError):
        store.sql(query.format(out=out))
    assert not out.exists()


def test_sql_cannot_read_outside_the_store(store: Store, tmp_path: Path) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    with pytest.raises(duckdb.Error, match="disabled by configuration"):
        store.sql(f"SELECT * FROM read_csv('{secret}')")


def test_fsspec_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-local root (fsspec's in-memory filesystem here, s3:// on a cluster) works end to end."""
    store = Store(f"memory://store-{uuid.uuid4().hex}")
    assert store.sql("SELECT count(*) AS n FROM edits").to_pylist() == [{"n": 0}]
    store.append("edits", [_edit(i) for i in range(3)])
    assert store.read("edits").num_rows == 3
    assert store.sql("SELECT sum(delta_norm) AS s FROM edits").to_pylist() == [{"s": 1.5}]
    key = store.put_tensors({"w": torch.eye(2)})
    assert torch.equal(store.get_tensors(key)["w"], torch.eye(2))


def test_default_root_follows_the_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ENGRAMFLOW_STORE", str(tmp_path / "elsewhere"))
    store = default_store()
    store.append("edits", [_edit(0)])
    assert (tmp_path / "elsewhere" / "tables" / "edits").is_dir()
