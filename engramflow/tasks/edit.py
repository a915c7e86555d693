"""Batched editing stage, for every method: compute a batch's per-request work in shards
(`precompute_shard`, one task per worker: targets, or SCEN's experts), then edit the batch into the
parent version, store the artifact, commit the new model version and write the batch's `edits` rows
(`edit_batch`)."""

from __future__ import annotations

import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from engramflow import editors, home
from engramflow.ledger import (
    Version,
    batch_version_id,
    default_store,
    fetch_requests,
    get_version,
    load_artifact,
    materialize,
    record_version,
    save_artifact,
    write_edit_rows,
)
from engramflow.runtime import retry_on_worker_loss, use_assigned_cpus
from engramflow.tasks.stats import load_moments


def request_cache() -> editors.RequestCache:
    """Per-request results (optimised targets, SCEN experts) kept under the home: runs that start from
    the same weights (every method of `engramflow demo`, every point of a sweep) compute each once, and
    the shards of `precompute_shard` hand theirs to `edit_batch`."""
    return editors.RequestCache(home.cache_dir("requests"))


@task(name="precompute", cache_policy=NO_CACHE)
def precompute_shard(parent: Version, request_ids: list[str], method: str, hparams: dict[str, Any] | None,
                     device: str = "cpu") -> int:
    """Compute one shard of a batch's per-request work on `parent`'s weights into the request cache,
    where `edit_batch` then reads it. Returns the work done (0: all cached)."""
    use_assigned_cpus()
    store = default_store()
    model, tok = materialize(store, parent, device=device, with_state=False)
    return editors.precompute(model, tok, fetch_requests(store, request_ids), request_cache(), method=method,
                              hparams=hparams)


@task(name="edit-batch", cache_policy=NO_CACHE)
def edit_batch(run_id: str, batch_index: int, parent: Version, request_ids: list[str], method: str,
               hparams: dict[str, Any] | None, stats_keys: dict[int, str] | None, device: str = "cpu",
               stats_minus: dict[int, str] | None = None) -> Version:
    """Edit `request_ids` into `parent` (continuing its state artifact, reading any per-request work
    `precompute_shard` left in the cache; preservation statistics less `stats_minus`, the keys of the
    batch's own subjects' sentences); return the committed version (the recorded one if this batch was
    committed by an earlier, interrupted run: no edit is ever applied twice)."""
    use_assigned_cpus()
    store = default_store()
    version_id = batch_version_id(run_id, batch_index)
    seconds = None
    try:
        version = get_version(store, version_id)
    except KeyError:
        try:
            model, tok = materialize(store, parent, device=device, with_state=False)
            state = load_artifact(store, parent.state_key) if parent.state_key else None
            history = [load_artifact(store, key) for key in parent.delta_keys]
            stats = load_moments(store, stats_keys, stats_minus) if stats_keys else None
            start = time.perf_counter()
            artifact = editors.edit(model, tok, fetch_requests(store, request_ids), method=method, hparams=hparams,
                                    stats=stats, cache=request_cache(), state=state, history=history)
            seconds = time.perf_counter() - start
            key = save_artifact(store, artifact)  # an artifact with NaN or infinite entries is never stored
        except Exception as err:
            err.add_note(f"editing batch {batch_index} of run {run_id} on {parent.version_id}: nothing was committed")
            raise
        version = record_version(store, version_id, parent, artifact, key, run_id,
                                 note=f"{method} batch {batch_index} ({len(request_ids)} edits)")
    write_edit_rows(store, run_id, batch_index, version, seconds)
    return version


# Both check the ledger (and the cache) before they write: rerunning one whose worker died applies nothing twice.
retry_on_worker_loss(precompute_shard)
retry_on_worker_loss(edit_batch)
