"""`edit_flow`: one batch end to end."""

from __future__ import annotations

from dataclasses import replace

from prefect import flow

from engramflow.flows.batches import run_batches
from engramflow.flows.config import RunConfig


@flow(name="edit", log_prints=True)
def edit_flow(cfg: RunConfig, run_id: str | None = None) -> str:
    """Ingest → statistics → (locate) → edit one batch of `cfg.n` requests → evaluate."""
    return run_batches("edit", replace(cfg, batch_size=cfg.n), run_id)
