"""The recipe every editing flow follows: ingest → statistics → (locate) → edit batch after batch →
evaluate after each. The flows (`edit`, `sequential`, `experts`) only name it.

The recipe asks the run's method what it needs (statistics, shards of per-request work, evaluation
protocols); everything it decides from (which batches are committed, which ids a run has) comes from
the ledger, so running the same config again resumes where it stopped.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger
from prefect.futures import wait
from prefect_ray.context import remote_options

from engramflow import progress
from engramflow.data.selection import select_requests
from engramflow.editors.methods import Method, get_method
from engramflow.flows.config import RunConfig, validate
from engramflow.flows.stats import compute_stats
from engramflow.ledger import (
    Version,
    committed_batches,
    default_store,
    ensure_base_version,
    fetch_requests,
    record_run,
)
from engramflow.models import default_corpus
from engramflow.runtime import cpu_options, gpu_options
from engramflow.tasks.edit import edit_batch, precompute_shard
from engramflow.tasks.evaluate import evaluate_version, protocols_for
from engramflow.tasks.ingest import ingest
from engramflow.tasks.locate import locate_layers

LOCATE_SAMPLE = 20  # requests causal tracing locates the edited layers on (with layers="auto")


def method_hparams(method: Method, cfg: RunConfig, base: Version, layers: list[int] | None) -> dict[str, Any]:
    """The run's hparams overrides with located or given layers in them, checked against the method's
    preset for this model (read from its config alone)."""
    from transformers import AutoConfig

    hp = method.hparams(AutoConfig.from_pretrained(base.base_model), cfg.hparams)
    overrides = dict(cfg.hparams)
    if layers is not None:
        method.with_layers(hp, layers)  # fails here, before any work, if the method cannot take them
        overrides["layers"] = list(layers)
    return overrides


def resolved_hparams(method: Method, base: Version, overrides: dict[str, Any]) -> Any:
    """The method's settings for the base model (read from its config alone) with the run's overrides."""
    from transformers import AutoConfig

    return method.hparams(AutoConfig.from_pretrained(base.base_model), overrides)


@dataclass(frozen=True)
class StatisticsNeeded:
    """The covariance statistics a run needs: `compute_stats`'s arguments."""

    base: Version
    layers: list[int]
    corpus: str
    n_shards: int
    max_tokens: int | None
    device: str
    max_samples: int | None
    exclude_edited: bool  # each batch's edit leaves out the sample's sentences about its subjects

    def compute(self) -> dict[int, str]:
        """layer -> tensor key of the reduced statistics (shards already recorded are not recomputed)."""
        return compute_stats(self.base, self.layers, self.corpus, self.n_shards, self.max_tokens, self.device,
                             self.max_samples)

    def mentions(self, subjects: list[str]) -> dict[int, str]:
        """The same sums over only the sample's sentences that mention `subjects` (what an edit of
        those subjects subtracts when `exclude_edited`)."""
        return compute_stats(self.base, self.layers, self.corpus, self.n_shards, self.max_tokens, self.device,
                             self.max_samples, mentions_of=subjects)


def statistics_needed(method: Method, cfg: RunConfig, base: Version, hparams: dict[str, Any]) -> StatisticsNeeded | None:
    """What statistics a run of `cfg` with `hparams` needs (None: none)."""
    spec = method.statistics(resolved_hparams(method, base, hparams))
    if spec is None:
        return None
    return StatisticsNeeded(base, list(spec.layers), cfg.corpus or default_corpus(cfg.model), cfg.stats_shards,
                            spec.max_tokens if cfg.stats_tokens is None else cfg.stats_tokens, cfg.device,
                            spec.max_samples, spec.exclude_edited)


def _layers(cfg: RunConfig, base: Version, sample: list[str]) -> list[int] | None:
    """Edited layers: from the preset (None), from causal tracing, or as given."""
    if cfg.layers == "preset":
        return None
    if cfg.layers == "auto":
        return locate_layers.submit(base, sample, window=cfg.window).result()
    return [int(x) for x in cfg.layers.split(",")]


class SettingsChanged(ValueError):
    """A run that already has committed batches would go on with other method settings (a preset changed
    since): its results would mix the two."""


def _recorded_settings(store: Any, run_id: str) -> dict[str, Any] | None:
    """The method settings the run's newest row that has them recorded (None: none yet)."""
    import pyarrow.compute as pc

    rows = store.read("runs", columns=["params", "updated_at"], filter=pc.field("run_id") == run_id).to_pylist()
    for row in sorted(rows, key=lambda r: r["updated_at"], reverse=True):
        settings = json.loads(row["params"]).get("settings")
        if settings:
            return settings
    return None


def check_settings_unchanged(store: Any, run_id: str, settings: dict[str, Any]) -> None:
    """Refuse to go on with a run whose committed batches were edited with other settings: a run's id is
    a hash of its options, not of the preset they resolve to, so after a preset changes the same options
    name the old run."""
    recorded = _recorded_settings(store, run_id)
    now = json.loads(json.dumps(settings, sort_keys=True, default=str))
    if recorded is None or recorded == now or not committed_batches(store, run_id):
        return
    changed = ", ".join(f"{k} {recorded.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(recorded) | set(now))
                        if recorded.get(k) != now.get(k))
    raise SettingsChanged(f"run {run_id} has batches edited with other settings than its method resolves to now "
                          f"({changed}); going on would mix the two. Start it under another id (--run-id) or in "
                          "another home (--home).")


def run_batches(flow_name: str, cfg: RunConfig, run_id: str | None = None) -> str:
    """Run `cfg` as flow `flow_name`; returns the run id. A failure is recorded with its error."""
    validate(cfg)  # a config that cannot work fails here, before its run is recorded
    store = default_store()
    run_id = run_id or cfg.run_id(flow_name)

    settings: dict[str, Any] = {}  # the method's resolved settings, recorded with the run once known

    def record(status: str, error: str | None = None) -> None:
        params = {**cfg.params(), **({"settings": settings} if settings else {})}
        record_run(store, run_id, flow_name, cfg.algorithm, cfg.model, cfg.dataset, params, status, error)

    record("running")
    try:
        _run(flow_name, cfg, run_id, settings)
    except BaseException as err:
        if isinstance(err, SettingsChanged):
            settings.clear()  # the run's batches were edited with the recorded ones: keep those on record
        record("failed", "; ".join([f"{type(err).__name__}: {err}", *getattr(err, "__notes__", [])]))
        raise
    record("completed")
    return run_id


def _run(flow_name: str, cfg: RunConfig, run_id: str, settings: dict[str, Any]) -> None:
    log = get_run_logger()
    store = default_store()
    method = get_method(cfg.algorithm)
    base = ensure_base_version(store, cfg.model)
    gpu = gpu_options(cfg.device)

    request_ids = ingest.submit(cfg.dataset, cfg.format).result()
    edit_ids, probe_ids = select_requests(fetch_requests(store, request_ids), cfg.n, cfg.n_probes, cfg.seed)
    protocols = protocols_for(cfg.format, cfg.algorithm, cfg.protocols)
    log.info("run %s: %s, %d edits in batches of %d, %d probes; evaluated with %s", run_id, method.name,
             len(edit_ids), cfg.batch_size, len(probe_ids), ", ".join(protocols))

    with remote_options(**gpu):
        layers = _layers(cfg, base, edit_ids[:LOCATE_SAMPLE])
    hparams = method_hparams(method, cfg, base, layers)
    resolved = resolved_hparams(method, base, hparams)
    settings.update(method.describe(resolved))
    if cfg.layers == "auto" and "layers_from" in settings:
        settings["layers_from"] = "causal tracing (--layers auto)"
    log.info("settings: %s", ", ".join(f"{k} {settings[k]}" for k in ("preset", "layers_from", "layers", "layer")
                                       if settings.get(k) not in (None, "")))
    check_settings_unchanged(store, run_id, settings)
    corpus = cfg.corpus or default_corpus(cfg.model)
    needed = statistics_needed(method, cfg, base, hparams)
    stats_keys = needed.compute() if needed is not None else None
    subject_of = {r.request_id: r.subject for r in fetch_requests(store, edit_ids)}
    shards = cfg.shards or method.default_shards

    evaluations = []
    with ExitStack() as stack, remote_options(**gpu):
        # step -1: the unedited model on every request the run will edit, the probes and the rest
        evaluations.append(evaluate_version.submit(run_id, base, -1, edit_ids, probe_ids, protocols, cfg.algorithm,
                                                   hparams, cfg.device, corpus))
        parent = base
        batches = [edit_ids[i: i + cfg.batch_size] for i in range(0, len(edit_ids), cfg.batch_size)]
        committed_before = committed_batches(store, run_id)  # a resumed run's batches need no precomputing
        bar = stack.enter_context(progress.stage(f"{method.name}: batches of {cfg.batch_size}", len(batches)))
        for index, batch in enumerate(batches):
            # Per-request work (targets, experts) dominates editing: its shards run as parallel tasks
            # first (one core or GPU each), then the edit reads their results from the cache.
            if shards > 1 and method.shardable and index not in committed_before:
                with remote_options(**cpu_options(cfg.device, 1)):
                    work = [precompute_shard.submit(parent, batch[i::shards], cfg.algorithm, hparams, cfg.device)
                            for i in range(shards) if batch[i::shards]]
                for future in work:
                    future.result()  # a failed shard fails the batch here, before anything is committed
            # Statistics without what the sample says about this batch's subjects (the method's choice):
            # the keys of those sentences, summed over the same sample, are subtracted in the edit.
            minus = None
            if needed is not None and needed.exclude_edited and index not in committed_before:
                minus = needed.mentions(sorted({subject_of[r] for r in batch}))
            with remote_options(**cpu_options(cfg.device, cfg.edit_cpus)):
                parent = edit_batch.submit(run_id, index, parent, batch, cfg.algorithm, hparams, stats_keys,
                                           cfg.device, minus).result()
            # Evaluating version i overlaps with editing batch i + 1: both only read version i.
            done_so_far = edit_ids[: (index + 1) * cfg.batch_size]
            evaluations.append(evaluate_version.submit(run_id, parent, index, done_so_far, probe_ids, protocols,
                                                       cfg.algorithm, hparams, cfg.device, corpus))
            log.debug("batch %d/%d committed as %s", index + 1, len(batches), parent.version_id)
            bar.advance(parent.version_id)
        wait(evaluations)
        for future in evaluations:
            future.result()
