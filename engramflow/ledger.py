"""The edit ledger: run and version ids, what a run has committed, and materialising a model version.

A model version is a base model directory plus an ordered list of deltas kept in the store as
safetensors (`model_versions.delta_keys`); materialising it loads the base and applies the deltas
in order. Ids are deterministic (a hash of what defines them), so a flow that is killed and started
again finds its own rows, and the commit point of a batch is the `model_versions` row of the version
it produced: a batch with that row is never edited again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc

from engramflow.storage import Store


def stable_id(prefix: str, *parts: Any) -> str:
    """`prefix-<12 hex>` from the JSON of `parts`: the same inputs always give the same id."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return f"{prefix}-{hashlib.sha256(blob).hexdigest()[:12]}"


def base_version_id(base_model: str) -> str:
    """The version id of an unedited model directory (or hub id)."""
    return stable_id("base", base_model)


def batch_version_id(run_id: str, batch_index: int) -> str:
    return f"{run_id}-b{batch_index:04d}"


def edit_id(run_id: str, batch_index: int, request_id: str) -> str:
    return stable_id("edit", run_id, batch_index, request_id)


@dataclass(frozen=True)
class Version:
    version_id: str
    base_model: str
    delta_keys: tuple[str, ...]
    parent_version: str | None = None
    run_id: str | None = None
    bank_key: str | None = None  # SCEN expert bank attached on top of the deltas


def get_version(store: Store, version_id: str) -> Version:
    """The version row (KeyError naming the id when it is not recorded)."""
    table = store.read("model_versions", filter=pc.field("version_id") == version_id)
    if table.num_rows == 0:
        raise KeyError(f"model version {version_id!r} is not recorded in {store.root}")
    row = table.slice(table.num_rows - 1).to_pylist()[0]
    return Version(row["version_id"], row["base_model"], tuple(row["delta_keys"]),
                   row["parent_version"], row["run_id"], row["bank_key"])


def ensure_base_version(store: Store, base_model: str) -> Version:
    """Record the unedited model as a version once; return it."""
    version_id = base_version_id(base_model)
    try:
        return get_version(store, version_id)
    except KeyError:
        store.append("model_versions", [{"version_id": version_id, "run_id": None, "parent_version": None,
                                         "base_model": base_model, "delta_keys": [], "note": "unedited"}])
        return Version(version_id, base_model, ())


def record_version(store: Store, version_id: str, parent: Version, delta_keys: list[str],
                   run_id: str | None, note: str | None = None, bank_key: str | None = None) -> Version:
    """Append a version = `parent` + `delta_keys` (+ an expert bank replacing the parent's, if given).
    Idempotent: an existing row is returned as is."""
    try:
        return get_version(store, version_id)
    except KeyError:
        keys = [*parent.delta_keys, *delta_keys]
        bank = bank_key or parent.bank_key
        store.append("model_versions", [{"version_id": version_id, "run_id": run_id,
                                         "parent_version": parent.version_id, "base_model": parent.base_model,
                                         "delta_keys": keys, "bank_key": bank, "note": note}])
        return Version(version_id, parent.base_model, tuple(keys), parent.version_id, run_id, bank)


def committed_batches(store: Store, run_id: str) -> dict[int, str]:
    """batch index -> version id, for every batch of `run_id` whose version row is recorded."""
    table = store.read("model_versions", columns=["version_id", "run_id"],
                       filter=pc.field("run_id") == run_id)
    prefix = f"{run_id}-b"
    return {int(v[len(prefix):]): v for v in table.column("version_id").to_pylist() if v.startswith(prefix)}


def recorded_ids(store: Store, table: str, column: str, run_id: str) -> set[str]:
    """Values of `column` already recorded for `run_id` in `table` (for idempotent appends)."""
    rows = store.read(table, columns=[column, "run_id"], filter=pc.field("run_id") == run_id)
    return set(rows.column(column).to_pylist())


def save_delta(store: Store, delta: Any) -> str:
    """Store an `editors.Delta` as content-addressed safetensors; return its key."""
    tensors, metadata = delta.to_tensors()
    return store.put_tensors(tensors, metadata)


def load_delta(store: Store, key: str) -> Any:
    from engramflow.editors.delta import Delta

    return Delta.from_tensors(store.get_tensors(key), store.tensor_metadata(key))


def materialize(store: Store, version: Version | str, device: str = "cpu") -> tuple[Any, Any]:
    """Load the base model of `version`, apply its deltas in order and attach its expert bank:
    (model, tokenizer)."""
    from engramflow.editors.adapters import adapter_for
    from engramflow.models import load_model

    if isinstance(version, str):
        version = get_version(store, version)
    model, tok = load_model(version.base_model, device=device)
    adapter = adapter_for(model)
    # Added directly rather than via Delta.apply, which keeps a copy of each weight for an exact revert.
    for key in version.delta_keys:
        delta = load_delta(store, key)
        for layer in delta.layers:
            adapter.add_to_down_weight(model, layer, delta.matrix(layer))
    if version.bank_key:
        from engramflow.editors import scen

        bank = load_bank(store, version.bank_key)
        scen.attach(model, bank.layer, bank)
    return model, tok


def load_bank(store: Store, key: str) -> Any:
    from engramflow.editors.scen import ExpertBank

    return ExpertBank.from_tensors(store.get_tensors(key), store.tensor_metadata(key), source=f"tensor {key}")


def fetch_requests(store: Store, request_ids: list[str]) -> list[dict[str, Any]]:
    """Request rows in the order of `request_ids` (KeyError naming the first missing id)."""
    if not request_ids:
        return []
    table = store.read("requests", filter=pc.field("request_id").isin(request_ids))
    by_id = {row["request_id"]: row for row in table.to_pylist()}
    missing = [r for r in request_ids if r not in by_id]
    if missing:
        raise KeyError(f"requests not in the store: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return [by_id[r] for r in request_ids]


def write_edit_rows(store: Store, run_id: str, batch_index: int, version: Version) -> int:
    """Append the `edits` rows of a committed batch, rebuilt from its version row and the delta's
    metadata (so a flow killed between the commit and this write loses nothing). Idempotent."""
    key = version.delta_keys[-1]
    meta = store.tensor_metadata(key)
    request_ids = json.loads(meta["request_ids"])
    norms = json.loads(meta["frobenius_norms"])
    extra = json.loads(meta.get("meta", "{}"))
    done = recorded_ids(store, "edits", "edit_id", run_id)
    rows = [{
        "edit_id": edit_id(run_id, batch_index, rid), "run_id": run_id, "request_id": rid,
        "algorithm": meta["algorithm"], "layers": [int(layer) for layer in json.loads(meta["layers"])],
        "batch_index": batch_index, "version_before": version.parent_version,
        "version_after": version.version_id, "delta_key": key,
        "delta_norm": float(sum(v * v for v in norms.values()) ** 0.5),
        # wall time of the whole batch, shared out over its requests
        "seconds": float(extra.get("seconds", 0.0)) / max(1, len(request_ids)),
    } for rid in request_ids if edit_id(run_id, batch_index, rid) not in done]
    store.append("edits", rows)
    return len(rows)
