"""The edit ledger: run and version ids, model versions, materialising and reverting them.

A model version is a base model directory plus the artifacts of the edits behind it: stacking ones
(deltas, `delta_keys`, applied in order) and at most one state artifact that each edit of its method
replaces (SCEN's expert bank, `state_key`). Artifacts are content-addressed safetensors in the store.
Ids are deterministic (a hash of what defines them), so a flow that is killed and started again finds
its own rows, and the commit point of a batch is the `model_versions` row of the version it produced:
a batch with that row is never edited again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow.compute as pc

from engramflow import home
from engramflow.storage import Store
from engramflow.storage import queries as q


def default_store() -> Store:
    """The store of the current home (`ENGRAMFLOW_STORE`, else `<home>/store`)."""
    return Store(home.store_root())


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
    delta_keys: tuple[str, ...]  # stacking artifacts, applied in order
    parent_version: str | None = None
    run_id: str | None = None
    state_key: str | None = None  # the state artifact attached on top (SCEN's bank), if any

    def weights_only(self) -> Version:
        """This version without its state artifact: the weights a state method computes on."""
        return Version(self.version_id, self.base_model, self.delta_keys, self.parent_version, self.run_id)


def _from_row(row: dict[str, Any]) -> Version:
    return Version(row["version_id"], row["base_model"], tuple(row["delta_keys"]), row["parent_version"],
                   row["run_id"], row["state_key"])


def _write_version(store: Store, version: Version, note: str | None) -> Version:
    """The one place a `model_versions` row is written: once per version id, even when two processes
    commit the same batch at once (the second gets the first's row)."""
    written = store.append_once("model_versions", [{
        "version_id": version.version_id, "run_id": version.run_id, "parent_version": version.parent_version,
        "base_model": version.base_model, "delta_keys": list(version.delta_keys), "state_key": version.state_key,
        "note": note}], "version_id")
    return version if written else get_version(store, version.version_id)


def get_version(store: Store, version_id: str) -> Version:
    """The version row (KeyError naming the id when it is not recorded)."""
    table = store.read("model_versions", filter=pc.field("version_id") == version_id)
    if table.num_rows == 0:
        raise KeyError(f"model version {version_id!r} is not recorded in {store.root}")
    return _from_row(table.slice(table.num_rows - 1).to_pylist()[0])


def ensure_base_version(store: Store, base_model: str) -> Version:
    """Record the unedited model as a version once; return it."""
    version_id = base_version_id(base_model)
    try:
        return get_version(store, version_id)
    except KeyError:
        return _write_version(store, Version(version_id, base_model, ()), "unedited")


def record_version(store: Store, version_id: str, parent: Version, artifact: Any, key: str, run_id: str | None,
                   note: str | None = None) -> Version:
    """Record version = `parent` + `artifact` (stored under `key`): stacked after the parent's deltas, or
    replacing its state. Idempotent: an existing row is returned as is."""
    try:
        return get_version(store, version_id)
    except KeyError:
        if artifact.stacks:
            version = Version(version_id, parent.base_model, (*parent.delta_keys, key), parent.version_id, run_id,
                              parent.state_key)
        else:
            version = Version(version_id, parent.base_model, parent.delta_keys, parent.version_id, run_id, key)
        return _write_version(store, version, note)


def record_derived_version(store: Store, version_id: str, parent: Version, delta_keys: tuple[str, ...],
                           state_key: str | None, run_id: str | None, note: str | None = None) -> Version:
    """Record a version made from `parent` with the given artifacts (some of the parent's taken out or
    replaced, a new one added). Idempotent: an existing row is returned as is."""
    try:
        return get_version(store, version_id)
    except KeyError:
        return _write_version(store, Version(version_id, parent.base_model, tuple(delta_keys), parent.version_id,
                                             run_id, state_key), note)


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


# --- runs ----------------------------------------------------------------------------------------
def record_run(store: Store, run_id: str, flow: str, algorithm: str | None, model: str | None,
               dataset: str | None, params: dict[str, Any], status: str, error: str | None = None) -> None:
    """Append a `runs` row for a status change (running, completed, failed)."""
    rows = store.read("runs", columns=["run_id", "started_at"], filter=pc.field("run_id") == run_id)
    now = datetime.now(timezone.utc)
    started = min(rows.column("started_at").to_pylist()) if rows.num_rows else now
    if error is not None:
        params = {**params, "error": error}
    store.append("runs", [{"run_id": run_id, "flow": flow, "algorithm": algorithm, "model": model,
                           "dataset": dataset, "params": json.dumps(params, sort_keys=True, default=str),
                           "status": status, "started_at": started,
                           "finished_at": None if status == "running" else now}])


# --- artifacts -----------------------------------------------------------------------------------
def save_artifact(store: Store, artifact: Any) -> str:
    """Store an edit artifact as content-addressed safetensors; return its key (ArtifactError naming the
    tensor, and so the layer, if any entry is NaN or infinite: such an artifact is never stored)."""
    from engramflow.editors.artifacts import to_safetensors

    artifact.check_finite()
    return store.put_tensors(*to_safetensors(artifact))


def load_artifact(store: Store, key: str) -> Any:
    """The artifact stored under `key` (a Delta, an expert bank, ...), its file verified against its key
    (`StoreDamageError` naming key and file otherwise)."""
    from engramflow.editors.artifacts import from_safetensors

    tensors, metadata = store.load_tensors(key)
    return from_safetensors(tensors, metadata, source=f"tensor {key}")


def materialize(store: Store, version: Version | str, device: str = "cpu", with_state: bool = True,
                ) -> tuple[Any, Any]:
    """Load the base model of `version`, merge its deltas in order and (with `with_state`) attach its
    state artifact: (model, tokenizer)."""
    from engramflow.models import load_model

    if isinstance(version, str):
        version = get_version(store, version)
    model, tok = load_model(version.base_model, device=device)
    for key in version.delta_keys:
        load_artifact(store, key).merge(model)
    if with_state and version.state_key:
        load_artifact(store, version.state_key).apply(model)
    return model, tok


def fetch_requests(store: Store, request_ids: list[str]) -> list[Any]:
    """Requests (`engramflow.editors.requests.Request`) in the order of `request_ids` (KeyError naming
    the first missing ids)."""
    from engramflow.editors.requests import Request

    if not request_ids:
        return []
    table = store.read("requests", filter=pc.field("request_id").isin(request_ids))
    by_id = {row["request_id"]: row for row in table.to_pylist()}
    missing = [r for r in request_ids if r not in by_id]
    if missing:
        raise KeyError(f"requests not in the store: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return [Request.from_mapping(by_id[r]) for r in request_ids]


def added_artifact(store: Store, version: Version) -> tuple[str, Any, set[str]]:
    """(key, artifact, request ids) of what a batch version added to its parent: its last delta, or its
    new state artifact and the requests that state holds beyond the parent's."""
    parent = get_version(store, version.parent_version) if version.parent_version else None
    if parent is None or version.state_key == parent.state_key:
        key = version.delta_keys[-1]
        artifact = load_artifact(store, key)
        return key, artifact, set(artifact.request_ids)
    artifact = load_artifact(store, version.state_key)
    old = set(load_artifact(store, parent.state_key).request_ids) if parent.state_key else set()
    return version.state_key, artifact, set(artifact.request_ids) - old


def write_edit_rows(store: Store, run_id: str, batch_index: int, version: Version, seconds: float | None,
                    ) -> int:
    """Append the `edits` rows (and `experts` rows, for artifacts that hold one expert per request) of a
    committed batch, rebuilt from its version row and stored artifact, so a flow killed between the
    commit and this write loses nothing. `seconds`: the batch's wall time (None when the batch was
    committed by an earlier, interrupted run). Idempotent."""
    key, artifact, added = added_artifact(store, version)
    done = recorded_ids(store, "edits", "edit_id", run_id)
    new_ids = [rid for rid in artifact.request_ids if rid in added and edit_id(run_id, batch_index, rid) not in done]
    records = artifact.edit_records(new_ids)
    rows = [{
        "edit_id": edit_id(run_id, batch_index, rid), "run_id": run_id, "request_id": rid,
        "algorithm": artifact.method_name, "layers": records[rid]["layers"],
        "batch_index": batch_index, "version_before": version.parent_version,
        "version_after": version.version_id, "delta_key": key, "delta_norm": records[rid]["norm"],
        "seconds": None if seconds is None else seconds / max(1, len(added)),  # shared out over the batch
    } for rid in new_ids]
    store.append_once("edits", rows, "edit_id")
    store.append_once("experts", [
        {"expert_id": stable_id("expert", run_id, rid), "run_id": run_id, "request_id": rid,
         "layer": records[rid]["layers"][0], "rank": records[rid].get("rank"), "expert_key": key,
         "neuron_key": key, "bytes": records[rid].get("bytes"), "removed": False}
        for rid in new_ids if records[rid].get("expert")], ("expert_id", "removed"))
    return len(rows)


# --- revert --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Revert:
    """A recorded revert: the new version, the version it was made from, and what was removed."""

    version: Version
    parent: Version
    edit: dict[str, Any]
    removed_key: str
    also_removed: list[dict[str, Any]]  # the other edits that had to go with it (the rest of a delta's batch)


def revert_edit(store: Store, edit_id_: str, run_id: str | None = None) -> Revert:
    """Record a model version = the newest version of the edit's run (or `run_id`) without the edit.
    An artifact that can drop one request (`without`: SCEN's bank) loses exactly that one; a delta is
    one solve over its whole batch, so the whole delta goes and its other edits with it
    (`also_removed`). The new version becomes the run's newest, so later reverts compose."""
    edit = q.edit_row(store, edit_id_)
    key = edit["delta_key"]
    if key is None:
        raise ValueError(f"edit {edit_id_!r} has no artifact recorded, so there is nothing to remove")
    run = run_id or edit["run_id"]
    parent = get_version(store, q.latest_version(store, run)["version_id"])
    if not load_artifact(store, key).stacks:
        # A state artifact was replaced by every later batch: the edit lives on in the newest state.
        if parent.state_key is None:
            raise ValueError(f"edit {edit_id_!r}: {parent.version_id}, the newest version of run {run!r}, has no "
                             "state artifact to remove it from")
        key = parent.state_key
    if key not in (*parent.delta_keys, parent.state_key):
        raise ValueError(f"edit {edit_id_!r}: its artifact {key[:12]}… is not in {parent.version_id}, the newest "
                         f"version of run {run!r} (already reverted, or never part of that run)")
    artifact = load_artifact(store, key)
    if edit["request_id"] not in artifact.request_ids:
        raise ValueError(f"edit {edit_id_!r}: its request is not in {parent.version_id} (already reverted?)")
    smaller = artifact.without([edit["request_id"]])
    if smaller is None:
        version = Version(stable_id("revert", parent.version_id, key), parent.base_model,
                          tuple(k for k in parent.delta_keys if k != key), parent.version_id, run, parent.state_key)
        others = [e for e in q.delta_edits(store, key) if e["edit_id"] != edit_id_]
    else:
        new_key = save_artifact(store, smaller)
        keys = tuple(new_key if k == key else k for k in parent.delta_keys)
        state = new_key if parent.state_key == key else parent.state_key
        version = Version(stable_id("revert", parent.version_id, edit_id_), parent.base_model, keys,
                          parent.version_id, run, state)
        others = []
        record = artifact.edit_records([edit["request_id"]])[edit["request_id"]]
        if record.get("expert"):
            store.append("experts", [{"expert_id": stable_id("expert", edit["run_id"], edit["request_id"]),
                                      "run_id": run, "request_id": edit["request_id"], "layer": record["layers"][0],
                                      "rank": record.get("rank"), "expert_key": key, "neuron_key": new_key,
                                      "bytes": 0, "removed": True}])
    _write_version(store, version, f"revert of {edit_id_}")
    return Revert(version=version, parent=parent, edit=edit, removed_key=key, also_removed=others)
