"""Batched editing stage: optimise a batch's targets in shards (`optimise_targets`, one task per
worker), then compute the batch's delta on the parent version, store it, commit the new model
version and write the batch's `edits` rows (`edit_batch`)."""

from __future__ import annotations

import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from engramflow import editors, home
from engramflow.ledger import (
    Version,
    batch_version_id,
    fetch_requests,
    get_version,
    materialize,
    record_version,
    save_delta,
    write_edit_rows,
)
from engramflow.storage import Store
from engramflow.tasks.stats import load_moments


def target_cache() -> editors.RequestCache:
    """Optimised targets, kept per request under the home: the first batch of each run that starts from
    the same weights (every algorithm of `engramflow demo`, every point of a sweep) optimises them
    once, and the shards of `optimise_targets` hand theirs to `edit_batch`."""
    return editors.RequestCache(home.get_home() / "cache" / "targets")


@task(name="optimise-targets", cache_policy=NO_CACHE)
def optimise_targets(parent: Version, request_ids: list[str], algorithm: str, hparams: dict[str, Any] | None,
                     device: str = "cpu") -> int:
    """Optimise one shard of a batch's targets on `parent` into the target cache, where `edit_batch`
    then reads them: requests are optimised independently, so the shards of a batch run on as many
    workers as there are. Returns the optimisation steps taken (0: all cached)."""
    from engramflow.runtime import use_assigned_cpus

    use_assigned_cpus()
    store = Store()
    model, tok = materialize(store, parent, device=device)
    return editors.precompute(model, tok, fetch_requests(store, request_ids), target_cache(),
                              method=algorithm, hparams=hparams)


@task(name="edit-batch", cache_policy=NO_CACHE)
def edit_batch(run_id: str, batch_index: int, parent: Version, request_ids: list[str], algorithm: str,
               hparams: dict[str, Any] | None, stats_keys: dict[int, str] | None, device: str = "cpu") -> Version:
    """Edit `request_ids` into `parent` (reading any targets `optimise_targets` left in the cache);
    return the committed version (the recorded one if this batch was committed by an earlier,
    interrupted run: no edit is ever applied twice)."""
    from engramflow.runtime import use_assigned_cpus

    use_assigned_cpus()
    store = Store()
    version_id = batch_version_id(run_id, batch_index)
    try:
        version = get_version(store, version_id)
    except KeyError:
        model, tok = materialize(store, parent, device=device)
        requests = fetch_requests(store, request_ids)
        stats = load_moments(store, stats_keys) if stats_keys else None
        start = time.perf_counter()
        delta = editors.edit(model, tok, requests, method=algorithm, hparams=hparams, stats=stats,
                             cache=target_cache())
        delta.meta["seconds"] = time.perf_counter() - start
        delta.meta["batch_index"] = batch_index
        version = record_version(store, version_id, parent, [save_delta(store, delta)], run_id,
                                 note=f"{algorithm} batch {batch_index} ({len(request_ids)} edits)")
    write_edit_rows(store, run_id, batch_index, version)
    return version
