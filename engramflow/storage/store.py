"""The artifact store: append-only Parquet tables, content-addressed safetensors, DuckDB views.

Layout under the root (a local directory or any fsspec/pyarrow URL such as ``s3://bucket/prefix``)::

    tables/<table>/part-<utc time>-<uuid>.parquet   one file per append, never rewritten
    tensors/<key[:2]>/<key>.safetensors               key = content hash

Every file is written under a hidden temporary name (``.tmp-...``, not matching ``*.parquet``) and
then moved into place, so readers (pyarrow datasets, DuckDB globs) never see a partial file.

Integrity: tensors with NaN or infinite entries are never written, and a tensor's content hash is
checked whenever it is read, so a damaged file is named (key and path) instead of being used. A
damaged Parquet part leaves the rest of the catalogue readable; reading its table names the file
and points at `engramflow doctor`. Rows of shared tables that many runs may produce at once (a
request, a statistic, a trace) are written once per id (`append_once`, under a lock on local roots).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
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

# The table each `*_latest` view reads: its name without the suffix (a new view needs no second entry).
_LATEST_SOURCE = {name: name.removesuffix("_latest") for name in LATEST_VIEWS}

# `EXPLAIN [ANALYZE] [(options)]` before a statement; what follows must itself be a SELECT.
_EXPLAIN_RE = re.compile(r"^\s*explain\s+(analy[sz]e\s+)?(\([^)]*\)\s*)?", re.IGNORECASE)


class SchemaError(ValueError):
    """Rows that do not fit a table's schema; the message names the table and column."""


class ReadOnlyError(PermissionError):
    """A query given to `Store.sql` that is not a single read-only statement."""


DOCTOR_HINT = "run `engramflow doctor` to see what depends on it, `engramflow doctor --repair` to quarantine it"


class StoreDamageError(Exception):
    """A file of the store that cannot be trusted (unreadable part, corrupt or missing tensor)."""

    def __str__(self) -> str:  # KeyError subclasses would otherwise print their message quoted
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple:
        # Rebuilt from the message and attributes: the error crosses process boundaries (Ray, Prefect),
        # and the subclasses' __init__ take other arguments than the message.
        return (_rebuild_error, (type(self), self.args), self.__dict__)


def _rebuild_error(cls: type[Exception], args: tuple) -> Exception:
    err = Exception.__new__(cls)
    err.args = args
    return err


class DamagedPartError(StoreDamageError):
    """A Parquet part of a table that cannot be read; `paths` names the files."""

    def __init__(self, table: str, paths: Sequence[str], reason: str = "") -> None:
        self.table, self.paths = table, list(paths)
        detail = f" ({reason})" if reason else ""
        super().__init__(f"table {table!r}: damaged Parquet part(s) {', '.join(self.paths)}{detail}; {DOCTOR_HINT}")


class CorruptTensorError(StoreDamageError):
    """A stored tensor file whose content does not match its key (or holds non-finite values)."""

    def __init__(self, key: str, path: str, reason: str) -> None:
        self.key, self.path, self.reason = key, path, reason
        super().__init__(f"tensor {key} ({path}) is damaged: {reason}; {DOCTOR_HINT}")


class MissingTensorError(StoreDamageError, KeyError):
    """A tensor key that has no file in the store."""

    def __init__(self, key: str, path: str, root: str) -> None:
        self.key, self.path = key, path
        super().__init__(f"no tensors with key {key} in store {root} (expected at {path}); {DOCTOR_HINT}")


class NonFiniteTensorError(ValueError):
    """Tensors with NaN or infinite entries given to `put_tensors`: they are never stored."""


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
        self.damaged: dict[str, dict[str, str]] = {}  # view -> {part: reason}, as the last `connect` found

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
        """The whole table (optionally some columns / a pyarrow filter); empty with the schema if no parts.
        A part that cannot be read raises `DamagedPartError` naming it."""
        schema = schema_for(table)
        parts = self.parts(table)
        if not parts:
            empty = schema.empty_table()
            return empty.select(list(columns)) if columns is not None else empty
        try:
            dataset = ds.dataset(parts, schema=schema, format="parquet", filesystem=self.fs)
            return dataset.to_table(columns=list(columns) if columns is not None else None, filter=filter)
        except (pa.ArrowInvalid, OSError):
            damaged = self.damaged_parts(table)
            if damaged:
                raise DamagedPartError(table, list(damaged), next(iter(damaged.values()))) from None
            raise

    def check_part(self, path: str) -> str | None:
        """Why the Parquet part at `path` cannot be read (None: it can). Reads the whole file."""
        try:
            with self.fs.open_input_file(path) as f:
                pq.read_table(f)
        except (pa.ArrowException, OSError, ValueError) as err:
            return f"{type(err).__name__}: {err}"
        return None

    def damaged_parts(self, table: str) -> dict[str, str]:
        """path -> reason, for every part of `table` that cannot be read."""
        return {path: reason for path in self.parts(table) if (reason := self.check_part(path)) is not None}

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive lock named `name` among every process sharing this (local) store. Object stores
        have no such primitive: there the lock is a no-op and readers rely on ids being deterministic."""
        if not self.local:
            yield
            return
        import fcntl

        directory = os.path.join(self.path, "locks")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"{name}.lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def append_once(self, table: str, rows: Sequence[dict[str, Any]], id_columns: str | Sequence[str],
                    valid: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        """Append the rows whose id (`id_columns`) is not recorded yet, as one part; rows sharing an id
        are written or skipped together. Check and write happen under the table's lock, so two runs
        writing the same shared rows at once write them once. A recorded row counts only if `valid(row)`
        (e.g. its tensor still exists). Returns the rows written."""
        columns = [id_columns] if isinstance(id_columns, str) else list(id_columns)
        if not rows:
            return []

        def ident(row: dict[str, Any]) -> tuple:
            return tuple(row.get(c) for c in columns)

        with self.lock(table):
            first = columns[0]
            wanted = list({row[first] for row in rows})
            recorded = self.read(table, columns=None if valid else columns,
                                 filter=pc.field(first).isin(wanted)).to_pylist()
            done = {ident(row) for row in recorded if valid is None or valid(row)}
            new = [row for row in rows if ident(row) not in done]
            self.append(table, new)
        return new

    # ---- tensors -----------------------------------------------------------------------------
    def put_tensors(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        """Save tensors (and string metadata) as safetensors under their content hash; return the key.

        The key is the sha256 of the file with its JSON header canonicalised (keys sorted): safetensors
        writes metadata in hash-map order, so the raw bytes of equal content may differ between runs.
        Storing the same content twice writes nothing the second time, unless the stored file is damaged,
        which is then replaced. NaN or infinite entries raise `NonFiniteTensorError` naming the tensors.
        """
        from safetensors.torch import save

        bad = non_finite(tensors)
        if bad:
            raise NonFiniteTensorError(f"tensor(s) {', '.join(bad)} have NaN or infinite entries; not stored")
        blob = save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata)
        key = _content_key(blob)
        path = self._tensor_path(key)
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound or self._tensor_problem(key) is not None:
            def write(tmp: str) -> None:
                with self.fs.open_output_stream(tmp) as out:
                    out.write(blob)
            self._write_atomic(path, write)
        return key

    def tensor_file(self, key: str) -> str:
        """Where the tensors of `key` live (a path in the store's filesystem)."""
        return self._url(self._tensor_path(key))

    def _tensor_bytes(self, key: str) -> bytes:
        path = self._tensor_path(key)
        try:
            with self.fs.open_input_file(path) as f:
                return f.read()
        except FileNotFoundError:
            raise MissingTensorError(key, self.tensor_file(key), self.root) from None

    def _tensor_problem(self, key: str, blob: bytes | None = None) -> str | None:
        """Why the file of `key` cannot be trusted (None: it can): unreadable, or a content hash that
        is not its key."""
        try:
            blob = self._tensor_bytes(key) if blob is None else blob
            actual = _content_key(blob)
        except MissingTensorError:
            return "missing"
        except (ValueError, struct.error, UnicodeDecodeError) as err:  # json / header errors
            return f"not a readable safetensors file ({type(err).__name__}: {err})"
        if actual != key:
            return f"its content hashes to {actual}, not to its key (the file was modified or truncated)"
        return None

    def load_tensors(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, metadata) saved under `key`, verified: `MissingTensorError` if there is no file,
        `CorruptTensorError` naming key and file if its content does not hash to its key or holds
        non-finite values."""
        from safetensors.torch import load

        blob = self._tensor_bytes(key)
        problem = self._tensor_problem(key, blob)
        if problem is not None:
            raise CorruptTensorError(key, self.tensor_file(key), problem)
        try:
            tensors = load(blob)
        except Exception as err:  # safetensors raises its own error type for malformed files
            raise CorruptTensorError(key, self.tensor_file(key), f"cannot be loaded ({err})") from None
        bad = non_finite(tensors)
        if bad:
            raise CorruptTensorError(key, self.tensor_file(key), f"tensor(s) {', '.join(bad)} have non-finite entries")
        header, _ = _split_safetensors(blob)
        return tensors, dict(header.get("__metadata__", {}))

    def get_tensors(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors saved under `key`, verified (see `load_tensors`)."""
        return self.load_tensors(key)[0]

    def tensor_metadata(self, key: str) -> dict[str, str]:
        """The string metadata saved with the tensors under `key`."""
        header, _ = _split_safetensors(self._tensor_bytes(key))
        return dict(header.get("__metadata__", {}))

    def has_tensors(self, key: str) -> bool:
        return self.fs.get_file_info(self._tensor_path(key)).type == pafs.FileType.File

    def tensor_keys(self) -> list[str]:
        """Every tensor key with a file in the store."""
        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.path}/tensors", recursive=True, allow_not_found=True))
        return sorted(i.base_name[: -len(".safetensors")] for i in infos
                      if i.is_file and i.base_name.endswith(".safetensors") and not i.base_name.startswith("."))

    def check_tensor(self, key: str) -> str | None:
        """Why the stored tensors of `key` cannot be used (missing, damaged, non-finite); None if they can."""
        try:
            self.load_tensors(key)
        except StoreDamageError as err:
            return getattr(err, "reason", "missing")
        return None

    # ---- DuckDB ------------------------------------------------------------------------------
    def connect(self, read_only: bool = False, temp_directory: str | None = None,
                memory_limit: str | None = None, timeout_s: float | None = None) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB with one view per table (and the `*_latest` views).

        A table with parts is a view over its Parquet glob, so later appends show in later queries; a
        table with no parts yet is an empty view with the schema's columns until the next `connect()`.
        A table with a damaged part gets no view (its name is in `self.damaged`; `query` names the file).
        DuckDB spills to `temp_directory` (None: it does not spill). With `read_only`, the connection can
        read nothing but the store's tables (and its own spill files) and its configuration is locked.
        """
        import duckdb

        con = duckdb.connect(":memory:")
        con.execute("SET TimeZone = 'UTC'")
        # DuckDB's default temp directory is `<cwd>/.tmp`, which external-access rules leave readable.
        con.execute(f"SET temp_directory = '{_sql_str(temp_directory or '')}'")
        if memory_limit:
            con.execute(f"SET memory_limit = '{_sql_str(memory_limit)}'")
        if timeout_s:
            con.execute(f"SET max_execution_time = {max(1, int(timeout_s * 1000))}")
        if not self.local:  # DuckDB reads remote roots through fsspec (no extension download needed)
            import fsspec

            con.register_filesystem(fsspec.core.url_to_fs(str(self.root))[0])
        self.damaged = {}
        for table, schema in SCHEMAS.items():
            if self.parts(table):
                glob = self._url(f"{self.table_dir(table)}/*.parquet")
                try:
                    con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{_sql_str(glob)}', "
                                "union_by_name = true)")
                except duckdb.Error:
                    damaged = self.damaged_parts(table)
                    if not damaged:
                        raise
                    self.damaged[table] = damaged
            else:
                con.register(f"_empty_{table}", schema.empty_table())
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM _empty_{table}")
        for name, query in LATEST_VIEWS.items():
            source = _LATEST_SOURCE[name]
            if source in self.damaged:
                self.damaged[name] = self.damaged[source]
            else:
                con.execute(f"CREATE VIEW {name} AS {query}")
        if read_only:
            tables = self._url(self.path + "/tables/")
            # fsspec hands DuckDB paths back as scheme:///path, so allow both spellings
            allowed = {tables, tables.replace("://", ":///", 1)} if not self.local else {tables}
            if temp_directory:
                allowed.add(os.path.join(temp_directory, ""))
            listed = ", ".join("'" + _sql_str(a) + "'" for a in sorted(allowed))
            con.execute(f"SET allowed_directories = [{listed}]")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        return con

    def query(self, query: str, params: dict[str, object] | None = None, *, read_only: bool = False,
              memory_limit: str | None = None, timeout_s: float | None = None,
              check: Callable[[duckdb.DuckDBPyConnection], None] | None = None) -> pa.Table:
        """Run `query` (with named `params`) on a fresh catalogue connection whose spill files go to a
        private temporary directory removed afterwards. A query that reads a table with a damaged part
        raises `DamagedPartError` naming the file(s). `check(con)` runs first (e.g. refusing statements)."""
        import duckdb

        spill = tempfile.mkdtemp(prefix="engramflow-duckdb-")  # mode 0700, unpredictable name
        try:
            con = self.connect(read_only=read_only, temp_directory=spill, memory_limit=memory_limit,
                               timeout_s=timeout_s)
            try:
                if check is not None:
                    check(con)
                try:
                    return con.sql(query, params=params or None).to_arrow_table()
                except duckdb.Error as err:
                    raise self._explain(err) from None
            finally:
                con.close()
        finally:
            shutil.rmtree(spill, ignore_errors=True)

    def _explain(self, err: Exception) -> Exception:
        """A DuckDB error, or the `DamagedPartError` behind it (a view left out, an unreadable file)."""
        import duckdb

        message = str(err)
        for name, damaged in self.damaged.items():
            if isinstance(err, duckdb.CatalogException) and re.search(rf"\b{re.escape(name)}\b", message):
                return DamagedPartError(_LATEST_SOURCE.get(name, name), list(damaged), next(iter(damaged.values())))
        for table in SCHEMAS:
            if self.table_dir(table) in message:
                damaged = self.damaged_parts(table)
                if damaged:
                    return DamagedPartError(table, list(damaged), next(iter(damaged.values())))
        return err

    def sql(self, query: str, memory_limit: str | None = "2GB", timeout_s: float | None = 300) -> pa.Table:
        """Run one read-only statement (SELECT / WITH / FROM / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN).

        Anything else raises `ReadOnlyError` before it runs; the connection additionally cannot touch
        files outside the store's tables (`enable_external_access = false`, configuration locked), and
        the query stops at `memory_limit` and after `timeout_s` seconds (None: no limit).
        """

        def read_only_statement(con: duckdb.DuckDBPyConnection) -> None:
            statements = con.extract_statements(query)
            if len(statements) != 1:
                raise ReadOnlyError(f"expected exactly one SQL statement, got {len(statements)}")
            kind = statements[0].type.name
            if kind == "EXPLAIN":  # EXPLAIN ANALYZE runs its statement: that one must be a SELECT too
                inner = con.extract_statements(_EXPLAIN_RE.sub("", query, count=1))
                kind = inner[0].type.name if len(inner) == 1 else "EXPLAIN"
            if kind != "SELECT":
                raise ReadOnlyError(f"only read-only queries are allowed (got a {kind} statement)")

        return self.query(query, read_only=True, memory_limit=memory_limit, timeout_s=timeout_s,
                          check=read_only_statement)


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors with NaN or infinite entries."""
    import torch

    return [name for name, t in tensors.items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


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
