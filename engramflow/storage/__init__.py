"""The artifact store: Parquet tables with explicit schemas, content-addressed tensors, DuckDB views."""

from engramflow.storage.schemas import SCHEMAS, schema_for
from engramflow.storage.store import (
    CorruptTensorError,
    DamagedPartError,
    MissingTensorError,
    NonFiniteTensorError,
    ReadOnlyError,
    SchemaError,
    Store,
    StoreDamageError,
    conform,
)

__all__ = ["SCHEMAS", "CorruptTensorError", "DamagedPartError", "MissingTensorError", "NonFiniteTensorError",
           "ReadOnlyError", "SchemaError", "Store", "StoreDamageError", "conform", "schema_for"]
