"""`sequential_flow`: N requests in batches of B applied one after another, every earlier edit
re-evaluated after each batch."""

from __future__ import annotations

from prefect import flow

from engramflow.flows.batches import run_batches
from engramflow.flows.config import RunConfig


@flow(name="sequential", log_prints=True)
def sequential_flow(cfg: RunConfig, run_id: str | None = None) -> str:
    """`cfg.n` requests in batches of `cfg.batch_size`, applied one after another; after every batch,
    every earlier edit, a fixed set of unrelated probes, perplexity and weight norms are evaluated."""
    return run_batches("sequential", cfg, run_id)
