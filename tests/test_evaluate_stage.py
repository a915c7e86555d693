"""The evaluation stage: which protocols a run is scored with, and a zsRE run scored with zsRE's, its
locality read against the unedited model's cached answers."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest
import torch

from engramflow import editors
from engramflow.data.ingest import LOADERS, ingest_file
from engramflow.editors.delta import Delta
from engramflow.editors.evaluation import load_all
from engramflow.editors.methods import METHODS, get_method
from engramflow.ledger import default_store, ensure_base_version, materialize, record_version
from engramflow.storage import Store
from engramflow.storage.queries import degradation
from engramflow.tasks import evaluate as stage
from engramflow.tasks.evaluate import evaluate_version, protocols_for, reference_dir

DRIFT = ["probe", "perplexity", "norms"]


def test_a_format_names_its_default_protocols() -> None:
    assert protocols_for("world", "memit", None) == ["counterfact", "fluency", *DRIFT]
    assert protocols_for("jsonl", "rome", None) == ["counterfact", "fluency", *DRIFT]
    assert protocols_for("zsre", "memit", None) == ["zsre", *DRIFT]
    assert protocols_for("knowedit", "memit", None) == ["easyedit", "knowedit", *DRIFT]
    assert protocols_for("mquake", "memit", None) == ["counterfact", "mquake", *DRIFT]
    assert protocols_for("known", "memit", None) == DRIFT
    known = load_all()
    for name, loader in LOADERS.items():
        assert set(loader.protocols) <= set(known), name


def test_a_method_adds_its_protocols(monkeypatch: pytest.MonkeyPatch) -> None:
    routed = dataclasses.replace(get_method("memit"), name="routed-memit", protocols=("routing",))
    monkeypatch.setitem(METHODS, routed.name, routed)
    assert protocols_for("world", "routed-memit", None) == ["counterfact", "fluency", *DRIFT, "routing"]


def test_an_override_replaces_the_defaults_and_is_checked() -> None:
    assert protocols_for("world", "memit", ["zsre", "perplexity", "zsre"]) == ["zsre", "perplexity"]
    with pytest.raises(ValueError, match=r"'nope'.*known: .*counterfact.*zsre"):
        protocols_for("world", "memit", ["zsre", "nope"])
    with pytest.raises(ValueError, match="no evaluation protocol"):
        protocols_for("world", "memit", [])
    with pytest.raises(ValueError, match="unknown method"):
        protocols_for("world", "no-such-method", None)


def _rows(store: Store, run_id: str, step: int) -> list[dict]:
    return store.sql(f"SELECT * FROM metrics WHERE run_id = '{run_id}' AND step = {step}").to_pylist()


def test_a_zsre_run_is_scored_with_the_zsre_protocol(tiny_organism: Path, shared_data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with gzip.open(shared_data / "zsre" / "zsre_mend_eval_portability_gpt4.json.gz", "rt") as f:
        records = json.load(f)[:4]
    (tmp_path / "zsre.json").write_text(json.dumps(records))
    store = default_store()
    ids = ingest_file(tmp_path / "zsre.json", "zsre", store).request_ids
    assert len(ids) == 4
    base = ensure_base_version(store, str(tiny_organism))
    protocols = protocols_for("zsre", "memit", None)
    run = "zsre-stage-test"

    def evaluate(version, step: int) -> int:
        return evaluate_version.fn(run, version, step, ids, [], protocols, "memit", None, corpus="world-tiny")

    assert evaluate(base, -1) > 0
    unedited = _rows(store, run, -1)
    assert {r["protocol"] for r in unedited} == {"zsre", "model"}  # no counterfact rows
    zsre = [r for r in unedited if r["protocol"] == "zsre"]
    assert {r["metric"] for r in zsre} == {"efficacy", "generality", "locality"}
    assert {r["request_id"] for r in zsre} == set(ids)
    assert all(r["value"] == 1.0 for r in zsre if r["metric"] == "locality")  # by definition
    assert any(reference_dir(base.base_model, "zsre").glob("*.json"))
    assert evaluate(base, -1) == 0  # evaluated once

    # A destructive low-rank update on every layer: locality must now fall below the cached answers.
    torch.manual_seed(0)
    delta = Delta({layer: (torch.randn(128, 4) * 2, torch.randn(1024, 4)) for layer in (0, 1)}, algorithm="random")
    key = store.put_tensors(*editors.to_safetensors(delta))
    edited = record_version(store, f"{run}-b0000", base, delta, key, run)
    loads = []

    def counting(store: Store, version, device: str = "cpu"):
        loads.append(version)
        return materialize(store, version, device=device)

    monkeypatch.setattr(stage, "materialize", counting)
    assert evaluate(edited, 0) > 0
    assert loads == [edited]  # the unedited answers came from the cache, not a second model
    after = [r for r in _rows(store, run, 0) if r["protocol"] == "zsre" and r["metric"] == "locality"]
    assert len(after) == 4 and sum(r["value"] for r in after) / 4 < 1.0
    assert {r["metric"] for r in _rows(store, run, 0) if r["protocol"] == "model"} >= {"rel_norm.L0", "norm_ratio.L1"}
    by_step = {(r["step"], r["metric"]): r["value"] for r in degradation(store, run, "zsre").to_pylist()}
    assert by_step[-1, "locality"] == 1.0 and by_step[0, "locality"] < 1.0
    assert degradation(store, run).num_rows == 0  # the CounterFact default: this run has none
