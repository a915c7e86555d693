"""Named model versions for continual editing: aliases and their history, what stands behind a version,
how its edits are scored, and one tick at a time per alias.

An alias (`production`) points at the version of its newest `aliases` row. Rows are only ever added:
a promotion, a hand-set version and a rollback are each a row, so the history answers "what did
production serve on Tuesday, and who put it there". A rollback undoes the newest promotion or set that
has not been undone yet: the history replays as a stack (`rollback_target`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from engramflow import home
from engramflow.ledger import Version, fetch_requests, get_version, load_artifact, stable_id
from engramflow.storage import Store

ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Actions whose row pushes a version onto the alias's history; a rollback pops one.
PUSHES = ("create", "promote", "set")


def check_alias_name(alias: str) -> str:
    """The name itself (ValueError saying what is allowed otherwise): it names files and Prefect keys."""
    if not ALIAS_RE.match(alias or ""):
        raise ValueError(f"alias {alias!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                         "or digit")
    return alias


# --- the alias table -------------------------------------------------------------------------------
def alias_history(store: Store, alias: str | None = None) -> list[dict[str, Any]]:
    """The `aliases` rows of `alias` (every alias when None), oldest first."""
    table = store.read("aliases", filter=None if alias is None else pc.field("alias") == alias)
    return sorted(table.to_pylist(), key=lambda r: r["set_at"])


def current_alias(store: Store, alias: str) -> dict[str, Any] | None:
    """The newest row of `alias` (its `version` is what the alias points at); None if it has none."""
    rows = alias_history(store, alias)
    return rows[-1] if rows else None


def aliases(store: Store) -> list[dict[str, Any]]:
    """The newest row of every alias, by name."""
    newest: dict[str, dict[str, Any]] = {}
    for row in alias_history(store):
        newest[row["alias"]] = row
    return [newest[name] for name in sorted(newest)]


def set_alias(store: Store, alias: str, version_id: str, action: str, set_by: str, tick_id: str | None = None,
              algorithm: str | None = None, drop_ids: Sequence[str] = (), note: str | None = None,
              ) -> dict[str, Any]:
    """Point `alias` at a recorded version (KeyError naming it otherwise) with a new row; returns the row."""
    check_alias_name(alias)
    if action not in (*PUSHES, "rollback"):
        raise ValueError(f"unknown alias action {action!r}")
    get_version(store, version_id)
    before = current_alias(store, alias)
    row = {"alias": alias, "version": version_id, "previous_version": before["version"] if before else None,
           "action": action, "set_by": set_by, "tick_id": tick_id,
           "algorithm": algorithm or (before["algorithm"] if before else None), "drop_ids": list(drop_ids),
           "note": note}
    store.append("aliases", [row])
    return row


def rollback_target(history: Sequence[dict[str, Any]]) -> str:
    """The version a rollback returns to: replaying the history as a stack (create/promote/set push,
    rollback pops), the one under the top. ValueError when there is none."""
    stack: list[str] = []
    for row in history:
        if row["action"] == "rollback":
            stack.pop()
        else:
            stack.append(row["version"])
    if len(stack) < 2:
        name = history[-1]["alias"] if history else "this alias"
        raise ValueError(f"alias {name!r} has no earlier version to roll back to")
    return stack[-2]


def rollback(store: Store, alias: str, set_by: str = "engramflow rollback") -> dict[str, Any]:
    """Point `alias` back at its previous good version with a `rollback` row (nothing is deleted)."""
    history = alias_history(store, alias)
    if not history:
        raise KeyError(f"no alias {alias!r} in {store.root}")
    return set_alias(store, alias, rollback_target(history), "rollback", set_by,
                     note=f"rolled back from {history[-1]['version']}")


def resolve(store: Store, name: str) -> tuple[Version, str | None]:
    """(version, alias) for an alias name or a version id (KeyError naming both lookups otherwise)."""
    row = current_alias(store, name) if ALIAS_RE.match(name) else None
    if row is not None:
        return get_version(store, row["version"]), name
    try:
        return get_version(store, name), None
    except KeyError:
        raise KeyError(f"{name!r} is neither an alias nor a model version in {store.root}") from None


# --- what stands behind a version ------------------------------------------------------------------
@dataclass(frozen=True)
class LiveEdit:
    """An edit a version carries: the request, the artifact that carries it, and how."""

    request_id: str
    key: str  # the artifact's tensor key
    stacks: bool  # a delta (removable only with its whole batch) or a state artifact (removable alone)
    method: str
    layers: tuple[int, ...]


def live_edits(store: Store, version: Version) -> list[LiveEdit]:
    """Every edit behind `version`, in the order its artifacts apply them."""
    out: list[LiveEdit] = []
    for key in (*version.delta_keys, *([version.state_key] if version.state_key else [])):
        artifact = load_artifact(store, key)
        records = artifact.edit_records(artifact.request_ids)
        out += [LiveEdit(rid, key, artifact.stacks, artifact.method_name, tuple(records[rid]["layers"]))
                for rid in artifact.request_ids]
    return out


def lineage(store: Store, version: Version) -> list[str]:
    """The version ids from `version` back to its base, newest first."""
    parents = {r["version_id"]: r["parent_version"]
               for r in store.read("model_versions", columns=["version_id", "parent_version"]).to_pylist()}
    chain, current = [], version.version_id
    while current is not None and current not in chain:
        chain.append(current)
        current = parents.get(current)
    return chain


def edit_manifest(store: Store, version: Version) -> list[dict[str, Any]]:
    """One entry per edit behind `version`: the request, the method, layers and artifact that carry it,
    and the `edits` row that applied it (the newest in the version's lineage)."""
    edits = live_edits(store, version)
    requests = {r.request_id: r for r in fetch_requests(store, [e.request_id for e in edits])}
    ancestors = set(lineage(store, version))
    applied: dict[str, dict[str, Any]] = {}
    if edits:
        rows = store.read("edits", filter=pc.field("request_id").isin([e.request_id for e in edits])).to_pylist()
        for row in sorted(rows, key=lambda r: r["applied_at"]):
            if row["version_after"] in ancestors:
                applied[row["request_id"]] = row
    out = []
    for e in edits:
        r, row = requests[e.request_id], applied.get(e.request_id, {})
        out.append({
            "request_id": e.request_id, "subject": r.subject, "prompt": r.prompt, "target_new": r.target_new,
            "target_true": r.target_true, "relation": r.relation, "paraphrase_prompts": list(r.paraphrase_prompts),
            "method": e.method, "layers": list(e.layers), "artifact": e.key,
            "artifact_kind": "delta" if e.stacks else "state",
            "edit_id": row.get("edit_id"), "run_id": row.get("run_id"),
            "applied_at": row["applied_at"].isoformat() if row.get("applied_at") else None,
        })
    return out


# --- how edits are scored (the gate and the export alike) --------------------------------------------
def edit_scores(model: Any, tok: Any, requests: Sequence[Any]) -> dict[str, dict[str, float | None]]:
    """request id -> {"es", "ps"} on `model`: CounterFact's efficacy and paraphrase scores (new object
    preferred to the true one) where a request names its true object, else zsRE's token accuracy of the
    new object on the edit prompt and the paraphrases. `requests` as the method wants them scored."""
    from engramflow.editors.evaluation import EvalContext, evaluate

    with_true = [r for r in requests if r.target_true]
    without = [r.replace(neighborhood=()) for r in requests if not r.target_true]
    scores: dict[str, dict[str, float | None]] = {r.request_id: {"es": None, "ps": None} for r in requests}
    rename = {"es": "es", "ps": "ps", "efficacy": "es", "generality": "ps"}
    for protocol, batch in (("counterfact", with_true), ("zsre", without)):
        if not batch:
            continue
        # Neighbourhoods are not read: locality is the probes' and the retention set's business here.
        ctx = EvalContext(model, tok, edited=[r.replace(neighborhood=()) for r in batch])
        for row in evaluate(ctx, [protocol]):
            if row["metric"] in rename:
                scores[row["request_id"]][rename[row["metric"]]] = row["value"]
    return scores


# --- one tick at a time ------------------------------------------------------------------------------
class AliasBusy(RuntimeError):
    """Another tick holds the alias's lock; the message says which, since when and where."""


def lock_path(store: Store, alias: str) -> Path:
    """The alias's lock file: under the store for a local store, else under this home's state."""
    check_alias_name(alias)
    root = Path(store.path) / "locks" if store.local else home.state_dir("locks") / stable_id("store", store.root)
    root.mkdir(parents=True, exist_ok=True)
    return root / f"alias-{alias}.lock"


@contextmanager
def alias_lock(store: Store, alias: str, holder: str, wait: float = 0.0) -> Iterator[None]:
    """Hold the alias's lock (an advisory `flock`, released by the kernel even when the holder is
    killed); waits up to `wait` seconds for it, then raises AliasBusy naming the holder."""
    path = lock_path(store, alias)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise AliasBusy(f"alias {alias!r} is being ticked by {_holder(path)}") from None
                time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"holder": holder, "pid": os.getpid(), "host": socket.gethostname(),
                                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        info = {}
    if not info:
        return "another process"
    return f"{info.get('holder')} (pid {info.get('pid')} on {info.get('host')}, since {info.get('since')})"
