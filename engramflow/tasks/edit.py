"""Batched editing stage, for every method: compute a batch's per-request work in shards
(`precompute_shard`, one task per worker: targets, or SCEN's experts), then edit the batch into the
parent version, store the artifact, commit the new model version and write the batch's `edits` rows
(`edit_batch`). Continual editing builds candidate versions instead (`edit_candidate`): its `edits`
rows are written for what the gate promotes."""

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
    record_derived_version,
    record_version,
    save_artifact,
    stable_id,
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


def candidate_version_id(base: Version, request_ids: list[str], remove: list[str], method: str,
                         hparams: dict[str, Any] | None, stats_keys: dict[int, str] | None,
                         stats_minus: dict[int, str] | None = None) -> str:
    """The id of the candidate `edit_candidate` builds: a hash of everything that determines it."""
    parts = [base.version_id, list(request_ids), sorted(remove), method, hparams or {},
             {str(k): v for k, v in (stats_keys or {}).items()}]
    if stats_minus:
        parts.append({str(k): v for k, v in stats_minus.items()})
    return stable_id("cand", *parts)


@task(name="edit-candidate", cache_policy=NO_CACHE)
def edit_candidate(base: Version, request_ids: list[str], remove: list[str], method: str,
                   hparams: dict[str, Any] | None, stats_keys: dict[int, str] | None, device: str = "cpu",
                   stats_minus: dict[int, str] | None = None) -> Version:
    """A candidate version: `base` without the live edits `remove` (corrected facts; a delta is one
    solve over its batch, so it goes whole and the rest of its batch is edited again with these
    requests; a state artifact loses exactly those), plus `request_ids` edited in as one batch. Its id
    is a hash of exactly that, so a bisect or a resumed tick asking again gets the recorded version
    (and per-request work from the cache). No `edits` rows: those are written for what is promoted, and
    no run: a candidate belongs to whichever tick promotes it (`engramflow revert`, which works on a
    run's newest version, does not apply; a correction or a rollback does)."""
    use_assigned_cpus()
    store = default_store()
    version_id = candidate_version_id(base, request_ids, remove, method, hparams, stats_keys, stats_minus)
    try:
        return get_version(store, version_id)
    except KeyError:
        pass
    removing = set(remove)
    keys: list[str] = []
    survivors: list[str] = []
    for key in base.delta_keys:
        artifact = load_artifact(store, key)
        hit = sorted(removing & set(artifact.request_ids))
        if not hit:
            keys.append(key)
            continue
        smaller = artifact.without(hit)
        if smaller is None:
            survivors += [r for r in artifact.request_ids if r not in removing and r not in request_ids]
        else:
            keys.append(save_artifact(store, smaller))
    state_key = base.state_key
    state = load_artifact(store, state_key) if state_key else None
    if state is not None and removing & set(state.request_ids):
        state = state.without(sorted(removing & set(state.request_ids)))
        state_key = save_artifact(store, state)
    stripped = Version(version_id, base.base_model, tuple(keys), base.version_id, None, state_key)
    model, tok = materialize(store, stripped, device=device, with_state=False)
    stats = load_moments(store, stats_keys, stats_minus) if stats_keys else None
    artifact = editors.edit(model, tok, fetch_requests(store, [*survivors, *request_ids]), method=method,
                            hparams=hparams, stats=stats, cache=request_cache(), state=state,
                            history=[load_artifact(store, key) for key in keys])
    key = save_artifact(store, artifact)
    delta_keys, new_state = ((*keys, key), state_key) if artifact.stacks else (tuple(keys), key)
    note = f"{method} candidate: {len(request_ids)} edits"
    if remove:
        note += f", {len(remove)} corrected, {len(survivors)} edited again with them"
    return record_derived_version(store, version_id, base, delta_keys, new_state, None, note)


# Each checks the ledger (and the cache) before it writes: rerunning one whose worker died applies nothing twice.
retry_on_worker_loss(precompute_shard)
retry_on_worker_loss(edit_batch)
retry_on_worker_loss(edit_candidate)
