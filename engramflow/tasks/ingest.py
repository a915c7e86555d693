"""Ingest stage: a dataset file (or the embedded world) into the `requests` / `rejects` tables."""

from __future__ import annotations

from prefect import task

from engramflow.data.ingest import ingest_file
from engramflow.runtime import retry_on_worker_loss


@task(name="ingest")
def ingest(path: str, fmt: str) -> list[str]:
    """Ingest `path` as `fmt`; return the request ids of every valid record, in file order."""
    result = ingest_file(path, fmt)
    return result.request_ids


retry_on_worker_loss(ingest)  # requests are content-addressed and written once
