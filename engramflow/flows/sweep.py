"""`sweep_flow`: a grid of runs fanned out on a Ray cluster, one `sweeps` row per cell and status change.

A sweep spec (YAML) names the sweep, the run options every cell shares (`base`, spelled as `engramflow
run sequential`'s options with underscores) and a `grid` (option -> values; the cells are the product).
Each cell is the run `engramflow run sequential` with those options would start, with the same run id:
a cell whose run has completed is not run again, a killed sweep resumes, a failed cell runs again.

Shared stages run once, in the driver, before any cell goes out: one ingest per dataset, one causal trace
per sample, covariance statistics per key (every layer any cell needs, in one pass), and the first batch's
per-request work (targets, experts) on the unedited weights. Cells then find them recorded and only read
them, so no two cells ever compute one key at once. That is chosen over a lock in the store because every
key is known from the spec before anything runs, the store may be an object store without an atomic
create-if-absent (`s3://`), and a killed holder would leave a lock behind. The shared work itself runs on
the cluster: statistics shards in parallel, first-batch work in rounds of units that share no request.

Each cell is a Ray task with the spec's resources (CPUs, GPUs, memory) that runs the sequential flow
in its own process: its stages run in threads on the cores (or GPU) the cell holds, so Ray's resource
accounting bounds the parallelism and a cell never waits on a second scheduling round for its stages.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect_ray.context import remote_options

from engramflow.data.selection import select_requests
from engramflow.editors.methods import get_method, load_all
from engramflow.flows.batches import (
    LOCATE_SAMPLE,
    _layers,
    method_hparams,
    statistics_needed,
)
from engramflow.flows.config import RunConfig
from engramflow.ledger import (
    committed_batches,
    default_store,
    ensure_base_version,
    fetch_requests,
    stable_id,
)
from engramflow.runtime import cpu_options, gpu_options
from engramflow.storage import Store
from engramflow.storage import queries as q
from engramflow.tasks.edit import precompute_shard
from engramflow.tasks.evaluate import protocols_for
from engramflow.tasks.ingest import ingest

FLOW = "sequential"  # a cell is the run `engramflow run sequential` would start
SPEC_KEYS = ("name", "description", "base", "grid", "resources", "max_parallel")
# The run options a spec may set, as `engramflow run sequential` spells them (with underscores), and the
# RunConfig field each sets; `stats_tokens` / `stats_shards` are RunConfig's, not the CLI's.
OPTIONS = {
    "algorithm": "algorithm", "model": "model", "dataset": "dataset", "format": "format", "n": "n",
    "batch_size": "batch_size", "layers": "layers", "window": "window", "hparams": "hparams",
    "corpus": "corpus", "n_probes": "n_probes", "eval": "protocols", "seed": "seed", "device": "device",
    "shards": "shards", "stats_tokens": "stats_tokens", "stats_shards": "stats_shards",
}
# `engramflow run sequential`'s defaults (tests/test_sweep.py checks them against the CLI's): a cell that
# leaves an option out is the run that command starts without it. batch_size None: all n at once.
CLI_DEFAULTS: dict[str, Any] = {
    "model": "organism", "dataset": "world", "format": "world", "n": 50, "batch_size": None, "layers": "preset",
    "window": 1, "hparams": {}, "corpus": None, "n_probes": 100, "eval": None, "seed": 0, "device": "cpu",
    "shards": None,
}
HPARAM_AXIS = "hparams."  # a grid axis `hparams.<key>` sets one hyper-parameter override
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
MEMORY_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
                "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


class SpecError(ValueError):
    """A sweep spec that cannot run; the message names the spec file and the field."""


@dataclass(frozen=True)
class Cell:
    """One point of the grid: the run it is."""

    index: int
    axes: dict[str, Any]  # swept option -> value
    config: RunConfig

    @property
    def run_id(self) -> str:
        return self.config.run_id(FLOW)


@dataclass(frozen=True)
class Resources:
    """What each cell asks Ray for. num_gpus None: one GPU for a cell on cuda, none on the CPU."""

    num_cpus: float = 1
    num_gpus: float | None = None
    memory: int | None = None  # bytes

    def for_cell(self, cfg: RunConfig) -> dict[str, float]:
        gpus = self.num_gpus if self.num_gpus is not None else (1 if cfg.device.startswith("cuda") else 0)
        options: dict[str, float] = {"num_cpus": self.num_cpus, "num_gpus": gpus}
        if self.memory:
            options["memory"] = self.memory
        return options


@dataclass(frozen=True)
class Sweep:
    """A parsed spec: the sweep's id, its cells and what each asks for."""

    name: str
    cells: list[Cell]
    resources: Resources = field(default_factory=Resources)
    max_parallel: int | None = None
    description: str = ""

    @property
    def grid_id(self) -> str:
        return stable_id("grid", [c.run_id for c in self.cells])


# --- the spec --------------------------------------------------------------------------------------
def load_spec(path: str | Path, resolve_model: Any = None) -> Sweep:
    """Parse and check a sweep spec; `resolve_model` turns a model name into its directory (the CLI's
    `engramflow.models.resolve_model`). SpecError naming the file and field for anything wrong, before any
    work starts."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SpecError(f"{path}: cannot read the sweep spec: {err}") from None
    return parse_spec(raw, source=str(path), base_dir=path.parent, resolve_model=resolve_model)


def parse_spec(raw: Any, source: str = "spec", base_dir: Path | None = None, resolve_model: Any = None) -> Sweep:
    """A Sweep from a spec's mapping (see `load_spec`)."""
    def fail(where: str, message: str) -> SpecError:
        return SpecError(f"{source}: {where}: {message}")

    if not isinstance(raw, Mapping):
        raise SpecError(f"{source}: a sweep spec is a mapping with {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise fail(unknown[0], f"unknown key; a spec has {', '.join(SPEC_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise fail("name", f"the sweep's id is required: letters, digits, '.', '_', '-' (got {name!r})")
    base = raw.get("base") or {}
    grid = raw.get("grid") or {}
    if not isinstance(base, Mapping):
        raise fail("base", "a mapping of run options")
    if not isinstance(grid, Mapping) or not grid:
        raise fail("grid", "a mapping of run option -> list of values, with at least one option")
    for key in base:
        _check_option(key, fail, "base")
    if any(key.startswith(HPARAM_AXIS) for key in base):
        raise fail("base", "set hyper-parameters in base as `hparams: {key: value}`")
    axes: list[tuple[str, list[Any]]] = []
    for key, values in grid.items():
        if not key.startswith(HPARAM_AXIS):
            _check_option(key, fail, "grid")
        elif key == HPARAM_AXIS:
            raise fail(f"grid.{key}", "name the hyper-parameter: hparams.<key>")
        if not isinstance(values, list) or not values:
            raise fail(f"grid.{key}", f"a non-empty list of values (got {values!r})")
        axes.append((key, values))

    max_parallel = raw.get("max_parallel")
    if max_parallel is not None and (not _is_int(max_parallel) or max_parallel < 1):
        raise fail("max_parallel", f"a positive integer (got {max_parallel!r})")
    resources = _resources(raw.get("resources"), fail)

    load_all()
    cells = []
    for index, combo in enumerate(itertools.product(*(values for _, values in axes))):
        options = {**CLI_DEFAULTS, **base}
        options["hparams"] = _hparams(options.get("hparams"), fail, "base.hparams", base_dir)
        point: dict[str, Any] = {}
        for (key, _), value in zip(axes, combo, strict=True):
            where = f"grid.{key}"
            point[key] = value
            if key.startswith(HPARAM_AXIS):
                options["hparams"] = {**options["hparams"], key[len(HPARAM_AXIS):]: value}
            elif key == "hparams":
                options["hparams"] = {**options["hparams"], **_hparams(value, fail, where, base_dir)}
            else:
                options[key] = value
        cells.append(Cell(index, point, _config(options, fail, f"cell {index} ({_describe(point)})")))
    _check_distinct(cells, fail)
    if resolve_model is not None:  # only once every cell is known good: resolving may build the organism
        resolved = {m: str(resolve_model(m)) for m in dict.fromkeys(c.config.model for c in cells)}
        cells = [replace(c, config=replace(c.config, model=resolved[c.config.model])) for c in cells]
        _check_distinct(cells, fail)  # two names of one model
    return Sweep(name, cells, resources, max_parallel, str(raw.get("description") or "").strip())


def _check_distinct(cells: list[Cell], fail: Any) -> None:
    seen: dict[str, int] = {}
    for cell in cells:
        if cell.run_id in seen:
            raise fail("grid", f"cells {seen[cell.run_id]} and {cell.index} are the same run "
                               f"({_describe(cells[seen[cell.run_id]].axes)} and {_describe(cell.axes)})")
        seen[cell.run_id] = cell.index


def _describe(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, dict | list) else v}" for k, v in point.items())


def _check_option(key: Any, fail: Any, where: str) -> None:
    if key not in OPTIONS:
        raise fail(f"{where}.{key}", f"unknown run option; options: {', '.join(OPTIONS)}"
                                     + (", hparams.<key>" if where == "grid" else ""))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hparams(value: Any, fail: Any, where: str, base_dir: Path | None) -> dict[str, Any]:
    """Overrides from a mapping, a YAML/JSON file (relative to the spec) or a JSON object string."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
            path = base_dir / path
        if path.exists():
            import yaml

            loaded = yaml.safe_load(path.read_text()) or {}
            if isinstance(loaded, Mapping):
                return dict(loaded)
        try:
            loaded = json.loads(value)
        except json.JSONDecodeError:
            loaded = None
        if isinstance(loaded, Mapping):
            return dict(loaded)
    raise fail(where, f"hyper-parameter overrides are a mapping, a YAML/JSON file or a JSON object (got {value!r})")


def _config(options: dict[str, Any], fail: Any, where: str) -> RunConfig:
    """The RunConfig `engramflow run sequential` builds from these options."""
    def integer(key: str, low: int | None = 1, optional: bool = False) -> int | None:
        value = options[key]
        if value is None and optional:
            return None
        if not _is_int(value) or (low is not None and value < low):
            raise fail(where, f"{key} must be an integer{f' >= {low}' if low is not None else ''} (got {value!r})")
        return value

    def text(key: str, optional: bool = False) -> str | None:
        value = options[key]
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise fail(where, f"{key} must be a string (got {value!r})")
        return value

    algorithm = options.get("algorithm")
    if algorithm is None:
        raise fail(where, "no algorithm: set `algorithm` in base or grid")
    try:
        get_method(str(algorithm))
    except (KeyError, ValueError) as err:
        raise fail(where, f"algorithm: {err}") from None
    layers = options["layers"]
    if _is_int(layers):
        layers = str(layers)
    elif isinstance(layers, list) and layers and all(_is_int(x) for x in layers):
        layers = ",".join(map(str, layers))
    if not isinstance(layers, str) or not (layers in ("preset", "auto") or re.fullmatch(r"\d+(,\d+)*", layers)):
        raise fail(where, f"layers is 'preset', 'auto', a layer or a list of layers (got {options['layers']!r})")
    protocols = options["eval"]
    if isinstance(protocols, str):
        protocols = [p.strip() for p in protocols.split(",") if p.strip()]
    if protocols is not None and (not isinstance(protocols, list) or not all(isinstance(p, str) for p in protocols)):
        raise fail(where, f"eval is a list of evaluation protocols (got {options['eval']!r})")
    model = text("model")
    n = integer("n")
    cfg = RunConfig(
        algorithm=str(algorithm), model=model, dataset=text("dataset"), format=text("format"), n=n,
        batch_size=integer("batch_size", optional=True) or n, hparams=options["hparams"], layers=layers,
        window=integer("window"), corpus=text("corpus", optional=True), n_probes=integer("n_probes", low=0),
        protocols=protocols, seed=integer("seed", low=None), device=text("device"),
        shards=integer("shards", optional=True))
    if "stats_tokens" in options:
        cfg = replace(cfg, stats_tokens=integer("stats_tokens", optional=True))
    if "stats_shards" in options:
        cfg = replace(cfg, stats_shards=integer("stats_shards"))
    return cfg


def _resources(raw: Any, fail: Any) -> Resources:
    if raw is None:
        return Resources()
    if not isinstance(raw, Mapping):
        raise fail("resources", "a mapping with num_cpus, num_gpus, memory")
    unknown = sorted(set(raw) - {"num_cpus", "num_gpus", "memory"})
    if unknown:
        raise fail(f"resources.{unknown[0]}", "unknown; resources are num_cpus, num_gpus, memory")
    for key in ("num_cpus", "num_gpus"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            raise fail(f"resources.{key}", f"a non-negative number (got {value!r})")
    memory = raw.get("memory")
    if memory is not None:
        match = MEMORY_RE.match(str(memory))
        if not match or (match.group(2) or "").lower() not in MEMORY_UNITS:
            raise fail("resources.memory", f"bytes, or a size such as 4GiB or 512MB (got {memory!r})")
        memory = int(float(match.group(1)) * MEMORY_UNITS[(match.group(2) or "").lower()])
    return Resources(raw.get("num_cpus", 1), raw.get("num_gpus"), memory)


# --- the ledger of a sweep -------------------------------------------------------------------------
def _now() -> datetime:
    return datetime.now(timezone.utc)


def record_cell(store: Store, sweep_id: str, grid_id: str, attempt: str, cell: Cell, status: str, *,
                reused: bool = False, error: str | None = None, node_id: str | None = None,
                hostname: str | None = None, started_at: datetime | None = None,
                finished_at: datetime | None = None) -> None:
    """Append one `sweeps` row: a status change of `cell`."""
    store.append("sweeps", [{
        "sweep_id": sweep_id, "cell": cell.index, "run_id": cell.run_id, "flow": FLOW,
        "axes": json.dumps(cell.axes, default=str), "grid_id": grid_id, "attempt": attempt, "status": status,
        "reused": reused, "error": error, "node_id": node_id, "hostname": hostname, "started_at": started_at,
        "finished_at": finished_at}])


def completed_runs(store: Store, run_ids: list[str]) -> set[str]:
    """Those of `run_ids` whose newest `runs` row says completed."""
    import pyarrow.compute as pc

    rows = store.read("runs", columns=["run_id", "status", "updated_at"], filter=pc.field("run_id").isin(run_ids))
    newest: dict[str, tuple[Any, str]] = {}
    for row in rows.to_pylist():
        if row["run_id"] not in newest or row["updated_at"] >= newest[row["run_id"]][0]:
            newest[row["run_id"]] = (row["updated_at"], row["status"])
    return {run_id for run_id, (_, status) in newest.items() if status == "completed"}


def check_grid(store: Store, sweep: Sweep) -> None:
    """A sweep id names one grid: refuse a spec whose cells differ from those recorded under its name."""
    recorded = q.sweep_cells(store, sweep.name)
    other = [r for r in recorded if r["grid_id"] != sweep.grid_id]
    if other:
        raise SpecError(f"sweep {sweep.name!r} is recorded with another grid (cell {other[0]['cell']} was run "
                        f"{other[0]['run_id']}): give the changed spec another name")


# --- shared stages ---------------------------------------------------------------------------------
def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def prepare(cells: list[Cell]) -> dict[int, str]:
    """Run the stages cells share, once per key, before any cell starts; returns cell index -> error for
    the cells whose shared stages failed (the others go on)."""
    log = get_run_logger()
    store = default_store()
    errors: dict[int, str] = {}

    def fail(members: list[Cell], err: BaseException) -> None:
        log.warning("shared stage failed for %d cell(s): %s", len(members), _error(err))
        for cell in members:
            errors.setdefault(cell.index, _error(err))

    bases = {}
    for model in dict.fromkeys(c.config.model for c in cells):
        try:
            bases[model] = ensure_base_version(store, model)
        except Exception as err:  # noqa: BLE001 - recorded with the cells, the rest go on
            fail([c for c in cells if c.config.model == model], err)
    datasets = {(c.config.dataset, c.config.format) for c in cells if c.index not in errors}
    ingests = {key: ingest.submit(*key) for key in sorted(datasets)}
    requests: dict[tuple[str, str], list[Any]] = {}
    for key, future in ingests.items():
        try:
            requests[key] = fetch_requests(store, future.result())
        except Exception as err:  # noqa: BLE001
            fail([c for c in cells if (c.config.dataset, c.config.format) == key], err)

    # Per cell: its requests, layers (a causal trace, once per sample: a recorded trace is reused),
    # hyper-parameters and statistics; grouped by key.
    stats_groups: dict[tuple, dict[tuple[int, ...], tuple[Any, list[Cell]]]] = {}
    units: dict[tuple, tuple[Any, list[str], list[Cell]]] = {}
    for cell in cells:
        if cell.index in errors:
            continue
        cfg = cell.config
        try:
            method = get_method(cfg.algorithm)
            base = bases[cfg.model]
            edit_ids, _ = select_requests(requests[(cfg.dataset, cfg.format)], cfg.n, cfg.n_probes, cfg.seed)
            protocols_for(cfg.format, cfg.algorithm, cfg.protocols)
            with remote_options(**gpu_options(cfg.device)):
                layers = _layers(cfg, base, edit_ids[:LOCATE_SAMPLE])
            hparams = method_hparams(method, cfg, base, layers)
            needed = statistics_needed(method, cfg, base, hparams)
        except Exception as err:  # noqa: BLE001
            fail([cell], err)
            continue
        if needed is not None:
            key = (needed.base.version_id, needed.corpus, needed.n_shards, needed.max_tokens, needed.device,
                   needed.max_samples)
            stats_groups.setdefault(key, {}).setdefault(tuple(needed.layers), (needed, []))[1].append(cell)
        if method.shardable and 0 not in committed_batches(store, cell.run_id):
            # The first batch's requests grouped exactly as the run groups them (its shards, or the whole
            # batch in the edit): how requests are grouped can move a target that is not well determined.
            first = edit_ids[: cfg.batch_size]
            shards = cfg.shards or method.default_shards
            for ids in ([first[i::shards] for i in range(shards) if first[i::shards]] if shards > 1 else [first]):
                key = (cfg.algorithm, json.dumps(hparams, sort_keys=True), base.version_id, cfg.device, tuple(ids))
                units.setdefault(key, (base, ids, []))[2].append(cell)

    # Statistics: every layer any cell of a key needs, in one pass over the corpus (a layer's shards
    # are keyed alone, so two cells asking for layers [0] and [0, 1] would otherwise both compute 0).
    # If that fails, each layer set alone, one after another (recorded layers are not computed again),
    # so that one cell's impossible layer fails that cell only.
    for by_layers in stats_groups.values():
        needed, members = next(iter(by_layers.values()))
        try:
            replace(needed, layers=sorted({layer for layers in by_layers for layer in layers})).compute()
            continue
        except Exception as err:  # noqa: BLE001
            if len(by_layers) == 1:
                fail(members, err)
                continue
        for needed, members in by_layers.values():
            try:
                needed.compute()
            except Exception as err:  # noqa: BLE001
                fail(members, err)
    # The first batch's per-request work on the unedited weights, in rounds of units that share no
    # request: units of one round run in parallel; a unit whose requests an earlier round holds (MEMIT's
    # and EMMET's targets coincide) runs later and finds them cached. No key is computed twice at once.
    rounds: list[tuple[set[str], list[tuple]]] = []
    for key, (_, ids, _) in units.items():
        free = next((r for r in rounds if not r[0] & set(ids)), None)
        if free is None:
            free = (set(), [])
            rounds.append(free)
        free[0].update(ids)
        free[1].append(key)
    for _, keys in rounds:
        futures = []
        for key in keys:
            algorithm, hparams_json, _, device, _ = key
            base, ids, members = units[key]
            if all(c.index in errors for c in members):
                continue
            with remote_options(**cpu_options(device, 1)):
                futures.append((key, precompute_shard.submit(base, ids, algorithm, json.loads(hparams_json), device)))
        for key, future in futures:
            members = [c for c in units[key][2] if c.index not in errors]
            try:
                work = future.result()
            except Exception as err:  # noqa: BLE001
                fail(members, err)
                continue
            log.info("first-batch work of %s, %d request(s), for %d cell(s): %s", key[0], len(key[4]), len(members),
                     f"{work} unit(s) of work" if work else "all cached")
    return errors


# --- cells -----------------------------------------------------------------------------------------
# A task defined with the flows because it runs one: tasks/ sits below flows/.
@task(name="sweep-cell", cache_policy=NO_CACHE)
def run_cell(sweep_id: str, grid_id: str, attempt: str, cell: Cell) -> dict[str, Any]:
    """Run one cell (its sequential flow, stages in this process on the resources the cell holds);
    record where and how it ran. Never raises for a failed run: the error is returned and recorded."""
    import ray

    from engramflow.flows.sequential import sequential_flow

    store = default_store()
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    where = {"node_id": node_id, "hostname": socket.gethostname()}
    started = _now()
    record_cell(store, sweep_id, grid_id, attempt, cell, "running", started_at=started, **where)
    error = None
    try:
        sequential_flow(cell.config)
    except Exception as err:  # noqa: BLE001 - a failed cell is recorded; the sweep goes on
        error = _error(err)
    status = "failed" if error else "completed"
    record_cell(store, sweep_id, grid_id, attempt, cell, status, error=error, started_at=started,
                finished_at=_now(), **where)
    return {"status": status, "error": error, "seconds": (_now() - started).total_seconds(), "started_at": started,
            **where}


@flow(name="sweep", log_prints=True)
def sweep_flow(sweep: Sweep, max_parallel: int | None = None) -> list[dict[str, Any]]:
    """Run every cell of `sweep` that has not completed, at most `max_parallel` at once (default: the
    spec's, else as many as the cluster's resources allow); returns one result per cell."""
    import ray

    log = get_run_logger()
    store = default_store()
    check_grid(store, sweep)
    attempt = uuid.uuid4().hex[:12]
    grid_id = sweep.grid_id
    previous = {r["cell"]: r for r in q.sweep_cells(store, sweep.name)}
    done = completed_runs(store, [c.run_id for c in sweep.cells])
    results: dict[int, dict[str, Any]] = {}
    for cell in sweep.cells:
        if cell.run_id in done:  # run before (by this sweep or by `engramflow run`): not run again
            last = previous.get(cell.index) or {}
            where = {k: last.get(k) for k in ("node_id", "hostname", "started_at", "finished_at")}
            record_cell(store, sweep.name, grid_id, attempt, cell, "completed", reused=True, **where)
            results[cell.index] = {"status": "completed", "reused": True, "error": None, "seconds": None, **where}
    todo = [c for c in sweep.cells if c.index not in results]
    log.info("sweep %s: %d cell(s), %d completed before, %d to run", sweep.name, len(sweep.cells),
             len(sweep.cells) - len(todo), len(todo))
    start = time.perf_counter()
    errors = prepare(todo) if todo else {}
    log.info("shared stages: %.1f s", time.perf_counter() - start)
    for cell in todo:
        if cell.index in errors:
            record_cell(store, sweep.name, grid_id, attempt, cell, "failed", error=errors[cell.index],
                        finished_at=_now())
            results[cell.index] = {"status": "failed", "reused": False, "error": errors[cell.index], "seconds": None}
    queue = [c for c in todo if c.index not in errors]
    limit = max_parallel or sweep.max_parallel or len(queue) or 1
    running: dict[Any, tuple[Cell, Any, datetime]] = {}
    while queue or running:
        while queue and len(running) < limit:
            cell = queue.pop(0)
            with remote_options(**sweep.resources.for_cell(cell.config)):
                future = run_cell.submit(sweep.name, grid_id, attempt, cell)
            running[future.wrapped_future] = (cell, future, _now())
        ready, _ = ray.wait(list(running), num_returns=1)
        cell, future, submitted = running.pop(ready[0])
        try:
            result = future.result()
        except Exception as err:  # noqa: BLE001 - the task itself died (worker lost, out of memory)
            result = {"status": "failed", "error": _error(err), "seconds": None}
            record_cell(store, sweep.name, grid_id, attempt, cell, "failed", error=result["error"],
                        finished_at=_now())
        results[cell.index] = {"reused": False, "submitted_at": submitted, **result}
        log.info("cell %d (%s) %s%s", cell.index, _describe(cell.axes), result["status"],
                 f" on {result.get('hostname')} (node {str(result.get('node_id'))[:8]}) in {result['seconds']:.0f} s"
                 if result.get("seconds") is not None else f": {result['error']}")
    return [{"cell": c.index, "run_id": c.run_id, "axes": c.axes, **results[c.index]} for c in sweep.cells]
