"""`continual_flow`: one tick of scheduled continual editing of a named model version (an alias).

    list the inbox -> take each new file once (by content hash) -> ingest (bad records to `rejects`)
    -> resolve conflicts (the newer request for a subject and prompt wins; a live edit it contradicts
    is replaced, not stacked on) -> edit in batches with the alias's method -> gate against the
    alias's current version, and when it fails find the offending requests by bisection -> promote
    what held -> record every decision

Every decision is a row: `drops` (each file, taken once), `drop_requests` (what became of each
request, and why), `gates`, `aliases`, `ticks`, and the usual `edits` / `metrics` of what was
promoted. Candidates are content-addressed versions, so a tick killed at any point is resumed by the
next one, which finds the taken drops, the built candidates and the gate rows where they were.
`scheduled_tick` is a deployment's entry point: it enters the pipeline runtime itself, so a served or
deployed run sends its tasks to Ray. docs/continual.md has the rules and what they cost.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow.compute as pc
from prefect import flow, get_run_logger
from prefect_ray.context import remote_options

from engramflow import home
from engramflow.aliases import AliasBusy, alias_lock, check_alias_name, current_alias, live_edits, set_alias
from engramflow.editors.methods import get_method
from engramflow.flows.batches import StatisticsNeeded, resolved_hparams
from engramflow.ledger import (
    Version,
    default_store,
    ensure_base_version,
    fetch_requests,
    get_version,
    record_run,
    stable_id,
    write_edit_rows,
)
from engramflow.models import default_corpus
from engramflow.runtime import cpu_options
from engramflow.storage import Store
from engramflow.tasks.edit import edit_candidate
from engramflow.tasks.evaluate import is_evaluated
from engramflow.tasks.gate import (
    GateSettings,
    decide,
    load_gate,
    measure_version,
    perplexity_texts,
    record_gate,
    select_probes,
)
from engramflow.tasks.ingest import ingest

# User file suffixes -> ingest format; any other format is named by a second suffix (`facts.zsre.json`).
USER_SUFFIXES = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet"}
COMPRESSIONS = ("gz", "bz2", "xz", "zst")
EXIT_KEPT_BACK = 3  # `continual tick`'s exit status when the gate kept any of a drop back


@dataclass
class ContinualConfig:
    """What one tick of an alias does (the deployment's parameters)."""

    inbox: str  # a folder or fsspec URL; files starting with "." or "_" are not taken (still being written)
    model: str  # the first tick of an alias starts from this model directory; later ones from the alias
    alias: str
    algorithm: str | None = None  # None: the alias's method (memit for a new alias)
    format: str | None = None  # None: from each file's suffix
    batch_size: int = 50
    hparams: dict[str, Any] = field(default_factory=dict)
    corpus: str | None = None  # statistics and default perplexity text; None: the organism's world, else "world"
    stats_tokens: int | None = None
    stats_shards: int = 2
    gate: str | dict[str, Any] | None = None  # a YAML file or overrides of tasks/gate_defaults.yaml
    wait: float = 0.0  # seconds to wait for a running tick of the same alias before skipping
    device: str = "cpu"
    edit_cpus: int = 2  # Ray CPUs (torch threads) of an edit or a measurement on the CPU


@dataclass
class TickResult:
    """What a tick did; `exit_code` is `continual tick`'s exit status."""

    tick_id: str
    alias: str
    status: str  # completed | skipped
    message: str
    version_before: str | None = None
    version_after: str | None = None
    drops: list[dict[str, Any]] = field(default_factory=list)
    promoted: int = 0
    quarantined: int = 0
    superseded: int = 0
    already_live: int = 0
    rejected: int = 0
    gate_evaluations: int = 0  # measured this tick
    gate_reused: int = 0  # found recorded by an interrupted tick
    edit_seconds: float = 0.0  # building candidates (targets, solves)
    gate_seconds: float = 0.0  # measuring them
    bisect_seconds: float = 0.0  # wall time from the first failed gate to the promoted version
    bisect_evaluations: int = 0  # gate evaluations after the first failed one
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_KEPT_BACK if self.quarantined else 0


def drop_format(name: str, given: str | None = None) -> str | None:
    """The ingest format of a drop file: `given`, else by suffix (.jsonl/.csv/.parquet, compressed or
    not), else a registered format named by the second suffix (`facts.counterfact.json`); None if none."""
    from engramflow.data.ingest import LOADERS

    if given:
        return given
    parts = name.lower().split(".")[1:]
    if parts and parts[-1] in COMPRESSIONS:
        parts = parts[:-1]
    if parts and parts[-1] in USER_SUFFIXES:
        return USER_SUFFIXES[parts[-1]]
    if len(parts) >= 2 and parts[-2] in LOADERS:
        return parts[-2]
    return None


def new_tick_id() -> str:
    return f"tick-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


# --- the inbox -------------------------------------------------------------------------------------
def list_inbox(inbox: str) -> list[dict[str, Any]]:
    """The inbox's files (not hidden ones: "." or "_" first), oldest first (modification time, then
    name): later files are newer, so their requests win conflicts."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(inbox)
    if not fs.isdir(root):
        raise FileNotFoundError(f"inbox {inbox} is not a directory")
    files = []
    for info in fs.ls(root, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") != "file" or name.startswith((".", "_")):
            continue
        mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        files.append({"path": info["name"], "name": name,
                      "url": info["name"] if local else fs.unstrip_protocol(info["name"]),
                      "mtime": mtime.timestamp() if isinstance(mtime, datetime) else float(mtime), "fs": fs})
    return sorted(files, key=lambda f: (f["mtime"], f["name"]))


def drop_rows(store: Store, alias: str) -> dict[str, list[dict[str, Any]]]:
    """drop id -> its `drops` rows (oldest first) for `alias`."""
    rows = store.read("drops", filter=pc.field("alias") == alias).to_pylist()
    out: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: r["recorded_at"]):
        out.setdefault(row["drop_id"], []).append(row)
    return out


def pending_drops(store: Store, alias: str) -> list[dict[str, Any]]:
    """Drops taken by a tick that never finished them (killed), in the order they were taken."""
    pending = [rows[-1] for rows in drop_rows(store, alias).values() if rows[-1]["status"] == "taken"]
    return sorted(pending, key=lambda r: (r["recorded_at"], r["position"]))


def take_drops(store: Store, cfg: ContinualConfig, tick_id: str) -> list[dict[str, Any]]:
    """Take every inbox file whose content this alias has not taken before: snapshot it under the home
    (so a resumed tick reads exactly what was taken) and record it, all in one append."""
    known = {rows[0]["sha256"] for rows in drop_rows(store, cfg.alias).values()}
    snapshots = home.state_dir("inbox") / cfg.alias
    snapshots.mkdir(parents=True, exist_ok=True)
    taken: list[dict[str, Any]] = []
    for f in list_inbox(cfg.inbox):
        data = f["fs"].cat_file(f["path"])
        sha = hashlib.sha256(data).hexdigest()
        if sha in known:
            continue
        known.add(sha)
        snapshot = snapshots / f"{sha[:16]}-{f['name']}"
        if not snapshot.exists():
            tmp = snapshots / f".{snapshot.name}.{uuid.uuid4().hex[:6]}"
            tmp.write_bytes(data)
            os.replace(tmp, snapshot)
        taken.append({"drop_id": stable_id("drop", cfg.alias, sha), "alias": cfg.alias, "source": f["url"],
                      "sha256": sha, "bytes": len(data), "format": drop_format(f["name"], cfg.format),
                      "position": len(taken), "tick_id": tick_id, "status": "taken",
                      "detail": json.dumps({"snapshot": str(snapshot)})})
    store.append("drops", taken)
    return taken


# --- one tick ----------------------------------------------------------------------------------------
@flow(name="continual", log_prints=True)
def continual_flow(cfg: ContinualConfig, tick_id: str | None = None) -> TickResult:
    """One tick of `cfg.alias`: take what is new in the inbox, edit it, gate it, promote what holds.
    A tick finding another tick of the alias running waits `cfg.wait` seconds, then skips (and says so)."""
    from prefect.runtime import flow_run

    check_alias_name(cfg.alias)
    store = default_store()
    tick_id = tick_id or new_tick_id()
    log = get_run_logger()
    started = datetime.now(timezone.utc)
    base_row = {"tick_id": tick_id, "alias": cfg.alias, "inbox": cfg.inbox, "flow_run_id": flow_run.id,
                "started_at": started}
    try:
        with alias_lock(store, cfg.alias, f"tick {tick_id}", cfg.wait):
            return _Tick(store, cfg, tick_id, base_row, log).run()
    except AliasBusy as busy:
        message = f"{busy}: tick {tick_id} skipped"
        log.warning(message)
        store.append("ticks", [{**base_row, "status": "skipped", "detail": message}])
        return TickResult(tick_id, cfg.alias, "skipped", message)


class _Tick:
    """The state of one tick while it runs (the flow above holds the alias's lock around it)."""

    def __init__(self, store: Store, cfg: ContinualConfig, tick_id: str, base_row: dict[str, Any], log: Any):
        self.store, self.cfg, self.tick_id, self.base_row, self.log = store, cfg, tick_id, base_row, log
        self.settings = load_gate(cfg.gate)
        self.start = time.perf_counter()

    def record(self, status: str, result: TickResult | None = None, detail: str | None = None) -> None:
        row = {**self.base_row, "status": status, "detail": detail}
        if result is not None:
            row.update(version_before=result.version_before, version_after=result.version_after,
                       n_drops=len(result.drops), n_promoted=result.promoted, n_quarantined=result.quarantined,
                       gate_evaluations=result.gate_evaluations, bisect_evaluations=result.bisect_evaluations,
                       bisect_seconds=result.bisect_seconds, detail=result.message)
        self.store.append("ticks", [row])

    def run(self) -> TickResult:
        self.record("running")
        try:
            result = self._run()
        except BaseException as err:
            self.record("failed", detail=f"{type(err).__name__}: {err}")
            raise
        result.seconds = time.perf_counter() - self.start
        self.record("completed", result)
        self.log.info(result.message)
        return result

    def _run(self) -> TickResult:
        parent, algorithm = self._start()
        result = TickResult(self.tick_id, self.cfg.alias, "completed", "", version_before=parent.version_id)
        pending = self._finish_interrupted(pending_drops(self.store, self.cfg.alias))
        if pending:
            self.log.info("resuming %d drop(s) taken by an interrupted tick", len(pending))
            parent = _Unit(self, parent, algorithm, pending, result).run()
        taken = take_drops(self.store, self.cfg, self.tick_id)
        if taken:
            parent = _Unit(self, parent, algorithm, taken, result).run()
        result.version_after = parent.version_id
        if not result.drops:
            result.message = f"{self.cfg.alias}: nothing new in {self.cfg.inbox}"
        else:
            result.message = (
                f"{self.cfg.alias}: {len(result.drops)} drop(s), {result.promoted} request(s) promoted, "
                f"{result.quarantined} quarantined, {result.superseded} superseded, {result.already_live} already "
                f"live, {result.rejected} rejected; {result.gate_evaluations} gate evaluation(s) "
                f"({result.bisect_evaluations} finding offenders, {result.bisect_seconds:.1f} s); "
                f"{self.cfg.alias} -> {parent.version_id}")
        return result

    def _start(self) -> tuple[Version, str]:
        """The alias's version and method; the first tick of an alias creates it on `cfg.model`."""
        row = current_alias(self.store, self.cfg.alias)
        if row is None:
            algorithm = self.cfg.algorithm or "memit"
            get_method(algorithm)
            base = ensure_base_version(self.store, self.cfg.model)
            set_alias(self.store, self.cfg.alias, base.version_id, "create", f"tick {self.tick_id}", self.tick_id,
                      algorithm, note=f"first tick: starts from {self.cfg.model}")
            return base, algorithm
        version = get_version(self.store, row["version"])
        if self.cfg.model and os.path.abspath(self.cfg.model) != os.path.abspath(version.base_model):
            self.log.warning("alias %s stands on %s (base %s): --model %s is only read by an alias's first tick",
                             self.cfg.alias, version.version_id, version.base_model, self.cfg.model)
        algorithm = self.cfg.algorithm or row["algorithm"] or "memit"
        get_method(algorithm)
        return version, algorithm

    def _finish_interrupted(self, pending: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Finish the drops a killed tick had already promoted (the alias row is the commit point; their
        outcome rows were written before it); return the rest, to be processed again."""
        row = current_alias(self.store, self.cfg.alias)
        done = set(row["drop_ids"]) if row and row["action"] == "promote" else set()
        for drop in [d for d in pending if d["drop_id"] in done]:
            outcomes = self.store.read("drop_requests", filter=(pc.field("drop_id") == drop["drop_id"])
                                       & (pc.field("version") == row["version"])).to_pylist()
            _finish_drop(self.store, drop, self.tick_id, outcomes[0]["run_id"] if outcomes else None, outcomes)
        return [d for d in pending if d["drop_id"] not in done]


class _Unit:
    """One set of drops edited, gated and promoted together."""

    def __init__(self, tick: _Tick, parent: Version, algorithm: str, drops: list[dict[str, Any]],
                 result: TickResult) -> None:
        self.tick, self.store, self.cfg, self.log = tick, tick.store, tick.cfg, tick.log
        self.settings: GateSettings = tick.settings
        self.parent, self.algorithm, self.drops, self.result = parent, algorithm, drops, result
        self.run_id = stable_id("con", self.cfg.alias, parent.version_id, sorted(d["drop_id"] for d in drops),
                                algorithm, self.cfg.hparams, self.cfg.batch_size)
        self.corpus = self.cfg.corpus or default_corpus(parent.base_model)
        self.outcomes: dict[tuple[str, str], dict[str, Any]] = {}  # (drop id, request id) -> outcome row
        self.gate_rows: dict[str, dict[str, Any]] = {}  # version id -> its latest gate row
        self.measured: dict[str, dict[str, Any]] = {}  # version id -> measurement
        self.quarantined: dict[str, dict[str, Any]] = {}  # request id -> reason and gate id
        self.current: dict[str, Any] | None = None  # the current version's measurement

    # --- the recipe ---------------------------------------------------------------------------------
    def run(self) -> Version:
        self.result.drops += [{"drop_id": d["drop_id"], "source": d["source"]} for d in self.drops]
        params = {"alias": self.cfg.alias, "tick_id": self.tick.tick_id, "drops": [d["source"] for d in self.drops],
                  "batch_size": self.cfg.batch_size, "hparams": self.cfg.hparams, "gate": self.settings.to_dict()}
        record_run(self.store, self.run_id, "continual", self.algorithm, self.parent.base_model,
                   ";".join(d["source"] for d in self.drops), params, "running")
        try:
            version = self._run()
        except BaseException as err:
            record_run(self.store, self.run_id, "continual", self.algorithm, self.parent.base_model,
                       ";".join(d["source"] for d in self.drops), params, "failed", f"{type(err).__name__}: {err}")
            raise
        record_run(self.store, self.run_id, "continual", self.algorithm, self.parent.base_model,
                   ";".join(d["source"] for d in self.drops), params, "completed")
        return version

    def _run(self) -> Version:
        entries = self._ingest()
        to_edit = self._resolve(entries)
        final, accepted = self.parent, []
        if to_edit:
            final, accepted = self._edit_and_gate(to_edit)
        for drop_id, rid in self.order:
            if (drop_id, rid) not in self.outcomes:
                promoted = rid in accepted
                self._outcome(drop_id, rid, "promoted" if promoted else "quarantined", final.version_id,
                              None if promoted else self.quarantined[rid]["reason"],
                              None if promoted else self.quarantined[rid]["gate_id"])
        self._write_outcomes()
        if final.version_id != self.parent.version_id:
            self._promote(final, accepted)
        for drop in self.drops:
            rows = [o for (d, _), o in self.outcomes.items() if d == drop["drop_id"]]
            _finish_drop(self.store, drop, self.tick.tick_id, self.run_id, rows, self.failed.get(drop["drop_id"]),
                         self.rejected.get(drop["drop_id"], 0))
        return final

    # --- ingest and conflicts -----------------------------------------------------------------------
    def _ingest(self) -> list[tuple[str, Any]]:
        """(drop id, request) of every valid request, oldest drop first, in file order; unreadable
        drops and their reasons in `self.failed`."""
        from engramflow.data.ingest import IngestError

        self.failed: dict[str, str] = {}
        self.rejected: dict[str, int] = {}
        entries: list[tuple[str, Any]] = []
        for drop in self.drops:
            if drop["format"] is None:
                self.failed[drop["drop_id"]] = (f"{drop['source']}: no ingest format: name it with --format, or "
                                                "end the file in .jsonl, .csv, .parquet or .<format>.json")
                continue
            snapshot = json.loads(drop["detail"])["snapshot"]
            try:
                ids = ingest.submit(snapshot, drop["format"]).result()
            except IngestError as err:
                self.failed[drop["drop_id"]] = str(err).replace(snapshot, drop["source"])
                continue
            self.rejected[drop["drop_id"]] = self.store.read(
                "rejects", columns=["source"], filter=(pc.field("source") == os.path.abspath(snapshot))
                & (pc.field("dataset") == drop["format"])).num_rows
            entries += [(drop["drop_id"], r) for r in fetch_requests(self.store, ids)]
        self.result.rejected += sum(self.rejected.values())
        for drop_id, reason in self.failed.items():
            self.log.warning("drop %s not read: %s", drop_id, reason)
        return entries

    def _resolve(self, entries: list[tuple[str, Any]]) -> list[Any]:
        """The requests to edit, newest per (subject, prompt); records the others' outcomes and which
        live edits each correction supersedes (`self.supersedes`)."""
        self.order = [(d, r.request_id) for d, r in entries]
        self.source = {d["drop_id"]: d["source"] for d in self.drops}
        newest: dict[tuple[str, str], int] = {}
        for i, (_, r) in enumerate(entries):
            newest[(r.subject, r.prompt)] = i
        self.live = live_edits(self.store, self.parent)
        live_requests = fetch_requests(self.store, [e.request_id for e in self.live])
        live_ids = {r.request_id for r in live_requests}
        live_by_fact: dict[tuple[str, str], list[Any]] = {}
        for r in live_requests:
            live_by_fact.setdefault((r.subject, r.prompt), []).append(r)
        self.requests = {r.request_id: r for _, r in entries} | {r.request_id: r for r in live_requests}
        self.supersedes: dict[str, list[str]] = {}
        to_edit: list[Any] = []
        for i, (drop_id, r) in enumerate(entries):
            j = newest[(r.subject, r.prompt)]
            if j != i:
                later_drop, later = entries[j]
                what = "the same request" if later.request_id == r.request_id else f"request {later.request_id}"
                self._outcome(drop_id, r.request_id, "superseded", self.parent.version_id,
                              f"{what} for this subject and prompt in a newer drop position "
                              f"({self.source[later_drop]})")
                self.result.superseded += 1
                continue
            olds = live_by_fact.get((r.subject, r.prompt), [])
            same = [o.request_id for o in olds if o.target_new == r.target_new]
            if r.request_id in live_ids or same:
                self._outcome(drop_id, r.request_id, "already_live", self.parent.version_id,
                              f"live behind {self.parent.version_id} as request "
                              f"{r.request_id if r.request_id in live_ids else same[0]}")
                self.result.already_live += 1
                continue
            if olds:
                self.supersedes[r.request_id] = [o.request_id for o in olds]
            to_edit.append(r)
        return to_edit

    def _outcome(self, drop_id: str, rid: str, outcome: str, version: str, reason: str | None = None,
                 gate_id: str | None = None) -> None:
        self.outcomes[(drop_id, rid)] = {
            "drop_id": drop_id, "alias": self.cfg.alias, "request_id": rid, "tick_id": self.tick.tick_id,
            "run_id": self.run_id, "outcome": outcome, "version": version,
            "supersedes": self.supersedes.get(rid, []) if outcome == "promoted" else [], "reason": reason,
            "gate_id": gate_id}

    def _write_outcomes(self) -> None:
        """Append the outcome rows not recorded for this run yet (a resumed run writes none twice)."""
        recorded = {(r["drop_id"], r["request_id"]) for r in self.store.read(
            "drop_requests", columns=["drop_id", "request_id", "run_id"],
            filter=pc.field("run_id") == self.run_id).to_pylist()}
        self.store.append("drop_requests", [o for k, o in self.outcomes.items() if k not in recorded])

    # --- editing and the gate -------------------------------------------------------------------------
    def _edit_and_gate(self, to_edit: list[Any]) -> tuple[Version, list[str]]:
        method = get_method(self.algorithm)
        base_model = ensure_base_version(self.store, self.parent.base_model)
        hp = resolved_hparams(method, base_model, self.cfg.hparams)
        spec = method.statistics(hp)
        self.stats_keys = self.stats_minus = None
        if spec is not None:
            needed = StatisticsNeeded(base_model, list(spec.layers), self.corpus, self.cfg.stats_shards,
                                      spec.max_tokens if self.cfg.stats_tokens is None else self.cfg.stats_tokens,
                                      self.cfg.device, spec.max_samples, spec.exclude_edited)
            self.stats_keys = needed.compute()
            if needed.exclude_edited:
                # What the sample says about the tick's subjects, subtracted in every candidate's edit (a
                # bisect's halves too: one pass over the sample per tick, not per candidate).
                self.stats_minus = needed.mentions(sorted({r.subject for r in to_edit}))
        self.index = {r.request_id: i for i, r in enumerate(to_edit)}
        live_ids = [e.request_id for e in self.live]
        excluded = sorted({self.requests[r].subject for r in live_ids} | {r.subject for r in to_edit})
        self.probes = select_probes.submit(self.settings, self.corpus, excluded).result()
        self.texts = perplexity_texts(self.settings, self.corpus, excluded)
        batches = plan_batches(to_edit, self.cfg.batch_size, set(self.supersedes))
        self.log.info("run %s: %d request(s) in %d batch(es) of at most %d with %s on %s; %d earlier edit(s), "
                      "%d probe(s)", self.run_id, len(to_edit), len(batches), self.cfg.batch_size, self.algorithm,
                      self.parent.version_id, len(live_ids), len(self.probes))
        # The current version is measured once, when the first candidate's edit leaves it a worker.
        with self._resources():
            current = measure_version.submit(self.parent, [r.request_id for r in to_edit] + live_ids, self.probes,
                                             self.texts, self.algorithm, self.cfg.hparams, self.cfg.device)
        self._current_future = current
        self.failed_at: float | None = None  # when the first gate failed
        evaluations = self.result.gate_evaluations
        final, accepted = self._settle(self.parent, [], batches, "drop")
        if self.failed_at is not None:
            self.result.bisect_seconds += time.perf_counter() - self.failed_at
            self.result.bisect_evaluations += self.result.gate_evaluations - evaluations - 1
        self.result.quarantined += len(self.quarantined)
        self.result.promoted += len(accepted)
        return final, accepted

    def _candidate(self, base: Version, ids: list[str]) -> Version:
        ids = sorted(ids, key=self.index.__getitem__)
        remove = sorted({old for r in ids for old in self.supersedes.get(r, [])})
        started = time.perf_counter()
        with self._resources():
            version = edit_candidate.submit(base, ids, remove, self.algorithm, self.cfg.hparams, self.stats_keys,
                                            self.cfg.device, self.stats_minus).result()
        self.result.edit_seconds += time.perf_counter() - started
        return version

    def _resources(self) -> Any:
        """Ray resources of an edit or a measurement: `edit_cpus` cores on the CPU, a GPU on CUDA."""
        return remote_options(**cpu_options(self.cfg.device, self.cfg.edit_cpus))

    def _current(self) -> dict[str, Any]:
        if self.current is None:
            self.current = self._current_future.result()
        return self.current

    def _earlier(self, own: list[str]) -> list[str]:
        corrected = {old for r in own for old in self.supersedes.get(r, [])}
        return [e.request_id for e in self.live if e.request_id not in corrected]

    def _gate(self, version: Version, own: list[str], stage: str) -> bool:
        """Gate `version` carrying the drop's requests `own` (recorded: reused); True when it holds."""
        own = sorted(own, key=self.index.__getitem__)
        gate_id = stable_id("gate", self.run_id, version.version_id, own, self.settings.to_dict())
        found = self.store.read("gates", filter=pc.field("gate_id") == gate_id).to_pylist()
        if found:
            self.result.gate_reused += 1
            row = found[-1]
        else:
            earlier = self._earlier(own)
            started = time.perf_counter()
            current = self._current()
            with self._resources():
                m = measure_version.submit(version, own + earlier, self.probes, self.texts, self.algorithm,
                                           self.cfg.hparams, self.cfg.device).result()
            self.result.gate_seconds += time.perf_counter() - started
            self.measured[version.version_id] = m
            decision = decide(current, m, own, earlier, self.settings)
            self.result.gate_evaluations += 1
            row = {"gate_id": gate_id, "tick_id": self.tick.tick_id, "run_id": self.run_id, "alias": self.cfg.alias,
                   "candidate_version": version.version_id, "current_version": self.parent.version_id,
                   "evaluation": self.result.gate_evaluations + self.result.gate_reused,
                   "stage": stage, "request_ids": own, **decision.values,
                   "passed": decision.passed, "reason": decision.reason, "seconds": m["seconds"]}
            record_gate(self.store, row)
        self.gate_rows[version.version_id] = row
        if not row["passed"] and self.failed_at is None:
            self.failed_at = time.perf_counter()
        self.log.info("gate %s of %s (%s, %d request(s)): %s", row["evaluation"], version.version_id, stage,
                      len(own), row["reason"])
        return bool(row["passed"])

    def _settle(self, base: Version, accepted: list[str], batches: list[list[str]], stage: str,
                ) -> tuple[Version, list[str]]:
        """Edit `batches` one on top of the other from `base` (which holds with `accepted`) and gate the
        result; when it fails, find the first batch that breaks it (bisecting the built prefixes), keep
        that batch's largest part that holds (`_grow`), and settle the later batches on top of that."""
        if not batches:
            return base, accepted
        versions = [base]
        for batch in batches:
            versions.append(self._candidate(versions[-1], batch))
        if self._gate(versions[-1], accepted + [r for b in batches for r in b], stage):
            return versions[-1], accepted + [r for b in batches for r in b]
        lo, hi = 0, len(batches)  # versions[lo] holds, versions[hi] fails
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._gate(versions[mid], accepted + [r for b in batches[:mid] for r in b], "prefix"):
                lo = mid
            else:
                hi = mid
        prior = accepted + [r for b in batches[:lo] for r in b]
        failing = batches[lo]
        if len(failing) == 1:
            self._quarantine(failing[0], versions[hi])
            kept_version, kept = versions[lo], []
        else:
            half = len(failing) // 2
            kept_version, kept = self._grow(versions[lo], prior, [], versions[lo], failing[:half])
            kept_version, kept = self._grow(versions[lo], prior, kept, kept_version, failing[half:])
        return self._settle(kept_version, prior + kept, batches[lo + 1:], "rest")

    def _grow(self, base: Version, prior: list[str], kept: list[str], kept_version: Version,
              trying: list[str]) -> tuple[Version, list[str]]:
        """Add to `kept` (whose candidate on `base` holds, as `kept_version`) the largest part of `trying`
        that still holds, halving what fails down to single requests, which are quarantined."""
        if not trying:
            return kept_version, kept
        together = kept + trying
        version = self._candidate(base, together)
        if self._gate(version, prior + together, "bisect"):
            return version, together
        if len(trying) == 1:
            self._quarantine(trying[0], version)
            return kept_version, kept
        half = len(trying) // 2
        kept_version, kept = self._grow(base, prior, kept, kept_version, trying[:half])
        return self._grow(base, prior, kept, kept_version, trying[half:])

    def _quarantine(self, rid: str, failed: Version) -> None:
        row = self.gate_rows[failed.version_id]
        kept = self.supersedes.get(rid)
        note = f" (a correction of live request(s) {', '.join(kept)}, which stay)" if kept else ""
        self.quarantined[rid] = {"reason": f"gate {row['evaluation']} with this request failed{note}: {row['reason']}",
                                 "gate_id": row["gate_id"]}
        self.log.warning("quarantined request %s: %s", rid, row["reason"])

    # --- promotion ------------------------------------------------------------------------------------
    def _promote(self, final: Version, accepted: list[str]) -> None:
        """Write the promoted version's `edits` and `metrics` rows, then the alias row: the commit point."""
        chain = []
        version = final
        while version.version_id != self.parent.version_id:
            chain.append(version)
            version = get_version(self.store, version.parent_version)
        for index, version in enumerate(reversed(chain)):
            write_edit_rows(self.store, self.run_id, index, version, None)
        self._write_metrics(final, accepted)
        drop_ids = [d["drop_id"] for d in self.drops if d["drop_id"] not in self.failed]
        set_alias(self.store, self.cfg.alias, final.version_id, "promote", f"tick {self.tick.tick_id}",
                  self.tick.tick_id, self.algorithm, drop_ids,
                  note=f"{len(accepted)} edit(s) of run {self.run_id}, {len(self.quarantined)} quarantined")
        self.log.info("promoted %s -> %s (%d edits)", self.cfg.alias, final.version_id, len(accepted))

    def _write_metrics(self, final: Version, accepted: list[str]) -> None:
        """The current version at step -1 and the promoted one at step 0, as `engramflow report RUN`
        reads them: ES/PS of the drop's and the earlier edits, probe top-1, perplexity."""
        earlier = self._earlier(accepted)
        if final.version_id not in self.measured:  # its gate row was found, not measured this time
            with self._resources():
                self.measured[final.version_id] = measure_version.submit(
                    final, accepted + earlier, self.probes, self.texts, self.algorithm, self.cfg.hparams,
                    self.cfg.device).result()
        for step, version, m in ((-1, self.parent, self._current()), (0, final, self.measured[final.version_id])):
            if is_evaluated(self.store, self.run_id, version.version_id):
                continue
            rows = []
            for rid, scores in m["scores"].items():
                counterfact = bool(self.requests[rid].target_true)
                names = {"es": "es", "ps": "ps"} if counterfact else {"es": "efficacy", "ps": "generality"}
                rows += [{"request_id": rid, "protocol": "counterfact" if counterfact else "zsre",
                          "metric": names[k], "value": v} for k, v in scores.items() if v is not None]
            rows += [{"request_id": p, "protocol": "probe", "metric": "top1", "value": v}
                     for p, v in m["probe_top1"].items()]
            if m["perplexity"] is not None:
                rows.append({"request_id": None, "protocol": "model", "metric": "perplexity", "value": m["perplexity"]})
            for row in rows:
                row.update(run_id=self.run_id, model_version=version.version_id, step=step)
            self.store.append("metrics", rows)


def plan_batches(requests: list[Any], batch_size: int, corrections: set[str]) -> list[list[str]]:
    """Request ids in batches of at most `batch_size`, no subject twice in a batch (a key-value edit
    would be asked for two values at one key); corrections all in the first batch, where the deltas
    they replace are edited again with them."""
    batches: list[list[str]] = []
    subjects: list[set[str]] = []
    first = [r for r in requests if r.request_id in corrections]
    if first:
        batches.append([r.request_id for r in first])
        subjects.append({r.subject for r in first})
    for r in requests:
        if r.request_id in corrections:
            continue
        for batch, seen in zip(batches, subjects, strict=True):
            if len(batch) < batch_size and r.subject not in seen:
                batch.append(r.request_id)
                seen.add(r.subject)
                break
        else:
            batches.append([r.request_id])
            subjects.append({r.subject})
    return batches


def _finish_drop(store: Store, drop: dict[str, Any], tick_id: str, run_id: str | None,
                 outcomes: list[dict[str, Any]], failed: str | None = None, rejected: int = 0) -> None:
    """The drop's final `drops` row: its status and counts."""
    counts = {o: sum(1 for r in outcomes if r["outcome"] == o) for o in ("promoted", "quarantined")}
    if failed:
        status = "failed"
    elif counts["quarantined"]:
        status = "partial" if counts["promoted"] else "quarantined"
    else:
        status = "promoted" if counts["promoted"] else "empty"
    store.append("drops", [{**{k: drop[k] for k in ("drop_id", "alias", "source", "sha256", "bytes", "format",
                                                     "position")},
                            "tick_id": tick_id, "run_id": run_id, "status": status, "n_requests": len(outcomes),
                            "n_rejected": rejected, "n_promoted": counts["promoted"],
                            "n_quarantined": counts["quarantined"], "detail": failed or drop["detail"]}])


# --- the deployment's entry point ------------------------------------------------------------------
@flow(name="continual-tick", log_prints=True)
def scheduled_tick(inbox: str, model: str, alias: str, algorithm: str | None = None, gate: str | None = None,
                   format: str | None = None, batch_size: int = 50, hparams: dict[str, Any] | None = None,
                   corpus: str | None = None, wait: float = 0.0, device: str = "cpu",
                   ray_address: str | None = None) -> dict[str, Any]:
    """One tick of `alias` as a deployment runs it: inside the pipeline runtime (the Prefect API at
    PREFECT_API_URL, Ray local or at `ray_address`), so its tasks run on Ray."""
    from engramflow.models import resolve_model
    from engramflow.runtime import pipeline_runtime, task_runner

    home.quiet_env()
    cfg = ContinualConfig(inbox=inbox, model=resolve_model(model), alias=alias, algorithm=algorithm, gate=gate,
                          format=format, batch_size=batch_size, hparams=dict(hparams or {}), corpus=corpus,
                          wait=wait, device=device)
    with pipeline_runtime(ray_address=ray_address):
        result = continual_flow.with_options(task_runner=task_runner())(cfg)
    return {**asdict(result), "exit_code": result.exit_code}
