"""Editing flows: `edit_flow` (one batch end to end) and `sequential_flow` (N requests in batches of
B applied one after another, every earlier edit re-evaluated after each batch).

Both are the same recipe: ingest → statistics → (locate) → edit batch after batch → evaluate. The
flow body only wires tasks; everything it decides from (which batches are committed, which ids
a run has) comes from the ledger, so running the same command again resumes where it stopped.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect_ray.context import remote_options

from engramflow.editors.methods import get_method
from engramflow.flows.stats import compute_stats
from engramflow.ledger import (
    Version,
    committed_batches,
    ensure_base_version,
    fetch_requests,
    get_version,
    stable_id,
)
from engramflow.runtime import cpu_options, gpu_options
from engramflow.storage import Store
from engramflow.tasks.edit import edit_batch, optimise_targets
from engramflow.tasks.evaluate import evaluate_version
from engramflow.tasks.experts import index_experts, train_experts
from engramflow.tasks.ingest import ingest
from engramflow.tasks.locate import locate_layers

# Algorithms whose solver needs the preserved keys' second moment.
NEEDS_STATS = {"rome", "memit", "emmet", "alphaedit"}


@dataclass
class RunConfig:
    """Everything that defines a run: the same config gives the same run id (and so resumes it)."""

    algorithm: str
    model: str = "organism"
    dataset: str = "world"
    format: str = "world"
    n: int = 200
    batch_size: int = 50
    hparams: dict[str, Any] = field(default_factory=dict)
    layers: str = "preset"  # "preset", "auto" (causal tracing), or comma-separated layer indices
    corpus: str | None = None  # covariance corpus: None = the world's corpus for the organism
    stats_tokens: int | None = 100_000
    stats_shards: int = 2
    n_probes: int = 100
    seed: int = 0
    device: str = "cpu"
    edit_cpus: int = 2  # Ray CPUs (torch threads) for an edit task on the CPU
    # Tasks a batch's target optimisation is split into (each request's target is optimised on its own
    # prompts), one core or GPU each; 1 = the edit task optimises them. For clusters: on this 2-core CPU,
    # two 1-thread shards of 25 requests took as long as one 2-thread task of 50 (both compute-bound).
    target_shards: int = 1

    def run_id(self, flow_name: str) -> str:
        # where it runs (device, cores) does not change what a run is
        return stable_id(flow_name[:3], flow_name,
                         {k: v for k, v in asdict(self).items() if k not in ("device", "edit_cpus", "target_shards")})


def select_requests(requests: list[dict[str, Any]], n: int, n_probes: int, seed: int) -> tuple[list[str], list[str]]:
    """`n` requests to edit, one per subject (two edits of one subject in a batch would ask one key
    for two values), and `n_probes` unrelated requests whose subjects are never edited."""
    order = list(range(len(requests)))
    random.Random(seed).shuffle(order)
    chosen, subjects = [], set()
    for i in order:
        if len(chosen) == n:
            break
        if requests[i]["subject"] not in subjects:
            chosen.append(i)
            subjects.add(requests[i]["subject"])
    if len(chosen) < n:
        raise ValueError(f"dataset has only {len(chosen)} requests with distinct subjects; asked for n={n}")
    probes = [i for i in order if requests[i]["subject"] not in subjects][:n_probes]
    return [requests[i]["request_id"] for i in chosen], [requests[i]["request_id"] for i in probes]


def _record_run(store: Store, run_id: str, flow_name: str, cfg: RunConfig, status: str) -> None:
    store.append("runs", [{"run_id": run_id, "flow": flow_name, "algorithm": cfg.algorithm, "model": cfg.model,
                           "dataset": cfg.dataset, "params": json.dumps(asdict(cfg), sort_keys=True),
                           "status": status, "started_at": _started_at(store, run_id),
                           "finished_at": None if status == "running" else _now()}])


def _now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def _started_at(store: Store, run_id: str):
    import pyarrow.compute as pc

    rows = store.read("runs", columns=["run_id", "started_at"], filter=pc.field("run_id") == run_id)
    return min(rows.column("started_at").to_pylist()) if rows.num_rows else _now()


def _resolve_layers(cfg: RunConfig, base: Version, sample: list[str]) -> list[int] | None:
    """Edited layers: from the preset (None), from causal tracing, or as given."""
    if cfg.layers == "preset":
        return None
    if cfg.layers == "auto":
        return locate_layers.submit(base, sample, window=int(cfg.hparams.get("window", 1))).result()
    return [int(x) for x in cfg.layers.split(",")]


def _scen_layer(cfg: RunConfig, base: Version, layers: list[int] | None) -> int:
    """SCEN's layer: as located or given, else its default depth for this model."""
    from transformers import AutoConfig

    from engramflow.editors.scen.config import default_layer

    return layers[-1] if layers else default_layer(AutoConfig.from_pretrained(base.base_model).num_hidden_layers)


def scen_batch(run_id: str, index: int, parent: Version, batch: list[str], layer: int, config: dict[str, Any],
               workers: int) -> Version:
    """One SCEN batch: experts in `workers` parallel chunks, then indexing (skipped when committed)."""
    store = Store()
    committed = committed_batches(store, run_id)
    if index in committed:
        return get_version(store, committed[index])
    chunks = [batch[i::workers] for i in range(workers) if batch[i::workers]]
    keys = [f.result() for f in [train_experts.submit(parent, chunk, layer, config) for chunk in chunks]]
    return index_experts.submit(run_id, index, parent, batch, keys, layer, config).result()


def _preset_layers(cfg: RunConfig, base: Version) -> list[int]:
    """The layers the algorithm's preset edits for this model (read from its config alone)."""
    from transformers import AutoConfig

    from engramflow.editors.hparams import load_preset, preset_model

    return load_preset(cfg.algorithm, preset_model(AutoConfig.from_pretrained(base.base_model))).layers


def run_batches(flow_name: str, cfg: RunConfig, run_id: str | None = None) -> str:
    """The shared recipe of both flows. Returns the run id."""
    from engramflow.models import resolve_model

    log = get_run_logger()
    store = Store()
    run_id = run_id or cfg.run_id(flow_name)
    _record_run(store, run_id, flow_name, cfg, "running")
    base = ensure_base_version(store, resolve_model(cfg.model))
    gpu = gpu_options(cfg.device)

    request_ids = ingest.submit(cfg.dataset, cfg.format).result()
    edit_ids, probe_ids = select_requests(fetch_requests(store, request_ids), cfg.n, cfg.n_probes, cfg.seed)
    log.info("run %s: %d edits in batches of %d, %d probes", run_id, len(edit_ids), cfg.batch_size, len(probe_ids))

    with remote_options(**gpu):
        layers = _resolve_layers(cfg, base, edit_ids[: min(20, len(edit_ids))])
    hparams = dict(cfg.hparams)
    hparams.pop("window", None)
    workers = int(hparams.pop("workers", 2))
    if cfg.algorithm == "scen":
        scen_layer = _scen_layer(cfg, base, layers)
    elif layers is not None:
        hparams["layers"] = layers
    corpus = cfg.corpus or "world"
    stats_keys = None
    if cfg.algorithm in NEEDS_STATS:
        stats_keys = compute_stats(base, layers or _preset_layers(cfg, base), corpus, cfg.stats_shards,
                                   cfg.stats_tokens, cfg.device)

    evaluations = []
    with remote_options(**gpu):
        # step -1: the unedited model on every request the run will edit, the probes and the rest
        evaluations.append(evaluate_version.submit(run_id, base, -1, edit_ids, probe_ids, cfg.device, corpus))
        parent = base
        batches = [edit_ids[i: i + cfg.batch_size] for i in range(0, len(edit_ids), cfg.batch_size)]
        committed_before = committed_batches(store, run_id)  # a resumed run's batches need no targets
        for index, batch in enumerate(batches):
            if cfg.algorithm == "scen":
                parent = scen_batch(run_id, index, parent, batch, scen_layer, hparams, workers)
            else:
                # Target optimisation dominates editing: its shards run as parallel tasks first (one core
                # or GPU each), then the edit reads their targets from the cache.
                shards = cfg.target_shards if index not in committed_before else 1
                if shards > 1 and get_method(cfg.algorithm).shardable:
                    with remote_options(**cpu_options(cfg.device, 1)):
                        steps = [optimise_targets.submit(parent, batch[i::shards], cfg.algorithm, hparams, cfg.device)
                                 for i in range(shards) if batch[i::shards]]
                    for future in steps:
                        future.result()  # a failed shard fails the batch here, before anything is committed
                with remote_options(**cpu_options(cfg.device, cfg.edit_cpus)):
                    parent = edit_batch.submit(run_id, index, parent, batch, cfg.algorithm, hparams, stats_keys,
                                               cfg.device).result()
            # Evaluating version i overlaps with editing batch i + 1: both only read version i.
            done_so_far = edit_ids[: (index + 1) * cfg.batch_size]
            evaluations.append(evaluate_version.submit(run_id, parent, index, done_so_far, probe_ids, cfg.device,
                                                       corpus))
            log.info("batch %d/%d committed as %s", index + 1, len(batches), parent.version_id)
        wait(evaluations)
        for future in evaluations:
            future.result()
    _record_run(store, run_id, flow_name, cfg, "completed")
    return run_id


@flow(name="edit", log_prints=True)
def edit_flow(cfg: RunConfig, run_id: str | None = None) -> str:
    """Ingest → statistics → (locate) → edit one batch of `cfg.n` requests → evaluate."""
    cfg.batch_size = cfg.n
    return run_batches("edit", cfg, run_id)


@flow(name="experts", log_prints=True)
def experts_flow(cfg: RunConfig, run_id: str | None = None) -> str:
    """SCEN: experts trained as parallel Ray tasks, then their indexing neurons, then evaluation;
    batch after batch (continual), old experts never retrained."""
    cfg.algorithm = "scen"
    return run_batches("experts", cfg, run_id)


@flow(name="sequential", log_prints=True)
def sequential_flow(cfg: RunConfig, run_id: str | None = None) -> str:
    """`cfg.n` requests in batches of `cfg.batch_size`, applied one after another; after every batch,
    every earlier edit, a fixed set of unrelated probes, perplexity and weight norms are evaluated."""
    return run_batches("sequential", cfg, run_id)
