"""Layer location stage: causal tracing on a sample of requests; effects to the `traces` table, one
heatmap per kind under `<home>/reports/traces/<trace_id>/`, and the chosen layers."""

from __future__ import annotations

import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE

from engramflow import home
from engramflow.ledger import Version, default_store, fetch_requests, materialize, stable_id
from engramflow.runtime import retry_on_worker_loss


@task(name="locate", cache_policy=NO_CACHE)
def locate_layers(base: Version, request_ids: list[str], window: int = 1, samples: int = 10) -> list[int]:
    """ROME's layer (peak MLP effect at the last subject token) when `window` is 1, else MEMIT's
    `window` layers ending there. A finished trace of the same sample is reused."""
    from engramflow.editors import tracing

    store = default_store()
    trace_id = stable_id("trace", base.base_model, sorted(request_ids), samples)
    rows = store.read("traces", filter=pc.field("trace_id") == trace_id).to_pylist()
    if not rows:
        model, tok = materialize(store, base)
        requests = fetch_requests(store, request_ids)
        subject_ids = [i for r in requests for i in tok(" " + r["subject"], add_special_tokens=False)["input_ids"]]
        noise = tracing.embedding_noise_scale(model, 3.0, token_ids=subject_ids)
        traces = tracing.trace_requests(model, tok, requests, noise, samples=samples)
        rows = [{**row, "trace_id": trace_id, "base_model": base.base_model} for t in traces for row in t.rows]
        tracing.plot_heatmaps(rows, home.get_home() / "reports" / "traces" / trace_id)
        store.append_once("traces", rows, "trace_id")  # two runs tracing the same sample write it once
    chosen = tracing.choose_layers(rows, memit_window=window)
    return [chosen["rome_layer"]] if window == 1 else chosen["memit_layers"]


retry_on_worker_loss(locate_layers)  # a finished trace is reused, its rows written once
