"""Batched editing stage: compute one batch's delta on the parent version, store it, commit the
new model version, then write the batch's `edits` rows."""

from __future__ import annotations

import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from engramflow import home
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
from storage import Store
from tasks.stats import load_moments


@task(name="edit-batch", cache_policy=NO_CACHE)
def edit_batch(run_id: str, batch_index: int, parent: Version, request_ids: list[str], algorithm: str,
               hparams: dict[str, Any] | None, stats_keys: dict[int, str] | None, device: str = "cpu") -> Version:
    """Edit `request_ids` into `parent`; return the committed version (the recorded one if this batch
    was committed by an earlier, interrupted run: no edit is ever applied twice)."""
    import editors
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
        # Targets are kept per request under the home: the first batch of each run that starts from the
        # same weights (every algorithm of `engramflow demo`, every point of a sweep) optimises them once.
        cache = editors.TargetCache(home.get_home() / "cache" / "targets")
        delta = editors.edit(model, tok, requests, algorithm=algorithm, hparams=hparams, stats=stats,
                             target_cache=cache)
        delta.meta["seconds"] = time.perf_counter() - start
        delta.meta["batch_index"] = batch_index
        version = record_version(store, version_id, parent, [save_delta(store, delta)], run_id,
                                 note=f"{algorithm} batch {batch_index} ({len(request_ids)} edits)")
    write_edit_rows(store, run_id, batch_index, version)
    return version
