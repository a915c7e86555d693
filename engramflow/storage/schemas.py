"""Explicit pyarrow schemas of every table in the artifact store.

One schema per table, defined here and nowhere else, so every writer (ingest, tasks, flows) produces
the same columns and types and every reader (DuckDB views, reports) can rely on them. All timestamps
are UTC. Tables are append-only: a state change (a run finishing, an expert being removed) is a new
row, and the `*_latest` views in `storage.store` show the newest row per id.
"""

from __future__ import annotations

import pyarrow as pa

UTC_TS = pa.timestamp("us", tz="UTC")

NEIGHBOR = pa.struct([pa.field("prompt", pa.string(), nullable=False), pa.field("target", pa.string(), nullable=False)])


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


# One row per normalised edit request (docs/architecture.md, "Requests").
REQUESTS = pa.schema([
    _f("request_id", pa.string()),
    _f("dataset", pa.string()),
    _f("source", pa.string()),
    _f("position", pa.int64()),
    _f("case_id", pa.string(), True),
    _f("relation", pa.string(), True),
    _f("subject", pa.string()),
    _f("prompt", pa.string()),
    _f("target_new", pa.string()),
    _f("target_true", pa.string(), True),
    _f("paraphrase_prompts", pa.list_(pa.string())),
    _f("neighborhood", pa.list_(NEIGHBOR)),
    _f("generation_prompts", pa.list_(pa.string())),
    _f("extra", pa.string()),
    _f("ingested_at", UTC_TS),
])

# Records the ingest stage refused, with where they were and why.
REJECTS = pa.schema([
    _f("source", pa.string()),
    _f("dataset", pa.string()),
    _f("position", pa.int64(), True),
    _f("field", pa.string(), True),
    _f("reason", pa.string()),
    _f("raw", pa.string(), True),
    _f("rejected_at", UTC_TS),
])

# A flow run; every status change appends a row (`updated_at` orders them; `runs_latest` view).
RUNS = pa.schema([
    _f("run_id", pa.string()),
    _f("flow", pa.string()),
    _f("algorithm", pa.string(), True),
    _f("model", pa.string(), True),
    _f("dataset", pa.string(), True),
    _f("params", pa.string()),  # JSON object
    _f("status", pa.string()),
    _f("started_at", UTC_TS),
    _f("finished_at", UTC_TS, True),
    _f("updated_at", UTC_TS),
])

# A model version = base model + ordered deltas (stacking artifacts, tensor keys in the store) + at most one
# state artifact (a method's whole state that each edit replaces, such as SCEN's expert bank).
MODEL_VERSIONS = pa.schema([
    _f("version_id", pa.string()),
    _f("run_id", pa.string(), True),
    _f("parent_version", pa.string(), True),
    _f("base_model", pa.string()),
    _f("delta_keys", pa.list_(pa.string())),
    _f("state_key", pa.string(), True),  # the state artifact attached on top of the deltas (tensor key), if any
    _f("created_at", UTC_TS),
    _f("note", pa.string(), True),
])

# The edit ledger: one row per request per application.
EDITS = pa.schema([
    _f("edit_id", pa.string()),
    _f("run_id", pa.string()),
    _f("request_id", pa.string()),
    _f("algorithm", pa.string()),
    _f("layers", pa.list_(pa.int32())),
    _f("batch_index", pa.int64()),
    _f("version_before", pa.string()),
    _f("version_after", pa.string()),
    _f("delta_key", pa.string(), True),
    _f("delta_norm", pa.float64(), True),
    _f("seconds", pa.float64(), True),
    _f("applied_at", UTC_TS),
])

# Long format: one value per (run, model version, request, protocol, metric).
METRICS = pa.schema([
    _f("run_id", pa.string()),
    _f("model_version", pa.string()),
    _f("request_id", pa.string(), True),  # null for model-level metrics (perplexity, norms)
    _f("protocol", pa.string()),
    _f("metric", pa.string()),
    _f("value", pa.float64(), True),
    _f("step", pa.int64(), True),  # batch index after which it was measured
    _f("recorded_at", UTC_TS),
])

# SCEN experts and their indexing neurons; removal appends a row with removed = true.
EXPERTS = pa.schema([
    _f("expert_id", pa.string()),
    _f("run_id", pa.string()),
    _f("request_id", pa.string()),
    _f("layer", pa.int32()),
    _f("rank", pa.int32(), True),
    _f("expert_key", pa.string()),
    _f("neuron_key", pa.string(), True),
    _f("bytes", pa.int64(), True),
    _f("created_at", UTC_TS),
    _f("removed", pa.bool_()),
])

# Covariance statistics partials: one row per (model, layer, corpus, shard), tensor in the store.
STATS = pa.schema([
    _f("stats_id", pa.string()),
    _f("base_model", pa.string()),
    _f("layer", pa.int32()),
    _f("corpus", pa.string()),
    _f("shard", pa.int32()),
    _f("n_shards", pa.int32()),
    _f("max_tokens", pa.int64(), True),
    _f("max_samples", pa.int64(), True),  # texts, the references' unit (None: counted in tokens only)
    _f("excluded", pa.string(), True),  # id of the subjects whose texts were left out, if any
    _f("n", pa.int64()),
    _f("tensor_key", pa.string()),
    _f("created_at", UTC_TS),
])

# Causal-tracing indirect effects of one locate run (`trace_id`) per request x kind x layer x token.
TRACES = pa.schema([
    _f("trace_id", pa.string()),
    _f("base_model", pa.string()),
    _f("request_id", pa.string()),
    _f("kind", pa.string()),  # hidden | mlp | attn
    _f("layer", pa.int32()),
    _f("position", pa.int32()),
    _f("token", pa.string()),
    _f("role", pa.string()),  # subject_first / subject_last / last / ...
    _f("prob", pa.float64()),
    _f("effect", pa.float64()),
    _f("recorded_at", UTC_TS),
])

# Continual editing (docs/continual.md). Files taken from an alias's inbox: one row per state change of
# a drop (`taken`, then one final status), a drop being a file's content (sha256): a file that changes
# is a new drop, one that does not is never taken twice.
DROPS = pa.schema([
    _f("drop_id", pa.string()),
    _f("alias", pa.string()),
    _f("source", pa.string()),  # the file's path or URL when it was taken
    _f("sha256", pa.string()),
    _f("bytes", pa.int64()),
    _f("format", pa.string(), True),
    _f("position", pa.int32()),  # order within the take (modification time, then name): later is newer
    _f("tick_id", pa.string()),
    _f("run_id", pa.string(), True),
    _f("status", pa.string()),  # taken | promoted | partial | quarantined | empty | failed
    _f("n_requests", pa.int64(), True),
    _f("n_rejected", pa.int64(), True),
    _f("n_promoted", pa.int64(), True),
    _f("n_quarantined", pa.int64(), True),
    _f("detail", pa.string(), True),
    _f("recorded_at", UTC_TS),
])

# What became of each valid request of a drop, with the reason when it was not promoted.
DROP_REQUESTS = pa.schema([
    _f("drop_id", pa.string()),
    _f("alias", pa.string()),
    _f("request_id", pa.string()),
    _f("tick_id", pa.string()),
    _f("run_id", pa.string()),
    _f("outcome", pa.string()),  # promoted | quarantined | superseded | already_live
    _f("version", pa.string(), True),  # the alias's version after the decision
    _f("supersedes", pa.list_(pa.string())),  # live requests this correction replaced
    _f("reason", pa.string(), True),
    _f("gate_id", pa.string(), True),  # the gate evaluation behind a quarantine
    _f("recorded_at", UTC_TS),
])

# One quality-gate evaluation: a candidate version against the alias's current one, every measured
# value beside its threshold (null: not measurable, e.g. no earlier edits), and the decision.
GATES = pa.schema([
    _f("gate_id", pa.string()),
    _f("tick_id", pa.string()),
    _f("run_id", pa.string()),
    _f("alias", pa.string()),
    _f("candidate_version", pa.string()),
    _f("current_version", pa.string()),
    _f("evaluation", pa.int32()),  # 1, 2, ... within the run: what the bisect cost
    _f("stage", pa.string()),  # drop (everything) | prefix (first failing batch) | bisect (a subset)
    _f("request_ids", pa.list_(pa.string())),  # the drop's requests in the candidate
    _f("es", pa.float64(), True),
    _f("min_es", pa.float64()),
    _f("ps", pa.float64(), True),
    _f("min_ps", pa.float64()),
    _f("retention", pa.float64(), True),
    _f("retention_current", pa.float64(), True),
    _f("retention_drop", pa.float64(), True),
    _f("max_retention_drop", pa.float64()),
    _f("probe_top1", pa.float64(), True),
    _f("probe_top1_current", pa.float64(), True),
    _f("probe_drop", pa.float64(), True),
    _f("max_probe_drop", pa.float64()),
    _f("perplexity", pa.float64(), True),
    _f("perplexity_current", pa.float64(), True),
    _f("perplexity_rise", pa.float64(), True),
    _f("max_perplexity_rise", pa.float64()),
    _f("n_earlier", pa.int64()),
    _f("n_probes", pa.int64()),
    _f("passed", pa.bool_()),
    _f("reason", pa.string()),
    _f("seconds", pa.float64(), True),
    _f("recorded_at", UTC_TS),
])

# Named model versions: append-only history; an alias points at the version of its newest row.
ALIASES = pa.schema([
    _f("alias", pa.string()),
    _f("version", pa.string()),
    _f("previous_version", pa.string(), True),
    _f("action", pa.string()),  # create | promote | set | rollback
    _f("set_by", pa.string()),  # "tick <id>", "engramflow alias set", "engramflow rollback"
    _f("tick_id", pa.string(), True),
    _f("algorithm", pa.string(), True),  # the method later ticks edit with
    _f("drop_ids", pa.list_(pa.string())),  # the drops a promotion carries
    _f("note", pa.string(), True),
    _f("set_at", UTC_TS),
])

# Continual ticks: one row per status change (running, then completed / skipped / failed).
TICKS = pa.schema([
    _f("tick_id", pa.string()),
    _f("alias", pa.string()),
    _f("inbox", pa.string()),
    _f("flow_run_id", pa.string(), True),
    _f("status", pa.string()),
    _f("version_before", pa.string(), True),
    _f("version_after", pa.string(), True),
    _f("n_drops", pa.int64(), True),
    _f("n_promoted", pa.int64(), True),
    _f("n_quarantined", pa.int64(), True),
    _f("gate_evaluations", pa.int64(), True),
    _f("bisect_evaluations", pa.int64(), True),  # of those, spent finding offenders after a failed gate
    _f("bisect_seconds", pa.float64(), True),
    _f("detail", pa.string(), True),
    _f("started_at", UTC_TS),
    _f("updated_at", UTC_TS),
])

# One row per status change of a sweep's cell (`sweeps_latest` view: the newest per sweep and cell). A cell
# is a run (`run_id`, the same id as the equivalent `engramflow run`); `axes` is the JSON object of the
# grid values that made it; `reused` marks a cell found completed when the attempt began (not run again).
SWEEPS = pa.schema([
    _f("sweep_id", pa.string()),
    _f("cell", pa.int32()),  # position in the grid's product, in the spec's order
    _f("run_id", pa.string()),
    _f("flow", pa.string()),
    _f("axes", pa.string()),  # JSON object: swept option -> value
    _f("grid_id", pa.string()),  # hash of every cell's run id: a sweep id names one grid
    _f("attempt", pa.string()),  # the `engramflow sweep` invocation that wrote the row
    _f("status", pa.string()),  # running | completed | failed
    _f("reused", pa.bool_()),
    _f("error", pa.string(), True),
    _f("node_id", pa.string(), True),  # the Ray node the cell ran on
    _f("hostname", pa.string(), True),
    _f("started_at", UTC_TS, True),
    _f("finished_at", UTC_TS, True),
    _f("updated_at", UTC_TS),
])

SCHEMAS: dict[str, pa.Schema] = {
    "requests": REQUESTS,
    "rejects": REJECTS,
    "runs": RUNS,
    "model_versions": MODEL_VERSIONS,
    "edits": EDITS,
    "metrics": METRICS,
    "experts": EXPERTS,
    "stats": STATS,
    "traces": TRACES,
    "drops": DROPS,
    "drop_requests": DROP_REQUESTS,
    "gates": GATES,
    "aliases": ALIASES,
    "ticks": TICKS,
    "sweeps": SWEEPS,
}

# Timestamp columns filled with the write time when a row leaves them out.
WRITE_TIME_COLUMNS: dict[str, str] = {
    "requests": "ingested_at",
    "rejects": "rejected_at",
    "runs": "updated_at",
    "model_versions": "created_at",
    "edits": "applied_at",
    "metrics": "recorded_at",
    "experts": "created_at",
    "stats": "created_at",
    "traces": "recorded_at",
    "drops": "recorded_at",
    "drop_requests": "recorded_at",
    "gates": "recorded_at",
    "aliases": "set_at",
    "ticks": "updated_at",
    "sweeps": "updated_at",
}


# Values for columns a row may leave out (besides the write time).
COLUMN_DEFAULTS: dict[str, dict[str, object]] = {
    "requests": {"paraphrase_prompts": [], "neighborhood": [], "generation_prompts": [], "extra": "{}"},
    "runs": {"params": "{}"},
    "model_versions": {"delta_keys": []},
    "experts": {"removed": False},
    "drop_requests": {"supersedes": []},
    "aliases": {"drop_ids": []},
    "sweeps": {"reused": False},
}


def schema_for(table: str) -> pa.Schema:
    """The schema of `table`; a clear error for an unknown name."""
    try:
        return SCHEMAS[table]
    except KeyError:
        raise KeyError(f"unknown table {table!r}; tables: {', '.join(SCHEMAS)}") from None
