"""Canned audit and degradation queries over the store's DuckDB views.

Metric protocols written by the evaluation stage (defined by the evaluators of
`engramflow.editors.evaluation`), among them:
- `counterfact`, one row per edited request: es, ps, ns (probability comparisons), em, pm, nm;
- `zsre` / `easyedit`, one row per edited request: token accuracies (efficacy, generality, locality);
- `probe`, one row per unrelated probe request: top1 (first token of its true object is top-1);
- `model`, request_id null: perplexity, ge (generation entropy), rel_norm.L<layer> (‖W − W₀‖/‖W₀‖),
  norm_ratio.L<layer> (‖W‖/‖W₀‖);
- `scen`, SCEN runs: routing, probe_routing.
`step` is the batch index after which a value was measured; -1 is the unedited model.

A version evaluated twice (a resumed run that re-scored it) has two rows per value; every query
reads `RUN_METRICS`, which keeps the newest row per (step, version, request, protocol, metric), so
averages and counts never double.
"""

from __future__ import annotations

import pyarrow as pa

from engramflow.storage.store import Store

# One run's metrics, the newest row per measured value.
RUN_METRICS = """
run_metrics AS (
    SELECT * FROM metrics WHERE run_id = $run
    QUALIFY row_number() OVER (PARTITION BY step, model_version, request_id, protocol, metric
                               ORDER BY recorded_at DESC) = 1
)"""

# The per-request metrics of one protocol (CounterFact: ES/PS/NS/EM/PM/NM) of every edit made so far,
# after each batch.
DEGRADATION = f"""
WITH {RUN_METRICS}
SELECT step, metric, avg(value) AS value, count(*) AS n
FROM run_metrics
WHERE protocol = $protocol
GROUP BY step, metric
ORDER BY step, metric
"""

# The same metrics restricted to the edits of one batch, followed over later steps (retention).
RETENTION = f"""
WITH {RUN_METRICS}
SELECT m.step, m.metric, avg(m.value) AS value, count(*) AS n
FROM run_metrics m
JOIN (SELECT DISTINCT request_id FROM edits WHERE run_id = $run AND batch_index = $batch) e USING (request_id)
WHERE m.protocol = $protocol AND m.step >= $batch
GROUP BY m.step, m.metric
ORDER BY m.step, m.metric
"""

# Unrelated-probe accuracy and model-level metrics (perplexity, generation entropy, norms) per step.
DRIFT = f"""
WITH {RUN_METRICS}
SELECT step, 'probe_top1' AS metric, avg(value) AS value FROM run_metrics
WHERE protocol = 'probe' AND metric = 'top1' GROUP BY step
UNION ALL
SELECT step, metric, avg(value) AS value FROM run_metrics
WHERE protocol = 'model' GROUP BY step, metric
ORDER BY metric, step
"""

# How many distinct requests a run has edited after each of its batches (the x axis of its plots).
EDITS_SO_FAR = """
SELECT batch_index AS step, sum(count(DISTINCT request_id)) OVER (ORDER BY batch_index) AS edits
FROM edits WHERE run_id = $run
GROUP BY batch_index
ORDER BY batch_index
"""

# The newest row of a run.
RUN = "SELECT * FROM runs_latest WHERE run_id = $run"

# Every edit that touched a subject (exact, case-insensitive; or containing the text with
# `$contains`), and whether it still holds at the latest version its run evaluated.
HISTORY = """
WITH latest AS (
    SELECT run_id, request_id, metric, arg_max(value, step) AS value, max(step) AS step
    FROM metrics WHERE protocol = 'counterfact' AND metric IN ('es', 'ps')
    GROUP BY run_id, request_id, metric
), req AS (
    SELECT * FROM requests QUALIFY row_number() OVER (PARTITION BY request_id ORDER BY ingested_at) = 1
)
SELECT e.edit_id, e.run_id, e.algorithm, e.batch_index, e.layers, e.delta_norm, e.delta_key,
       e.version_after, e.applied_at, r.subject, r.prompt, r.target_true, r.target_new,
       es.value AS es_latest, ps.value AS ps_latest, es.step AS evaluated_after_batch
FROM (SELECT * FROM edits QUALIFY row_number() OVER (PARTITION BY edit_id ORDER BY applied_at) = 1) e
JOIN req r USING (request_id)
LEFT JOIN latest es ON es.run_id = e.run_id AND es.request_id = e.request_id AND es.metric = 'es'
LEFT JOIN latest ps ON ps.run_id = e.run_id AND ps.request_id = e.request_id AND ps.metric = 'ps'
WHERE CASE WHEN $contains THEN contains(lower(r.subject), lower($subject))
           ELSE lower(r.subject) = lower($subject) END
ORDER BY e.applied_at, e.batch_index
"""

# One edit (its first row: edit ids are unique, a re-written row is a duplicate).
EDIT = """
SELECT * FROM edits WHERE edit_id = $edit
QUALIFY row_number() OVER (PARTITION BY edit_id ORDER BY applied_at) = 1
"""

# The edits a delta carries, with their requests: one delta holds a whole batch.
DELTA_EDITS = """
SELECT DISTINCT ON (e.edit_id) e.edit_id, e.run_id, e.batch_index, e.request_id, r.subject, r.prompt,
       r.target_true, r.target_new
FROM edits e LEFT JOIN requests r USING (request_id)
WHERE e.delta_key = $key
ORDER BY e.edit_id
"""

# The newest model version a run recorded (batch versions and reverts alike).
LATEST_VERSION = """
SELECT * FROM model_versions WHERE run_id = $run
ORDER BY created_at DESC, version_id DESC
LIMIT 1
"""

# A sweep's cells (the newest row of each) with every metric of their runs after their last evaluated
# batch (`value`) and on the unedited model (`unedited`, step -1): per-request metrics averaged over the
# requests, one row per cell x protocol x metric (a cell with no metrics yet: one row with nulls).
SWEEP_RESULTS = """
WITH cells AS (
    SELECT * FROM sweeps_latest WHERE sweep_id = $sweep
), m AS (
    SELECT * FROM metrics WHERE run_id IN (SELECT run_id FROM cells)
    QUALIFY row_number() OVER (PARTITION BY run_id, step, model_version, request_id, protocol, metric
                               ORDER BY recorded_at DESC) = 1
), last AS (
    SELECT run_id, max(step) AS last_step FROM m GROUP BY run_id
), final AS (
    SELECT m.run_id, m.protocol, m.metric,
           avg(m.value) FILTER (WHERE m.step = l.last_step) AS value,
           avg(m.value) FILTER (WHERE m.step = -1) AS unedited,
           count(m.value) FILTER (WHERE m.step = l.last_step) AS n
    FROM m JOIN last l USING (run_id)
    GROUP BY m.run_id, m.protocol, m.metric
)
SELECT c.sweep_id, c.cell, c.run_id, c.axes, c.status, c.reused, c.error, c.node_id, c.hostname,
       c.started_at, c.finished_at, r.algorithm, r.model, r.dataset, l.last_step,
       f.protocol, f.metric, f.value, f.unedited, f.n
FROM cells c
LEFT JOIN runs_latest r USING (run_id)
LEFT JOIN last l USING (run_id)
LEFT JOIN final f USING (run_id)
ORDER BY c.cell, f.protocol, f.metric
"""

# A sweep's cells: the newest row of each.
SWEEP_CELLS = "SELECT * FROM sweeps_latest WHERE sweep_id = $sweep ORDER BY cell"


def run_query(store: Store, query: str, **params: object) -> pa.Table:
    """Run a canned query with named parameters on a fresh catalogue connection (`DamagedPartError`
    naming the file when a table it reads has a damaged part)."""
    return store.query(query, params)


def degradation(store: Store, run_id: str, protocol: str = "counterfact") -> pa.Table:
    """(step, metric, value, n): mean `protocol` metrics (CounterFact by default) of all edits so far
    after each batch."""
    return run_query(store, DEGRADATION, run=run_id, protocol=protocol)


def retention(store: Store, run_id: str, batch: int = 0, protocol: str = "counterfact") -> pa.Table:
    """(step, metric, value, n): mean `protocol` metrics (CounterFact by default) of batch `batch`'s
    edits at each later step."""
    return run_query(store, RETENTION, run=run_id, batch=batch, protocol=protocol)


def drift(store: Store, run_id: str) -> pa.Table:
    """(step, metric, value): probe top-1 accuracy (`probe_top1`) and model-level metrics per step."""
    return run_query(store, DRIFT, run=run_id)


def edits_so_far(store: Store, run_id: str) -> dict[int, int]:
    """step -> number of distinct requests edited after that batch (-1, the unedited model: 0)."""
    return {-1: 0, **{r["step"]: int(r["edits"]) for r in run_query(store, EDITS_SO_FAR, run=run_id).to_pylist()}}


def run_row(store: Store, run_id: str) -> dict:
    """The newest `runs` row of `run_id` (KeyError naming the run when it is not recorded)."""
    rows = run_query(store, RUN, run=run_id).to_pylist()
    if not rows:
        raise KeyError(f"run {run_id!r} is not recorded in {store.root}")
    return rows[0]


def history(store: Store, subject: str, contains: bool = False) -> pa.Table:
    """Every edit of a request about `subject` (exact, case-insensitive; substring with `contains`),
    with the latest ES/PS its run measured."""
    return run_query(store, HISTORY, subject=subject, contains=contains)


def edit_row(store: Store, edit_id: str) -> dict:
    """The `edits` row of `edit_id` (KeyError naming the edit when it is not recorded)."""
    rows = run_query(store, EDIT, edit=edit_id).to_pylist()
    if not rows:
        raise KeyError(f"edit {edit_id!r} is not recorded in {store.root}")
    return rows[0]


def delta_edits(store: Store, delta_key: str) -> list[dict]:
    """The edits carried by the delta stored under `delta_key`, with their requests."""
    return run_query(store, DELTA_EDITS, key=delta_key).to_pylist()


def latest_version(store: Store, run_id: str) -> dict:
    """The newest `model_versions` row of `run_id` (KeyError naming the run when it has none)."""
    rows = run_query(store, LATEST_VERSION, run=run_id).to_pylist()
    if not rows:
        raise KeyError(f"run {run_id!r} has no model versions in {store.root}")
    return rows[0]


def sweep_results(store: Store, sweep_id: str) -> pa.Table:
    """One row per cell x protocol x metric of sweep `sweep_id`: the value after the cell's last evaluated
    batch and on the unedited model (`SWEEP_RESULTS`)."""
    return run_query(store, SWEEP_RESULTS, sweep=sweep_id)


def sweep_cells(store: Store, sweep_id: str) -> list[dict]:
    """The newest `sweeps` row of every cell of `sweep_id`, by cell (empty when the sweep is not recorded)."""
    return run_query(store, SWEEP_CELLS, sweep=sweep_id).to_pylist()


def collapse_step(drift_rows: list[dict], baseline_drop: float = 0.10) -> int | None:
    """The first step whose unrelated-probe accuracy falls more than `baseline_drop` (absolute)
    below the unedited model's (step -1): where collapse starts. None if it never does or there
    is no unedited measurement to compare with."""
    probe = {r["step"]: r["value"] for r in drift_rows if r["metric"] == "probe_top1"}
    if -1 not in probe:
        return None
    return next((step for step in sorted(probe) if step >= 0 and probe[step] < probe[-1] - baseline_drop), None)
