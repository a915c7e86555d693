"""The artifact store: append-only Parquet tables, content-addressed safetensors, DuckDB views.

Layout under the root (a local directory or any fsspec/pyarrow URL such as ``s3://bucket/prefix``)::

    tables/<table>/part-<utc time>-<uuid>.parquet   one file per append, never rewritten
    tensors/<key[:2]>/<key>.safetensors               key = content hash

Every file is written under a hidden temporary name (``.tmp-...``, not matching ``*.parquet``) and
then moved into place, so readers (pyarrow datasets, DuckDB globs) never see a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engramflow.storage.schemas import COLUMN_DEFAULTS, SCHEMAS, WRITE_TIME_COLUMNS, schema_for

if TYPE_CHECKING:
    import duckdb
    import torch

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")

# Views over the append-only tables that show the newest row per id.
LATEST_VIEWS: dict[str, str] = {
    "runs_latest": "SELECT * FROM runs QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY updated_at DESC) = 1",
    "experts_latest": (
        "SELECT * FROM experts QUALIFY row_number() OVER (PARTITION BY expert_id ORDER BY created_at DESC) = 1"
    ),
    "sweeps_latest": (
        "SELECT * FROM sweeps QUALIFY row_number() OVER (PARTITION BY sweep_id, cell ORDER BY updated_at DESC) = 1"
    ),
}

# `EXPLAIN [ANALYZE] [(options)]` before a statement; what follows must itself be a SELECT.
_EXPLAIN_RE = re.compile(r"^\s*explain\s+(analy[sz]e\s+)?(\([^)]*\)\s*)?", re.IGNORECASE)


class SchemaError(ValueError):
    """Rows that do not fit a table's schema; the message names the table and column."""


class ReadOnlyError(PermissionError):
    """A query given to `Store.sql` that is not a single read-only statement."""


def _resolve(root: str) -> tuple[pafs.FileSystem, str, Any]:
    """(pyarrow filesystem, path inside it, is it local) for a local path or URL.

    URLs pyarrow knows natively (s3, gs, hdfs) use pyarrow's own filesystem; any other fsspec
    protocol (memory, abfs, ...) is wrapped with `FSSpecHandler`.
    """
    if root.startswith("file://"):
        root = root[len("file://"):]
    if "://" not in root:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root)), True
    try:
        fs, path = pafs.FileSystem.from_uri(root)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        import fsspec

        ffs, path = fsspec.core.url_to_fs(root)
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(ffs))
    return fs, path.rstrip("/"), False


def _now() -> datetime:
    return datetime.now(timezone.utc)


def conform(table: str, rows: Sequence[dict[str, Any]] | pa.Table) -> pa.Table:
    """Validate `rows` against the table's schema and return a table with exactly its columns.

    Missing nullable columns become null, missing write-time columns get the current UTC time,
    documented defaults fill the rest; unknown columns, nulls in required columns and values of the
    wrong type raise `SchemaError` naming the table and column.
    """
    schema = schema_for(table)
    now = _now()
    defaults: dict[str, object] = {WRITE_TIME_COLUMNS[table]: now, **COLUMN_DEFAULTS.get(table, {})}
    if isinstance(rows, pa.Table):
        n = rows.num_rows
        given = set(rows.column_names)
        get_column = rows.column
    else:
        n = len(rows)
        given = set()
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise SchemaError(f"table {table!r}: row {i} is a {type(row).__name__}, not a dict")
            given.update(row)

        def get_column(name: str) -> list[Any]:
            return [row.get(name) for row in rows]

    unknown = given - set(schema.names)
    if unknown:
        raise SchemaError(f"table {table!r}: unknown column(s) {sorted(unknown)}; columns: {schema.names}")
    arrays = []
    for field in schema:
        if field.name in given:
            values = get_column(field.name)
            if field.name in defaults and not isinstance(values, pa.ChunkedArray):
                values = [defaults[field.name] if v is None else v for v in values]
        elif field.name in defaults:
            values = [defaults[field.name]] * n
        else:
            values = [None] * n
        try:
            if isinstance(values, pa.ChunkedArray):
                array = values.cast(field.type)
            else:
                array = pa.array(values, type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError) as e:
            raise SchemaError(f"table {table!r}, column {field.name!r} ({field.type}): {e}") from e
        if not field.nullable and array.null_count:
            raise SchemaError(f"table {table!r}, column {field.name!r} is required but has {array.null_count} null(s)")
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=schema)


class Store:
    """Parquet tables, content-addressed tensors and a DuckDB catalogue under one root."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = str(root)
        self.fs, self.path, self.local = _resolve(str(root))

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    # ---- paths -------------------------------------------------------------------------------
    def table_dir(self, table: str) -> str:
        schema_for(table)
        return f"{self.path}/tables/{table}"

    def _tensor_path(self, key: str) -> str:
        if not _KEY_RE.match(key):
            raise ValueError(f"not a tensor key (64 lowercase hex digits): {key!r}")
        return f"{self.path}/tensors/{key[:2]}/{key}.safetensors"

    def _url(self, path: str) -> str:
        """How DuckDB addresses `path`: plain for local, with the scheme otherwise."""
        if self.local:
            return path
        scheme = str(self.root).split("://", 1)[0]
        return f"{scheme}://{path.lstrip('/')}"

    def _write_atomic(self, path: str, write: Any) -> None:
        """Write via `write(tmp_path)` to a hidden temp name beside `path`, then move it into place."""
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        try:
            write(tmp)
            self.fs.move(tmp, path)
        except BaseException:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)
            raise

    # ---- tables ------------------------------------------------------------------------------
    def append(self, table: str, rows: Sequence[dict[str, Any]] | pa.Table) -> str | None:
        """Validate `rows` against the schema and write them as one new Parquet part.

        Returns the part's path, or None when there were no rows (nothing is written).
        """
        data = conform(table, rows)
        if data.num_rows == 0:
            return None
        stamp = _now().strftime("%Y%m%dT%H%M%S%fZ")
        path = f"{self.table_dir(table)}/part-{stamp}-{uuid.uuid4().hex[:12]}.parquet"
        self._write_atomic(path, lambda tmp: pq.write_table(data, tmp, filesystem=self.fs, compression="zstd"))
        return path

    def parts(self, table: str) -> list[str]:
        """The table's Parquet parts, oldest first (hidden temp files excluded)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.table_dir(table), allow_not_found=True))
        except FileNotFoundError:
            # Arrow lists the directory, and on failure checks whether it exists; when a writer creates
            # the directory between those two steps, `allow_not_found` does not help and Arrow raises.
            # A directory that did not exist a moment ago holds no finished part yet.
            return []
        return sorted(i.path for i in infos if i.is_file and i.base_name.endswith(".parquet")
                      and not i.base_name.startswith((".", "_")))

    def read(self, table: str, columns: Iterable[str] | None = None, filter: ds.Expression | None = None) -> pa.Table:
        """The whole table (optionally some columns / a pyarrow filter); empty with the schema if no parts."""
        schema = schema_for(table)
        parts = self.parts(table)
        if not parts:
            empty = schema.empty_table()
            return empty.select(list(columns)) if columns is not None else empty
        dataset = ds.dataset(parts, schema=schema, format="parquet", filesystem=self.fs)
        return dataset.to_table(columns=list(columns) if columns is not None else None, filter=filter)

    # ---- tensors -----------------------------------------------------------------------------
    def put_tensors(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        """Save tensors (and string metadata) as safetensors under their content hash; return the key.

        The key is the sha256 of the file with its JSON header canonicalised (keys sorted): safetensors
        writes metadata in hash-map order, so the raw bytes of equal content may differ between runs.
        Storing the same content twice writes nothing the second time.
        """
        from safetensors.torch import save

        blob = save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata)
        key = _content_key(blob)
        path = self._tensor_path(key)
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            def write(tmp: str) -> None:
                with self.fs.open_output_stream(tmp) as out:
                    out.write(blob)
            self._write_atomic(path, write)
        return key

    def _tensor_bytes(self, key: str) -> bytes:
        path = self._tensor_path(key)
        try:
            with self.fs.open_input_file(path) as f:
                return f.read()
        except FileNotFoundError:
            raise KeyError(f"no tensors with key {key} in store {self.root}") from None

    def get_tensors(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors saved under `key` (KeyError naming the key if absent)."""
        from safetensors.torch import load

        return load(self._tensor_bytes(key))

    def tensor_metadata(self, key: str) -> dict[str, str]:
        """The string metadata saved with the tensors under `key`."""
        header, _ = _split_safetensors(self._tensor_bytes(key))
        return dict(header.get("__metadata__", {}))

    def has_tensors(self, key: str) -> bool:
        return self.fs.get_file_info(self._tensor_path(key)).type == pafs.FileType.File

    # ---- DuckDB ------------------------------------------------------------------------------
    def connect(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB with one view per table (and the `*_latest` views).

        A table with parts is a view over its Parquet glob, so later appends show in later queries; a
        table with no parts yet is an empty view with the schema's columns until the next `connect()`. With `read_only`, the connection can
        read nothing but the store's tables and its configuration is locked.
        """
        import duckdb

        con = duckdb.connect(":memory:")
        con.execute("SET TimeZone = 'UTC'")
        if not self.local:  # DuckDB reads remote roots through fsspec (no extension download needed)
            import fsspec

            con.register_filesystem(fsspec.core.url_to_fs(str(self.root))[0])
        for table, schema in SCHEMAS.items():
            if self.parts(table):
                glob = self._url(f"{self.table_dir(table)}/*.parquet")
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{_sql_str(glob)}', union_by_name = true)")
            else:
                con.register(f"_empty_{table}", schema.empty_table())
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM _empty_{table}")
        for name, query in LATEST_VIEWS.items():
            con.execute(f"CREATE VIEW {name} AS {query}")
        if read_only:
            tables = self._url(self.path + "/tables/")
            # fsspec hands DuckDB paths back as scheme:///path, so allow both spellings
            allowed = {tables, tables.replace("://", ":///", 1)} if not self.local else {tables}
            listed = ", ".join("'" + _sql_str(a) + "'" for a in sorted(allowed))
            con.execute(f"SET allowed_directories = [{listed}]")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        return con

    def sql(self, query: str) -> pa.Table:
        """Run one read-only statement (SELECT / WITH / FROM / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN).

        Anything else raises `ReadOnlyError` before it runs; the connection additionally cannot touch
        files outside the store's tables (`enable_external_access = false`, configuration locked).
        """
        con = self.connect(read_only=True)
        try:
            statements = con.extract_statements(query)
            if len(statements) != 1:
                raise ReadOnlyError(f"expected exactly one SQL statement, got {len(statements)}")
            kind = statements[0].type.name
            if kind == "EXPLAIN":  # EXPLAIN ANALYZE runs its statement: that one must be a SELECT too
                inner = con.extract_statements(_EXPLAIN_RE.sub("", query, count=1))
                kind = inner[0].type.name if len(inner) == 1 else "EXPLAIN"
            if kind != "SELECT":
                raise ReadOnlyError(f"only read-only queries are allowed (got a {kind} statement)")
            return con.sql(query).to_arrow_table()
        finally:
            con.close()


def _sql_str(value: str) -> str:
    """Escape a string for a single-quoted SQL literal."""
    return value.replace("'", "''")


def _split_safetensors(blob: bytes | memoryview) -> tuple[dict[str, Any], memoryview]:
    """(parsed JSON header, data section) of a safetensors file."""
    view = memoryview(blob)
    (n,) = struct.unpack("<Q", view[:8])
    return json.loads(bytes(view[8 : 8 + n])), view[8 + n :]


def _content_key(blob: bytes) -> str:
    header, data = _split_safetensors(blob)
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    digest.update(data)
    return digest.hexdigest()
