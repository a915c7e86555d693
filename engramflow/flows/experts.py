"""`experts_flow`: expert training (SCEN) batch after batch: each batch's experts trained as parallel
Ray tasks, then their indexing neurons, then evaluation; old experts are never retrained."""

from __future__ import annotations

from prefect import flow

from engramflow.editors.methods import get_method
from engramflow.flows.batches import run_batches
from engramflow.flows.config import RunConfig


@flow(name="experts", log_prints=True)
def experts_flow(cfg: RunConfig, run_id: str | None = None) -> str:
    """Continual expert training with `cfg.algorithm`, a method whose artifact is its whole state (an
    expert bank each batch extends), not a stack of weight deltas."""
    method = get_method(cfg.algorithm)
    if method.artifact.stacks:
        raise ValueError(f"the experts flow trains expert banks; method {cfg.algorithm!r} produces weight "
                         "deltas: run it with the sequential flow")
    return run_batches("experts", cfg, run_id)
