"""Evaluation stage: score one model version with the run's protocols and append its `metrics` rows in
one write.

The protocols come from the registry (`engramflow.editors.evaluation`): by default the ingest format's
edit-quality protocols, the probe / perplexity / weight-norm drift every run records, and what the
editing method adds (`protocols_for`). After batch `step` every edit made so far is scored, as the
method wants it scored (`Method.scored`). Protocols that compare against the unedited model get their
reference from the run's base model, computed once per request and cached under
`<home>/cache/references/`. A version whose rows are already recorded is not evaluated again (a
resumed flow continues its metrics, never doubles them).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE

from engramflow.home import cache_dir
from engramflow.ledger import (
    Version,
    base_version_id,
    default_store,
    fetch_requests,
    load_artifact,
    materialize,
    stable_id,
)
from engramflow.models import default_corpus
from engramflow.runtime import retry_on_worker_loss
from engramflow.storage import Store
from engramflow.tasks.stats import corpus_texts

log = logging.getLogger(__name__)

PERPLEXITY_TEXTS = 200  # held-out lines of the corpus for perplexity
DRIFT = ("probe", "perplexity", "norms")  # what every run records besides its format's protocols


def protocols_for(fmt: str, method: str, override: Sequence[str] | None = None) -> list[str]:
    """The protocols a run of `method` on ingest format `fmt` is scored with: `override` (`--eval`) if
    given, else the format's defaults, the drift protocols and the method's own. ValueError naming the
    known protocols for an unknown one."""
    from engramflow.data.ingest import get_loader
    from engramflow.editors.evaluation import load_all
    from engramflow.editors.methods import get_method

    if override is not None:
        names = list(override)
        if not names:
            raise ValueError("no evaluation protocol given")
    else:
        names = [*get_loader(fmt).protocols, *DRIFT, *get_method(method).protocols]
    known = load_all()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown evaluation protocol(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(sorted(known))}")
    return list(dict.fromkeys(names))


def is_evaluated(store: Store, run_id: str, version_id: str) -> bool:
    rows = store.read("metrics", columns=["run_id", "model_version"],
                      filter=(pc.field("run_id") == run_id) & (pc.field("model_version") == version_id))
    return rows.num_rows > 0


def unedited_weights(model: Any, deltas: list[Any]) -> dict[int, Any]:
    """W₀ of every edited layer, as the materialised W minus the version's deltas: no second copy of
    the base model is loaded (exact to float rounding, ample for relative norms)."""
    from engramflow.editors.adapters import adapter_for

    adapter = adapter_for(model)
    originals: dict[int, Any] = {}
    for delta in deltas:
        for layer in delta.layers:
            if layer not in originals:
                originals[layer] = adapter.down_weight(model, layer).detach().double().clone()
            originals[layer] -= delta.matrix(layer).double().to(originals[layer].device)
    return originals


# --- references: what a protocol compares against, from the unedited model -------------------------
def reference_dir(base_model: str, protocol: str) -> Path:
    """Where the references of `protocol` on `base_model` are cached: one JSON file per computed set
    of requests, {request id: value}; files are only ever added, so concurrent evaluations are safe."""
    return cache_dir("references") / base_version_id(base_model) / protocol


def cached_reference(base_model: str, protocol: str) -> dict[str, Any]:
    """Every cached reference value of `protocol` on `base_model`, by request id."""
    values: dict[str, Any] = {}
    directory = reference_dir(base_model, protocol)
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else ():
        try:
            values.update(json.loads(path.read_text()))
        except (ValueError, UnicodeDecodeError) as err:  # damaged: recomputed, never used
            log.warning("ignoring and removing a damaged reference file %s (%s); it will be recomputed", path, err)
            path.unlink(missing_ok=True)
    return values


def save_reference(base_model: str, protocol: str, values: dict[str, Any]) -> Path:
    """Cache `values` (request id -> JSON-able) under the hash of their request ids, atomically."""
    directory = reference_dir(base_model, protocol)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stable_id('ref', sorted(values))}.json"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(values, f)
    os.replace(tmp, path)
    return path


def _unedited(version: Version) -> bool:
    return not version.delta_keys and not version.state_key


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_version(run_id: str, version: Version, step: int, edited_ids: list[str], probe_ids: list[str],
                     protocols: list[str], method: str, hparams: dict | None, device: str = "cpu",
                     corpus: str = "world") -> int:
    """Evaluate `version` after batch `step` with `protocols` (`protocols_for`), the edits scored as
    `method` with `hparams` wants them; returns the number of metric rows written (0 if the version was
    evaluated before)."""
    from engramflow.editors.evaluation import EvalContext, asked_prompts, evaluate, get_evaluator
    from engramflow.editors.methods import get_method
    from engramflow.editors.requests import as_requests

    store = default_store()
    if is_evaluated(store, run_id, version.version_id):
        return 0
    m = get_method(method)
    compared = [e for e in map(get_evaluator, protocols) if e.needs_reference]
    requests = as_requests(fetch_requests(store, edited_ids))
    reference = {e.name: cached_reference(version.base_model, e.name) for e in compared}
    missing = {e.name: [r for r in requests if r.request_id not in reference[e.name]] for e in compared}
    loaded = None
    if any(missing.values()):
        # The unedited model, loaded before the version so that two copies are never held at once.
        base = Version(base_version_id(version.base_model), version.base_model, ())
        loaded = materialize(store, base, device=device)
        hp = m.hparams(loaded[0], hparams)
        for e in compared:
            if missing[e.name]:
                new = e.reference(*loaded, as_requests(m.scored(missing[e.name], hp)))
                save_reference(version.base_model, e.name, new)
                reference[e.name].update(new)
        if not _unedited(version):
            loaded = None
    model, tok = loaded or materialize(store, version, device=device)
    ctx = EvalContext(
        model, tok, edited=m.scored(requests, m.hparams(model, hparams)),
        probes=fetch_requests(store, probe_ids), texts=corpus_texts(corpus)[-PERPLEXITY_TEXTS:],
        originals=unedited_weights(model, [load_artifact(store, key) for key in version.delta_keys]),
        reference=reference, asked=asked_prompts(requests))
    rows = evaluate(ctx, protocols)
    for row in rows:
        row.update(run_id=run_id, model_version=version.version_id, step=step)
    store.append("metrics", rows)
    return len(rows)


retry_on_worker_loss(evaluate_version)  # a version whose metrics are recorded is not scored again


def evaluate_revert(store: Store, version: Version) -> int:
    """Score a version made by `ledger.revert_edit` as its run scores its batches, one step after the
    run's last, so `history` and the report show what holds after the revert. The edits it scores are
    those its artifacts still carry; the probes are the run's own."""
    import pyarrow.compute as pc

    from engramflow.storage import queries as q

    run = q.run_row(store, version.run_id)
    params = json.loads(run["params"] or "{}")
    kept: set[str] = set()
    for key in (*version.delta_keys, *([version.state_key] if version.state_key else [])):
        kept.update(load_artifact(store, key).request_ids)
    edits = store.read("edits", columns=["run_id", "request_id", "batch_index"], filter=pc.field("run_id") == run["run_id"])
    order = sorted(zip(edits.column("batch_index").to_pylist(), edits.column("request_id").to_pylist(), strict=True))
    edited = [rid for rid in dict.fromkeys(rid for _, rid in order) if rid in kept]
    metrics = store.read("metrics", columns=["run_id", "protocol", "step", "request_id"],
                         filter=pc.field("run_id") == run["run_id"]).to_pylist()
    probes = list(dict.fromkeys(r["request_id"] for r in metrics if r["protocol"] == "probe" and r["step"] == -1))
    step = max((r["step"] for r in metrics), default=-1) + 1
    protocols = protocols_for(params.get("format", "world"), run["algorithm"], params.get("protocols"))
    return evaluate_version.fn(run["run_id"], version, step, edited, probes, protocols, run["algorithm"],
                               params.get("hparams"), params.get("device", "cpu"),
                               params.get("corpus") or default_corpus(version.base_model))
