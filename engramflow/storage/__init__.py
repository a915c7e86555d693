"""The artifact store: Parquet tables with explicit schemas, content-addressed tensors, DuckDB views."""

from engramflow.storage.schemas import SCHEMAS, schema_for
from engramflow.storage.store import ReadOnlyError, SchemaError, Store, conform

__all__ = ["SCHEMAS", "ReadOnlyError", "SchemaError", "Store", "conform", "schema_for"]
