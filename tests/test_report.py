"""Reports, subject history and revert over a real ledger: a tiny random GPT-2 edited with MEMIT and
EMMET in two batches each (the editing stage's path: materialise the parent, `editors.edit`, store the
delta, record the version and the edit rows), scored after every batch with the evaluation stage's
protocols for the format (`protocols_for`), with the rows written to a temporary store."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
import transformers as T
from matplotlib.image import imread
from typer.testing import CliRunner

from engramflow import editors
from engramflow.data.ingest import normalise
from engramflow.editors.adapters import adapter_for
from engramflow.editors.evaluation import EvalContext, evaluate
from engramflow.ledger import (
    Version,
    batch_version_id,
    ensure_base_version,
    get_version,
    load_artifact,
    materialize,
    record_version,
    revert_edit,
    save_artifact,
    write_edit_rows,
)
from engramflow.models import load_model
from engramflow.report import compare_report, subject_history, write_report
from engramflow.storage import Store
from engramflow.storage.queries import collapse_step, degradation, edit_row
from engramflow.tasks.evaluate import protocols_for, unedited_weights

FACTS = [  # subject, prompt, new, true, paraphrase, (neighbour prompt, neighbour target)
    ("Danielle Darrieux", "Danielle Darrieux speaks", "English", "French", "The language of Danielle Darrieux is",
     ("Toko Yasuda speaks", "Japanese")),
    ("Toko Yasuda", "Toko Yasuda plays the", "violin", "guitar", "The instrument of Toko Yasuda is the",
     ("Danielle Darrieux plays the", "piano")),
    ("Abraham Lincoln", "Abraham Lincoln was born in", "Paris", "Kentucky", "The birthplace of Abraham Lincoln is",
     ("Steve Jobs was born in", "California")),
    ("Steve Jobs", "Steve Jobs founded", "Acme", "Apple", "The company Steve Jobs founded is",
     ("Abraham Lincoln founded", "Illinois")),
]
PROBES = [("Lyon", "Lyon is a city in", "France"), ("The Eiffel Tower", "The Eiffel Tower is in", "Paris"),
          ("The Colosseum", "The Colosseum is in", "Rome")]
HELD_OUT = ["The capital of France is Paris. The capital of Italy is Rome.",
            "Apple was founded by Steve Jobs in California. Lyon is a city in France.",
            "Abraham Lincoln was born in Kentucky and worked as a lawyer in Illinois."]
# Settings under which edits take on a random model (see tests/test_editors.py).
TAKES = {"fact_token": "last", "context_spec": [[3, 2]], "v_weight_decay": 1e-3, "clamp_norm_factor": 50.0,
         "v_num_grad_steps": 20, "mom2_update_weight": 1.0}
ALGORITHMS = {"memit": [0, 1], "emmet": [1]}


@dataclass
class Ledger:
    home: Path
    store: Store
    base: Version
    runs: dict[str, str]  # algorithm -> run id
    requests: list[dict]  # edited, in edit order
    probes: list[dict]


def _requests() -> tuple[list[dict], list[dict]]:
    edited = [normalise({"subject": s, "prompt": p, "target_new": new, "target_true": true,
                         "paraphrase_prompts": [para], "neighborhood": [{"prompt": n[0], "target": n[1]}],
                         "generation_prompts": [f"{s} is"]}, "test", "test_report", i)
              for i, (s, p, new, true, para, n) in enumerate(FACTS)]
    probes = [normalise({"subject": s, "prompt": p, "target_new": "Berlin", "target_true": true}, "test",
                        "test_report", len(FACTS) + i) for i, (s, p, true) in enumerate(PROBES)]
    return edited, probes


def _evaluate(store: Store, run_id: str, version: Version, step: int, edited: list[dict], probes: list[dict]) -> None:
    """What the evaluation stage does for one version: score it against the base, append the rows."""
    model, tok = materialize(store, version)
    originals = unedited_weights(model, [load_artifact(store, key) for key in version.delta_keys])
    ctx = EvalContext(model, tok, edited=edited, probes=probes, texts=HELD_OUT, originals=originals)
    rows = evaluate(ctx, protocols_for("jsonl", "memit", None))
    for row in rows:
        row.update(run_id=run_id, model_version=version.version_id, step=step)
    store.append("metrics", rows)


def _sequential_run(store: Store, base: Version, algorithm: str, requests: list[dict], probes: list[dict],
                    stats: dict, batch_size: int = 2) -> str:
    """Edit `requests` in batches of `batch_size`, recording and evaluating every version."""
    run_id = f"seq-test-{algorithm}"
    hparams = {**TAKES, "layers": ALGORITHMS[algorithm]}
    now = datetime.now(timezone.utc)
    store.append("runs", [{"run_id": run_id, "flow": "sequential", "algorithm": algorithm, "model": base.base_model,
                           "dataset": "test", "status": "completed", "started_at": now, "finished_at": now,
                           "params": json.dumps({"algorithm": algorithm, "batch_size": batch_size,
                                                 "n": len(requests), "hparams": hparams})}])
    _evaluate(store, run_id, base, -1, [], probes)
    parent = base
    for index in range(0, len(requests) // batch_size):
        batch = requests[index * batch_size: (index + 1) * batch_size]
        model, tok = materialize(store, parent)
        delta = editors.edit(model, tok, batch, method=algorithm, hparams=hparams, stats=stats)
        parent = record_version(store, batch_version_id(run_id, index), parent, delta, save_artifact(store, delta),
                                run_id, note=f"{algorithm} batch {index}")
        write_edit_rows(store, run_id, index, parent, seconds=None)
        _evaluate(store, run_id, parent, index, requests[: (index + 1) * batch_size], probes)
    return run_id


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer, shared_data: Path) -> Ledger:
    home = tmp_path_factory.mktemp("report-home")
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer), n_positions=128,
                       bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    base_dir = home / "base-model"
    T.GPT2LMHeadModel(cfg).save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    store = Store(str(home / "store"))
    edited, probes = _requests()
    store.append("requests", [*edited, *probes])
    base = ensure_base_version(store, str(base_dir))
    model, tok = load_model(str(base_dir))
    wikitext = shared_data / "wikitext" / "wikitext-2-raw-v1.wiki.test.raw.gz"
    stats = editors.layer_stats(model, tok, [0, 1], wikitext, max_tokens=3000)
    runs = {a: _sequential_run(store, base, a, edited, probes, stats) for a in ALGORITHMS}
    return Ledger(home, store, base, runs, edited, probes)


def _final(store: Store, run_id: str, protocol: str, metric: str, step: int | None = None) -> float:
    """A metric's mean at `step` (default: the run's last step), straight from the metrics table."""
    at = step if step is not None else f"(SELECT max(step) FROM metrics WHERE run_id = '{run_id}')"
    return store.sql(f"SELECT avg(value) AS v FROM metrics WHERE run_id = '{run_id}' AND protocol = '{protocol}' "
                     f"AND metric = '{metric}' AND step = {at}").column("v")[0].as_py()


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(path).shape[1] >= 600


def test_report_writes_plots_and_the_store_numbers(ledger: Ledger, tmp_path: Path) -> None:
    run = ledger.runs["memit"]
    path = write_report(ledger.store, run, tmp_path / "memit")
    assert path == tmp_path / "memit" / "report.md"
    for name in ("efficacy", "retention", "drift", "norms"):
        assert _is_png(tmp_path / "memit" / f"{name}.png"), name
    md = path.read_text()
    assert f"# Run `{run}`" in md and "algorithm **memit**" in md
    for metric, label in (("es", "efficacy (ES)"), ("ps", "paraphrase (PS)"), ("ns", "neighbourhood (NS)")):
        assert f"| {label} | — | {_final(ledger.store, run, 'counterfact', metric):.3f} |" in md
    ppl = [_final(ledger.store, run, "model", "perplexity", step) for step in (-1, 1)]
    assert f"| perplexity (held-out text) | {ppl[0]:.2f} | {ppl[1]:.2f} |" in md
    probe = [_final(ledger.store, run, "probe", "top1", step) for step in (-1, 1)]
    assert f"| unrelated-probe top-1 accuracy | {probe[0]:.3f} | {probe[1]:.3f} |" in md
    for layer in ALGORITHMS["memit"]:
        norm = _final(ledger.store, run, "model", f"rel_norm.L{layer}")
        assert norm > 0 and f"layer {layer} | 0.0000 | {norm:.4f} |" in md
    # retention: the first batch's ES after the last batch, from the store
    first = ledger.store.sql(
        f"SELECT avg(m.value) AS v FROM metrics m JOIN edits e USING (request_id) WHERE m.run_id = '{run}' "
        f"AND e.run_id = '{run}' AND e.batch_index = 0 AND m.metric = 'es' AND m.step = 1").column("v")[0].as_py()
    assert f"| ES of batch 0's edits | — | {first:.3f} |" in md
    # per-batch table: the unedited row, then 2 and 4 edits applied
    es0 = _final(ledger.store, run, "counterfact", "es", 0)
    assert f"| unedited | 0 | — | — | — | {probe[0]:.3f} | {ppl[0]:.2f} |" in md
    assert f"| batch 0 | 2 | {es0:.3f} |" in md and "| batch 1 | 4 |" in md
    assert "| batch_size | 2 |" in md and "| algorithm | memit |" in md
    assert "No collapse" in md or "Collapse starts after batch" in md


def test_compare_report_overlays_runs_and_tabulates_them(ledger: Ledger, tmp_path: Path) -> None:
    runs = list(ledger.runs.values())
    path = compare_report(ledger.store, runs, tmp_path / "cmp")
    for name in ("es", "ps", "ns", "retention_es", "probe_top1", "perplexity", "ge", "rel_norm"):
        assert _is_png(tmp_path / "cmp" / f"{name}.png"), name
    md = path.read_text()
    for algorithm, run in ledger.runs.items():
        es, ps, ns = (_final(ledger.store, run, "counterfact", m) for m in ("es", "ps", "ns"))
        assert f"| {run} | {algorithm} | 4 | {es:.3f} | {ps:.3f} | {ns:.3f} |" in md
    assert f"| parameter | {runs[0]} | {runs[1]} |" in md
    with pytest.raises(ValueError, match="at least two distinct runs"):
        compare_report(ledger.store, [runs[0], runs[0]], tmp_path / "one")
    with pytest.raises(KeyError, match="run 'seq-nope' is not recorded"):
        compare_report(ledger.store, [runs[0], "seq-nope"], tmp_path / "bad")


def test_queries_count_a_re_evaluated_version_once(ledger: Ledger, tmp_path: Path) -> None:
    run = ledger.runs["emmet"]
    before = degradation(ledger.store, run).to_pylist()
    store = Store(str(tmp_path / "copy"))  # a copy of the run's metrics, written twice (a resumed evaluation)
    rows = ledger.store.sql(f"SELECT * FROM metrics WHERE run_id = '{run}'")
    store.append("metrics", rows)
    store.append("metrics", rows)
    after = degradation(store, run).to_pylist()
    assert [(r["step"], r["metric"], r["n"]) for r in after] == [(r["step"], r["metric"], r["n"]) for r in before]
    assert [r["value"] for r in after] == pytest.approx([r["value"] for r in before])
    assert {r["step"]: r["n"] for r in before if r["metric"] == "es"} == {0: 2, 1: 4}


def test_collapse_is_the_first_step_more_than_ten_points_below_unedited() -> None:
    rows = [{"metric": "probe_top1", "step": s, "value": v} for s, v in [(-1, 0.9), (0, 0.85), (1, 0.79), (2, 0.9)]]
    assert collapse_step(rows) == 1
    assert collapse_step(rows, baseline_drop=0.2) is None
    assert collapse_step(rows[1:]) is None  # no unedited measurement


def test_history_finds_every_edit_of_a_subject(ledger: Ledger) -> None:
    rows = subject_history(ledger.store, "abraham lincoln")
    assert {r["algorithm"] for r in rows} == {"memit", "emmet"} and len(rows) == 2
    request = ledger.requests[2]
    for r in rows:
        assert (r["batch_index"], r["subject"], r["target_true"], r["target_new"]) == (
            1, "Abraham Lincoln", "Kentucky", "Paris")
        assert r["layers"] == ALGORITHMS[r["algorithm"]] and r["delta_norm"] > 0
        es = ledger.store.sql(f"SELECT value FROM metrics WHERE run_id = '{r['run_id']}' AND step = 1 AND "
                              f"metric = 'es' AND request_id = '{request['request_id']}'").column("value")[0].as_py()
        assert r["es_latest"] == es and r["evaluated_after_batch"] == 1
    assert [r["subject"] for r in subject_history(ledger.store, "lincoln", contains=True)] == ["Abraham Lincoln"] * 2
    assert subject_history(ledger.store, "Lincoln") == []


def test_revert_removes_exactly_the_delta_of_the_edits_batch(ledger: Ledger) -> None:
    store, run = ledger.store, ledger.runs["memit"]
    edit = store.sql(f"SELECT e.* FROM edits e JOIN requests r USING (request_id) WHERE e.run_id = '{run}' "
                     "AND r.subject = 'Danielle Darrieux'").to_pylist()[0]
    latest = get_version(store, batch_version_id(run, 1))
    assert edit["delta_key"] in latest.delta_keys and len(latest.delta_keys) == 2

    result = revert_edit(store, edit["edit_id"])
    kept = [k for k in latest.delta_keys if k != edit["delta_key"]]
    assert result.parent == latest and list(result.version.delta_keys) == kept
    row = store.sql(f"SELECT * FROM model_versions WHERE version_id = '{result.version.version_id}'").to_pylist()
    assert len(row) == 1 and row[0]["note"] == f"revert of {edit['edit_id']}" and row[0]["delta_keys"] == kept
    assert row[0]["run_id"] == run and row[0]["parent_version"] == latest.version_id
    toko = edit_row(store, [e for e in result.also_removed if e["subject"] == "Toko Yasuda"][0]["edit_id"])
    assert [e["edit_id"] for e in result.also_removed] == [toko["edit_id"]] and toko["batch_index"] == 0

    reverted, _ = materialize(store, result.version)
    expected, _ = load_model(ledger.base.base_model)
    adapter = adapter_for(expected)
    for key in kept:
        delta = load_artifact(store, key)
        for layer in delta.layers:
            adapter.add_to_down_weight(expected, layer, delta.matrix(layer))
    for (name, w), w_expected in zip(reverted.state_dict().items(), expected.state_dict().values(), strict=True):
        torch.testing.assert_close(w, w_expected, msg=name)
    edited, _ = materialize(store, latest)
    changed = [adapter.down_weight(m, 0) for m in (reverted, edited)]  # layer 0 holds only batch 0's delta
    assert not torch.allclose(*changed)

    history = {r["algorithm"]: r["in_latest"] for r in subject_history(store, "Danielle Darrieux")}
    assert history == {"memit": False, "emmet": True}
    with pytest.raises(ValueError, match=f"edit '{toko['edit_id']}'.*already reverted"):
        revert_edit(store, toko["edit_id"])


def test_unknown_edit_is_a_clear_error(ledger: Ledger) -> None:
    with pytest.raises(KeyError, match="edit 'edit-000000000000' is not recorded"):
        revert_edit(ledger.store, "edit-000000000000")


def test_cli_report_history_and_revert(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    from engramflow.cli import app

    monkeypatch.setenv("ENGRAMFLOW_HOME", str(ledger.home))
    monkeypatch.delenv("ENGRAMFLOW_STORE", raising=False)
    runner = CliRunner()

    def cli(*args: str):
        return runner.invoke(app, ["--home", str(ledger.home), *args], env={"COLUMNS": "300"})

    memit, emmet = ledger.runs["memit"], ledger.runs["emmet"]
    out = cli("report", memit)
    assert out.exit_code == 0, out.output
    assert str(ledger.home / "reports" / memit / "report.md") in out.output and memit in out.output
    assert (ledger.home / "reports" / memit / "efficacy.png").is_file()
    out = cli("report", memit, emmet)
    assert out.exit_code == 0, out.output
    assert (ledger.home / "reports" / f"compare-{memit}-{emmet}" / "report.md").is_file()
    assert cli("report", "seq-nope").exit_code == 1

    out = cli("history", "Steve Jobs")
    assert out.exit_code == 0, out.output
    assert memit in out.output and emmet in out.output and "Apple → Acme" in out.output
    assert "no edits touched" in cli("history", "Nobody").output

    jobs = ledger.store.sql(f"SELECT e.edit_id FROM edits e JOIN requests r USING (request_id) WHERE "
                            f"e.run_id = '{emmet}' AND r.subject = 'Steve Jobs'").column("edit_id")[0].as_py()
    out = cli("revert", jobs)
    assert out.exit_code == 0, out.output
    assert "new version revert-" in out.output and "Abraham Lincoln" in out.output  # batch 1's other edit
    # the reverted version is evaluated, one step after the run's last batch, without the removed edits
    after = ledger.store.sql(f"SELECT DISTINCT step, model_version FROM metrics WHERE run_id = '{emmet}' "
                             "AND model_version LIKE 'revert-%'").to_pylist()
    assert len(after) == 1 and after[0]["step"] == 2
    scored = ledger.store.sql(f"SELECT DISTINCT request_id FROM metrics WHERE run_id = '{emmet}' AND step = 2 "
                              "AND protocol = 'counterfact'").column("request_id").to_pylist()
    assert len(scored) == 2  # 4 edits, 2 of them (Steve Jobs' batch) removed
    out = cli("revert", "edit-000000000000")
    assert out.exit_code == 1 and "edit 'edit-000000000000' is not recorded" in out.output
