"""SCEN stages: stage 1 trains experts in chunks that run as parallel Ray tasks (each expert sees
only its own fact and the base weights, so they are independent); stage 2 adds a batch's experts to
the parent version's bank, trains their indexing neurons and commits the new version."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from engramflow.ledger import (
    Version,
    batch_version_id,
    edit_id,
    fetch_requests,
    get_version,
    load_bank,
    materialize,
    record_version,
    recorded_ids,
    stable_id,
)
from engramflow.storage import Store


def _weights_only(version: Version) -> Version:
    """The version's weights without its expert bank: what experts and neuron keys are computed on."""
    return Version(version.version_id, version.base_model, version.delta_keys)


@task(name="train-experts", cache_policy=NO_CACHE)
def train_experts(parent: Version, request_ids: list[str], layer: int, config: dict[str, Any]) -> str:
    """Stage 1 for a chunk of requests: one expert each; returns the tensor key of the chunk's experts."""
    from engramflow.editors.scen import ScenConfig, experts_to_tensors, train_expert
    from engramflow.runtime import use_assigned_cpus

    use_assigned_cpus()
    store = Store()
    model, tok = materialize(store, _weights_only(parent))
    cfg = ScenConfig(**config)
    experts = [train_expert(model, tok, r, layer, cfg) for r in fetch_requests(store, request_ids)]
    return store.put_tensors(*experts_to_tensors(experts))


def write_scen_rows(store: Store, run_id: str, batch_index: int, version: Version, request_ids: list[str],
                    expert_key: dict[str, str], seconds: dict[str, float]) -> None:
    """`experts` and `edits` rows of a committed SCEN batch (idempotent)."""
    bank = load_bank(store, version.bank_key)
    done = recorded_ids(store, "edits", "edit_id", run_id)
    experts, edits = [], []
    for rid in request_ids:
        if edit_id(run_id, batch_index, rid) in done:
            continue
        i = bank.index(rid)
        norm = float(bank.delta(i).double().norm())
        experts.append({"expert_id": stable_id("expert", run_id, rid), "run_id": run_id, "request_id": rid,
                        "layer": bank.layer, "rank": bank.config.rank, "expert_key": expert_key.get(rid, version.bank_key),
                        "neuron_key": version.bank_key, "bytes": bank.expert_nbytes(), "removed": False})
        edits.append({"edit_id": edit_id(run_id, batch_index, rid), "run_id": run_id, "request_id": rid,
                      "algorithm": "scen", "layers": [bank.layer], "batch_index": batch_index,
                      "version_before": version.parent_version, "version_after": version.version_id,
                      "delta_key": version.bank_key, "delta_norm": norm, "seconds": seconds.get(rid)})
    store.append("experts", experts)
    store.append("edits", edits)


@task(name="index-experts", cache_policy=NO_CACHE)
def index_experts(run_id: str, batch_index: int, parent: Version, request_ids: list[str], expert_keys: list[str],
                  layer: int, config: dict[str, Any]) -> Version:
    """Stage 2: this batch's experts join the parent's bank (old experts untouched), their neurons are
    trained against every earlier edit; the bank is stored and the new version committed."""
    import time

    from engramflow.editors.artifacts import to_safetensors
    from engramflow.editors.scen import ExpertBank, ScenConfig, add_requests, experts_from_tensors

    store = Store()
    version_id = batch_version_id(run_id, batch_index)
    expert_key, seconds = {}, {}
    try:
        version = get_version(store, version_id)
    except KeyError:
        model, tok = materialize(store, _weights_only(parent))
        cfg = ScenConfig(**config)
        bank = load_bank(store, parent.bank_key) if parent.bank_key else ExpertBank.for_model(model, layer, cfg)
        experts = []
        for key in expert_keys:
            chunk = experts_from_tensors(store.get_tensors(key), store.tensor_metadata(key))
            experts += chunk
            expert_key.update({e.request_id: key for e in chunk})
        by_id = {e.request_id: e for e in experts}
        start = time.perf_counter()
        add_requests(model, tok, bank, fetch_requests(store, request_ids), experts=[by_id[r] for r in request_ids])
        indexing = (time.perf_counter() - start) / max(1, len(request_ids))
        seconds = {rid: by_id[rid].seconds + indexing for rid in request_ids}
        bank_key = store.put_tensors(*to_safetensors(bank))
        version = record_version(store, version_id, parent, [], run_id, bank_key=bank_key,
                                 note=f"scen batch {batch_index} ({len(request_ids)} experts)")
    write_scen_rows(store, run_id, batch_index, version, request_ids, expert_key, seconds)
    return version
