"""Covariance statistics as a flow of its own: shards fan out as Ray tasks, a reduction sums them.

`compute_stats` is the shared recipe (the editing flows call it too); `stats_flow` is the flow
users and benchmarks run directly."""

from __future__ import annotations

from prefect import flow
from prefect_ray.context import remote_options

from engramflow.ledger import Version, default_store, ensure_base_version
from engramflow.runtime import gpu_options
from engramflow.tasks.stats import stats_reduce, stats_shard


def compute_stats(base: Version, layers: list[int], corpus: str, n_shards: int, max_tokens: int | None,
                  device: str = "cpu", max_samples: int | None = None, mentions_of: list[str] | None = None,
                  ) -> dict[int, str]:
    """layer -> tensor key of Σ k kᵀ over `corpus` (with `mentions_of`: only over the sentences that
    mention those subjects, in the same sample); shards already recorded are not recomputed."""
    with remote_options(**gpu_options(device)):
        shards = [stats_shard.submit(base, layers, corpus, s, n_shards, max_tokens, max_samples, mentions_of)
                  for s in range(n_shards)]
        return stats_reduce.submit([f.result() for f in shards]).result()


@flow(name="statistics", log_prints=True)
def stats_flow(model: str, layers: list[int], corpus: str, n_shards: int = 2, max_tokens: int | None = 100_000,
               device: str = "cpu") -> dict[int, str]:
    """Second moments of the MLP keys at `layers` of `model` (a model directory) over `corpus`."""
    base = ensure_base_version(default_store(), model)
    return compute_stats(base, layers, corpus, n_shards, max_tokens, device)
