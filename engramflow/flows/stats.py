"""Covariance statistics as a flow of its own: shards fan out as Ray tasks, a reduction sums them.

`compute_stats` is the shared recipe (the editing flows call it too); `stats_flow` is the flow
users and benchmarks run directly."""

from __future__ import annotations

from prefect import flow
from prefect_ray.context import remote_options

from engramflow.ledger import Version, ensure_base_version
from engramflow.runtime import gpu_options
from engramflow.storage import Store
from engramflow.tasks.stats import stats_reduce, stats_shard


def compute_stats(base: Version, layers: list[int], corpus: str, n_shards: int, max_tokens: int | None,
                  device: str = "cpu") -> dict[int, str]:
    """layer -> tensor key of Σ k kᵀ over `corpus`; shards already recorded are not recomputed."""
    with remote_options(**gpu_options(device)):
        shards = [stats_shard.submit(base, layers, corpus, s, n_shards, max_tokens) for s in range(n_shards)]
        return stats_reduce.submit([f.result() for f in shards]).result()


@flow(name="statistics", log_prints=True)
def stats_flow(model: str, layers: list[int], corpus: str, n_shards: int = 2, max_tokens: int | None = 100_000,
               device: str = "cpu") -> dict[int, str]:
    """Second moments of the MLP keys at `layers` of `model` over `corpus`."""
    from engramflow.models import resolve_model

    base = ensure_base_version(Store(), resolve_model(model))
    return compute_stats(base, layers, corpus, n_shards, max_tokens, device)
