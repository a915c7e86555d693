"""Evaluation stage: score one model version and append its `metrics` rows in one write.

After batch `step` of a run: CounterFact ES/PS/NS/EM/PM/NM of every edit made so far (retention),
top-1 accuracy of a fixed set of unrelated probe facts, perplexity on held-out text, generation
entropy, and the growth of each edited matrix relative to the unedited one. A version whose rows
are already recorded is not evaluated again (a resumed flow continues its metrics, never doubles them).
"""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE

from engramflow.ledger import Version, fetch_requests, load_delta, materialize
from engramflow.storage import Store
from engramflow.tasks.stats import corpus_texts

PERPLEXITY_TEXTS = 200  # held-out lines of the corpus for perplexity
GENERATION_REQUESTS = 10  # edited requests whose generation prompts measure fluency


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


def score_version(model: Any, tok: Any, originals: dict[int, Any], edited: list[dict[str, Any]],
                  probes: list[dict[str, Any]], ppl_texts: list[str]) -> list[dict[str, Any]]:
    """Metric rows (request_id, protocol, metric, value) of `model`; `originals` holds W₀ per edited layer."""
    from engramflow.editors import metrics

    # Neighbours that are prompts of this run's edits are meant to move: NS is read on the others.
    edited = metrics.without_edited_neighbours(edited)
    scen = getattr(model, "_scen", None)
    if scen is not None:
        from engramflow.editors.scen import attached, held_out_paraphrases

        # SCEN's neurons may have trained on some paraphrases: PS is read on the others only.
        edited = held_out_paraphrases(edited, attached(model).bank.config)
    rows = metrics.counterfact_metrics(model, tok, edited) if edited else []
    with_generation = [r for r in edited[:GENERATION_REQUESTS] if r.get("generation_prompts")]
    if with_generation:
        ge = metrics.generation_entropy_metrics(model, tok, with_generation, max_new_tokens=20)
        rows.append({"request_id": None, "protocol": "model", "metric": "ge",
                     "value": sum(r["value"] for r in ge) / len(ge)})
    scores = metrics.score_targets(model, tok, [(metrics.fill_prompt(p), p["target_true"]) for p in probes])
    rows += [{"request_id": p["request_id"], "protocol": "probe", "metric": "top1",
              "value": float(s.predicted[0] == s.target[0])} for p, s in zip(probes, scores, strict=True)]
    if scen is not None:
        rows += routing_rows(model, tok, edited, probes)
    rows.append({"request_id": None, "protocol": "model", "metric": "perplexity",
                 "value": metrics.perplexity(model, tok, ppl_texts)})
    if originals:
        for r in metrics.weight_norm_metrics(model, originals):
            name = "rel_norm" if r["metric"] == "delta_rel" else r["metric"]
            rows.append({"request_id": None, "protocol": "model", "metric": f"{name}.L{r['layer']}",
                         "value": r["value"]})
    return rows


def routing_rows(model: Any, tok: Any, edited: list[dict[str, Any]], probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """SCEN routing accuracy: an edit prompt must reach its own expert, an unrelated probe none."""
    from engramflow.editors import metrics
    from engramflow.editors.scen import route

    chosen = route(model, tok, [metrics.fill_prompt(r) for r in edited + probes])
    wanted = [r["request_id"] for r in edited] + [None] * len(probes)
    return [{"request_id": r["request_id"], "protocol": "scen", "metric": "routing" if i < len(edited) else "probe_routing",
             "value": float(c == w)} for i, (r, c, w) in enumerate(zip(edited + probes, chosen, wanted, strict=True))]


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_version(run_id: str, version: Version, step: int, edited_ids: list[str], probe_ids: list[str],
                     device: str = "cpu", corpus: str = "world") -> int:
    """Evaluate `version` after batch `step`; returns the number of metric rows written (0 if the
    version was evaluated before)."""
    store = Store()
    if is_evaluated(store, run_id, version.version_id):
        return 0
    model, tok = materialize(store, version, device=device)
    originals = unedited_weights(model, [load_delta(store, key) for key in version.delta_keys])
    texts = corpus_texts(corpus)[-PERPLEXITY_TEXTS:]
    rows = score_version(model, tok, originals, fetch_requests(store, edited_ids),
                         fetch_requests(store, probe_ids), texts)
    for row in rows:
        row.update(run_id=run_id, model_version=version.version_id, step=step)
    store.append("metrics", rows)
    return len(rows)
